"""`safe-layers diagnose` on the logs people have: the forks' line formats (NVCaffe,
py-faster-rcnn, BVLC of 2015: tests/data/logs/, each citing the fork's file:line), a
multi-loss net whose one output goes non-finite (real `caffe train` and py-faster-rcnn's
log), and verdicts no stronger than the evidence (a NaN inside one display window)."""

import re

import pytest

from support.paths import DATA
from support.diagnose_runs import (assert_evidence_is_the_log, diagnose_json, rules, run_diagnose,
                                   train_log)

LOGS = DATA / "logs"


def _without_comments(tmp_path, name, drop=None):
    """The fixture without its '#' header (the log as Caffe wrote it), ``drop`` (a regex
    over the whole text) removed."""
    text = "".join(l for l in (LOGS / name).read_text().splitlines(True) if not l.startswith("#"))
    if drop:
        text = re.sub(drop, "", text, flags=re.S)
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------
# 1. NVCaffe's lr line.

def test_nvcaffe_lr_nan_is_the_cause(tmp_path):
    """NVCaffe 0.16.6 prints `Iteration N, lr = R, m = M, wd = W, gs = G`: its -nan rate
    is read, so the verdict is the policy (poly past max_iter), not the loss."""
    log = _without_comments(tmp_path, "nvcaffe_poly_past_max_iter.log")
    status, doc = diagnose_json(log)
    assert status == 1
    assert [f["rule"] for f in doc["findings"]][0] == "SL801"
    found = rules(doc)
    assert "SL803" not in found and "SL815" not in found
    bad = found["SL801"]
    assert bad["iteration"] == 150 and bad["policy"] == "poly" and bad["field"] == "max_iter"
    assert "past max_iter 100" in bad["message"]
    assert [x for x, _ in doc["lr"]] == [0, 50, 100, 150, 200]
    assert doc["lr_policy"] == "poly"
    assert_evidence_is_the_log(doc, log)


# ---------------------------------------------------------------------------------------
# 2. A multi-loss net: the output that went non-finite, its weight, the ones that did not.

def test_py_faster_rcnn_names_loss_bbox(tmp_path):
    log = _without_comments(tmp_path, "py_faster_rcnn_loss_bbox_nan.log")
    status, doc = diagnose_json(log)
    assert status == 1
    found = rules(doc)
    cause = found["SL807"]
    assert cause["layer"] == "loss_bbox" and cause["output"] == "loss_bbox"
    assert cause["loss_weight"] == 1
    [bad] = cause["outputs_nonfinite"]
    assert (bad["name"], bad["type"], bad["layer"], bad["iteration"]) == \
        ("loss_bbox", "SmoothL1Loss", "loss_bbox", 0)
    assert {o["name"] for o in cause["outputs_finite"]} == {"loss_cls", "rpn_cls_loss", "rpn_loss_bbox"}
    # What only loss_bbox reads: the box branch and its targets, not the shared roi-data's labels.
    assert cause["only_bad_reads"] == ["bbox_pred", "bbox_targets", "bbox_inside_weights",
                                       "bbox_outside_weights"]
    assert "'loss_bbox' (SmoothL1Loss 'loss_bbox', loss_weight 1) = nan at iteration 0" in cause["message"]
    assert "'loss_cls' (SoftmaxWithLoss 'loss_cls', loss_weight 1)" in cause["message"]
    assert "3.04452 (iteration 0) -> 0.911402 (iteration 40)" in cause["message"]
    # Advice of its loss type (the net printed in the log), not pooling / BatchNorm.
    assert cause["advice_from"] == "net"
    assert "bbox_transform.py" in cause["fix"] and "Pooling" not in cause["fix"]
    assert "BatchNorm" not in cause["fix"]
    assert cause["confidence"] == "high"
    assert_evidence_is_the_log(doc, log)


def test_py_faster_rcnn_without_the_net_printed_labels_its_guess(tmp_path):
    """Without "Initializing net from parameters:", the type is unknown: the advice drawn
    from the output's name says it is a guess."""
    log = _without_comments(tmp_path, "py_faster_rcnn_loss_bbox_nan.log",
                            drop=r"[^\n]*Initializing net from parameters:.*?\n\}\n(?=I)")
    assert "layer {" not in log.read_text()
    status, doc = diagnose_json(log)
    cause = rules(doc)["SL807"]
    assert cause["output"] == "loss_bbox" and cause["outputs_nonfinite"][0]["type"] is None
    assert cause["advice_from"] == "name"
    assert "the layer type of 'loss_bbox' is unknown" in cause["fix"]
    assert "a guess from the name only" in cause["fix"]


SPLIT_LOSSES = """
name: "split_losses"
layer { name: "data_a" type: "DummyData" top: "xa" top: "la"
  dummy_data_param { shape { dim: 16 dim: 10 } shape { dim: 16 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "data_b" type: "DummyData" top: "xb" top: "tb"
  dummy_data_param { shape { dim: 16 dim: 10 } shape { dim: 16 dim: 1 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: nan } } }
layer { name: "fc_a" type: "InnerProduct" bottom: "xa" top: "ya"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "fc_b" type: "InnerProduct" bottom: "xb" top: "yb"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "cls" type: "SoftmaxWithLoss" bottom: "ya" bottom: "la" top: "cls_loss" }
layer { name: "reg" type: "EuclideanLoss" bottom: "yb" bottom: "tb" top: "reg_loss"
  loss_weight: 0.25 }
"""


def test_one_of_two_losses_nan_from_the_start_under_caffe_train(caffe_train, tmp_path):
    """Real `caffe train`: a EuclideanLoss whose targets are NaN beside a softmax loss on
    its own branch, which trains on. The finding names 'reg_loss', its weight 0.25, its
    layer and type, the finite 'cls_loss', what feeds only it, and EuclideanLoss's advice."""
    log, result = train_log(caffe_train, tmp_path, "split.log", SPLIT_LOSSES, base_lr=0.1,
                            max_iter=6, display=1)
    assert result.returncode == 0
    status, doc = diagnose_json(log)
    assert status == 1
    cause = rules(doc)["SL807"]
    assert cause["output"] == "reg_loss" and cause["layer"] == "reg" and cause["loss_weight"] == 0.25
    assert [o["name"] for o in cause["outputs_finite"]] == ["cls_loss"]
    assert cause["outputs_nonfinite"][0]["type"] == "EuclideanLoss"
    assert cause["only_bad_reads"] == ["yb", "tb"]
    assert "euclidean_loss_layer.cpp" in cause["fix"] and "'reg_loss'" in cause["fix"]
    assert "Pooling" not in cause["message"] + cause["fix"]
    assert_evidence_is_the_log(doc, log)
    status, out, _ = run_diagnose(log)
    assert "output 'reg_loss' (EuclideanLoss 'reg', loss_weight 0.25) = nan at iteration 0" in out


# ---------------------------------------------------------------------------------------
# 3. Verdicts no stronger than the evidence.

def test_one_finite_loss_before_the_nan_cannot_tell_the_cause(tmp_path):
    """display 20: one finite loss (iteration 0), NaN at iteration 20. SL803 used to say the
    loss "stayed near 6.99 ... without growing first"; one value is no curve."""
    log = _without_comments(tmp_path, "bvlc_nan_within_display_window.log")
    status, doc = diagnose_json(log)
    assert status == 1
    assert [f["rule"] for f in doc["findings"]] == ["SL815"]
    [finding] = doc["findings"]
    assert finding["confidence"] == "insufficient" and finding["finite_values"] == 1
    assert finding["candidates"] == ["exploding gradients", "faulty input or loss layer"]
    assert finding["unlogged"] == [1, 19] and finding["iteration"] == 20
    assert "stayed near" not in finding["message"] and "without growing" not in finding["message"]
    assert "one value is no curve" in finding["message"]
    for way in ("display: 1", "debug_info: true", "safe-layers train", "lower base_lr (0.05)"):
        assert way in finding["fix"]
    assert_evidence_is_the_log(doc, log)


def displayed_log(path, losses, display=1, start=0):
    """A `caffe train` log (BVLC solver.cpp:239/258, sgd_solver.cpp:112) whose displayed
    losses are ``losses``, every ``display`` iterations from ``start``."""
    lines = ["I20261125 10:00:00.000001  7 solver.cpp:45] Initializing solver from parameters: ",
             "base_lr: 0.05", "display: %d" % display, 'lr_policy: "fixed"']
    for n, loss in enumerate(losses):
        it = start + n * display
        lines += ["I20261125 10:00:01.%06d  7 solver.cpp:239] Iteration %d (9 iter/s, 0.1s/%d iters), "
                  "loss = %s" % (n, it, display, loss),
                  "I20261125 10:00:01.%06d  7 solver.cpp:258]     Train net output #0: loss = %s "
                  "(* 1 = %s loss)" % (n, loss, loss),
                  "I20261125 10:00:01.%06d  7 sgd_solver.cpp:112] Iteration %d, lr = 0.05" % (n, it)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("losses, display, rule, confidence", [
    (["2.3", "nan"], 1, "SL815", "insufficient"),             # one value, even at display 1
    (["2.3", "2.2", "nan"], 1, "SL815", "insufficient"),      # two: one step
    (["2.3", "2.2", "2.1", "nan"], 1, "SL803", "high"),       # a trend, every iteration shown
    (["2.3", "2.2", "2.1", "nan"], 10, "SL803", "medium"),    # ... but 9 iterations unseen
    (["1", "2", "4", "nan"], 1, "SL803", "medium"),           # a 4x rise: may be an explosion
    (["2.3", "70", "nan"], 1, "SL802", "medium"),             # 30x in one step
    (["2.3", "20", "70", "nan"], 1, "SL802", "high"),         # a climb
    (["nan", "nan"], 1, "SL807", "high"),                     # the run's first iteration
])
def test_confidence_follows_the_evidence(tmp_path, losses, display, rule, confidence):
    status, doc = diagnose_json(displayed_log(tmp_path / "l.log", losses, display))
    [finding] = doc["findings"]
    assert (finding["rule"], finding["confidence"]) == (rule, confidence)
    assert status == 1
    if confidence == "medium" and rule == "SL803":
        assert "not certain: " in finding["message"]
    if display > 1 and rule == "SL803":
        assert finding["unlogged"] == [21, 29]
        assert "a loss that climbed within them would read the same" in finding["message"]


def test_a_log_starting_mid_run_says_so(tmp_path):
    """The first iteration in a log cut at its start is not the run's first batch."""
    status, doc = diagnose_json(displayed_log(tmp_path / "l.log", ["nan", "nan"], 100, start=3000))
    [finding] = doc["findings"]
    assert finding["rule"] == "SL807" and finding["confidence"] == "medium"
    assert "the first iteration in the log (3000)" in finding["message"]
    assert "what came before is not in it" in finding["message"]


def test_every_finding_states_its_confidence(tmp_path):
    from safe_layers.tools import rule_table
    assert "SL815  error    non-finite; the log cannot tell the cause" in rule_table.list_lines("diagnose")
    assert "display: 1" in rule_table.RULES["SL815"].doc
    for losses in (["2.3", "nan"], ["1", "10", "100", "1000", "10000"]):
        status, doc = diagnose_json(displayed_log(tmp_path / "l.log", losses))
        assert all(f["confidence"] in ("high", "medium", "insufficient") for f in doc["findings"])


# A ReLU's zeros under a square root: Power's backward at 0 is inf, ReLU's mask makes it
# inf * 0 = NaN in fc1's weight gradient, so fc1's weights are NaN from the first update
# on while every forward value of iteration 0 is finite.
SQRT_AFTER_RELU = """
name: "sqrt_after_relu"
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 8 dim: 4 } shape { dim: 8 dim: 1 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "fc1" type: "InnerProduct" bottom: "x" top: "h"
  inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "sqrt" type: "Power" bottom: "h" top: "r" power_param { power: 0.5 } }
layer { name: "fc2" type: "InnerProduct" bottom: "r" top: "y"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""


def test_a_layer_whose_own_weights_went_nan_is_not_blamed_for_its_output(caffe_train, tmp_path):
    """debug_info logs a layer's tops before its weights (net.cpp): fc1's NaN output at
    iteration 1 comes from its NaN weights (an update made them so), which SL804 says
    instead of the advice for a layer that makes NaN from finite input."""
    log, result = train_log(caffe_train, tmp_path, "sqrt.log", SQRT_AFTER_RELU, base_lr=0.01,
                            max_iter=3, display=1, debug_info="true")
    assert result.returncode == 0
    status, doc = diagnose_json(log)
    first = rules(doc)["SL804"]
    assert first["layer"] == "fc1" and first["blob_kind"] == "top" and first["iteration"] == 1
    assert first["weights_nonfinite"] is True
    assert "its own weights are non-finite in the same pass" in first["message"]
    assert "guard it" not in first["fix"]
    assert len(first["evidence"]) == 2 and "param blob" in first["evidence"][1]["text"]
    assert_evidence_is_the_log(doc, log)
