"""`safe-layers diagnose` on logs of real Caffe runs made inside the tests: `caffe train`
and pycaffe, each failure the seed names (diverging lr, poly without max_iter, a NaN in
the input, two losses of which one explodes), with and without debug_info; truncated
and garbage logs; both glog date prefixes."""

import io
import json
import os
import random
import re
import subprocess
import sys
import zlib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from safe_layers.tools import cli, rule_table
from safe_layers.tools.diagnose import command as diagnose_module
from support.caffe_data import convert_mnist, datum, write_lmdb
from support.diagnose_runs import (assert_evidence_is_the_log, diagnose_json, rules, run_diagnose,
                                   train_log)
from support.nets import DIVERGING_NET, solver_text
from support.paths import DATA, ROOT


# ---------------------------------------------------------------------------------------
# Cause 1: exploding gradients (a too-high base_lr), with and without debug_info.

@pytest.mark.parametrize("debug_info", [True, False])
def test_diverging_lr(caffe_train, tmp_path, debug_info):
    log, result = train_log(caffe_train, tmp_path, "diverging.log", DIVERGING_NET.replace("LAYER", ""),
                            base_lr=0.1, max_iter=40, display=1,
                            debug_info="true" if debug_info else "false")
    assert result.returncode == 0
    status, doc = diagnose_json(log)
    assert status == 1
    found = rules(doc)
    assert found["SL802"]["cause"] == "exploding gradients"
    assert found["SL802"]["rise"] > 1e10
    assert "lower base_lr (0.1) by at least 10x" in found["SL802"]["fix"]
    assert "SL803" not in found and "SL801" not in found
    if debug_info:
        # The squared error overflows first: the loss layer is the first non-finite output,
        # and fc's weight gradient is the one that grew (the only learnable layer).
        assert found["SL804"]["layer"] == "loss" and found["SL804"]["blob"] == "loss"
        assert found["SL805"]["layer"] == "fc" and found["SL805"]["growth"] > 1e3
        assert doc["forward_order"] == ["data", "fc", "loss"]
        assert doc["debug_info_iterations"] == 41
    else:
        assert "SL804" not in found and "SL805" not in found
    assert doc["first_nonfinite"]["iteration"] == found["SL802"]["iteration"]
    assert_evidence_is_the_log(doc, log)


# ---------------------------------------------------------------------------------------
# Cause 2: a bad learning-rate policy.

POLY_SCRIPT = """
import sys, caffe
caffe.set_mode_cpu()
solver = caffe.SGDSolver(sys.argv[1])
solver.step(3)
"""


def test_poly_without_max_iter_through_pycaffe(caffe, write_solver, tmp_path):
    solver = write_solver(DIVERGING_NET.replace("LAYER", ""), base_lr=0.01, lr_policy='"poly"',
                          power=0.9, display=1, max_iter=0)
    text = solver.read_text()
    solver.write_text("\n".join(l for l in text.splitlines() if not l.startswith("max_iter")) + "\n")
    env = dict(os.environ, GLOG_minloglevel="0")
    result = subprocess.run([sys.executable, "-c", POLY_SCRIPT, str(solver)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    log = tmp_path / "pycaffe.log"
    log.write_text(result.stderr)
    assert re.search(r"Iteration 0, lr = -?nan", result.stderr)
    status, doc = diagnose_json(log)
    assert status == 1
    found = rules(doc)
    assert set(found) == {"SL801"}
    finding = found["SL801"]
    assert finding["policy"] == "poly" and finding["field"] == "max_iter"
    assert finding["iteration"] == 0
    quoted = [item["text"] for item in finding["evidence"]]
    assert any(re.search(r"Iteration 0, lr = -?nan", q) for q in quoted)
    assert any(q.startswith("lr_policy") for q in quoted)
    assert_evidence_is_the_log(doc, log)


WATCHED_POLY_SCRIPT = """
import sys, caffe, safe_layers
caffe.set_mode_cpu()
solver = caffe.SGDSolver(sys.argv[1])
safe_layers.watch(solver, solver_file=sys.argv[1])
solver.step(3)
"""


def test_poly_without_max_iter_stopped_by_a_watch(caffe, write_solver, tmp_path):
    """Under a watch the rate is checked before Caffe logs it: the run stops at iteration 0
    with the watch's 'lr' line and no "lr = nan" of Caffe's. diagnose still names the
    policy and the field (SL801), from that line, and says the watch stopped the run."""
    solver = write_solver(DIVERGING_NET.replace("LAYER", ""), base_lr=0.01, lr_policy='"poly"',
                          power=0.9, display=1, max_iter=0)
    env = dict(os.environ, GLOG_minloglevel="0")
    result = subprocess.run([sys.executable, "-c", WATCHED_POLY_SCRIPT, str(solver)], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "NonFiniteError" in result.stderr, result.stderr[-2000:]
    assert not re.search(r"Iteration 0, lr = ", result.stderr)
    log = tmp_path / "watched.log"
    log.write_text(result.stderr)
    status, doc = diagnose_json(log)
    assert status == 1
    found = rules(doc)
    assert set(found) == {"SL801", "SL814"}
    finding = found["SL801"]
    assert finding["policy"] == "poly" and finding["field"] == "max_iter"
    assert finding["iteration"] == 0 and finding["lr"] == "nan"
    quoted = [item["text"] for item in finding["evidence"]]
    assert any("WATCH lr in TRAIN, iteration 0" in q for q in quoted)
    assert "stopped the run at iteration 0" in found["SL814"]["message"]
    assert_evidence_is_the_log(doc, log)


def test_exp_gamma_above_one(caffe_train, tmp_path):
    log, _ = train_log(caffe_train, tmp_path, "exp.log",
                       DIVERGING_NET.replace("LAYER", "").replace("std: 10", "std: 0.01"),
                       base_lr=0.01, lr_policy='"exp"', gamma=1e10, max_iter=8, display=1)
    status, doc = diagnose_json(log)
    found = rules(doc)
    assert status == 1 and found["SL801"]["policy"] == "exp" and found["SL801"]["field"] == "gamma"


def test_a_policy_caffe_aborts_on_names_the_field(caffe_train, tmp_path):
    """`inv` with a negative gamma: SGDSolver::GetLearningRate CHECK-fails at the first
    update. The abort names the policy and the field, with the solver line as evidence."""
    log, result = train_log(caffe_train, tmp_path, "inv.log", DIVERGING_NET.replace("LAYER", ""),
                            base_lr=0.01, lr_policy='"inv"', gamma=-0.5, power=0.75, max_iter=8,
                            display=1)
    assert result.returncode != 0 and "param_.gamma() >= 0" in result.stderr
    status, doc = diagnose_json(log)
    aborted = rules(doc)["SL808"]
    assert status == 1 and aborted["cause"] == "bad learning-rate policy"
    assert (aborted["policy"], aborted["field"]) == ("inv", "gamma")
    assert 'lr_policy "inv"): fix gamma in the solver' in aborted["fix"]
    assert any(item["text"].strip() == "gamma: -0.5" for item in aborted["evidence"])
    assert_evidence_is_the_log(doc, log)


def test_max_iter_zero_trains_nothing(caffe_train, tmp_path):
    """`caffe train` with max_iter 0 (the proto default when it is left out) runs Step(0):
    a final loss and test of the untrained net, "Optimization Done.", exit 0."""
    net = DIVERGING_NET.replace("LAYER", "").replace("std: 10", "std: 0.01")
    log, result = train_log(caffe_train, tmp_path, "idle.log", net, max_iter=0, display=1)
    assert result.returncode == 0 and "Optimization Done." in result.stderr
    status, doc = diagnose_json(log)
    assert status == 1 and list(rules(doc)) == ["SL812"]
    assert "max_iter is 0" in rules(doc)["SL812"]["message"]
    assert_evidence_is_the_log(doc, log)
    # The same net trained for three iterations: nothing to say.
    log, result = train_log(caffe_train, tmp_path, "three.log", net, max_iter=3, display=1)
    status, doc = diagnose_json(log)
    assert result.returncode == 0 and status == 0 and doc["findings"] == []


def test_lr_reaching_zero_and_gradient_clipping(caffe_train, tmp_path):
    log, result = train_log(caffe_train, tmp_path, "multistep.log", DIVERGING_NET.replace("LAYER", ""),
                            base_lr=0.01, lr_policy='"multistep"', stepvalue=5, gamma=0,
                            clip_gradients=1, max_iter=10, display=1)
    assert result.returncode == 0
    assert "MultiStep Status: Iteration 5, step = 1" in result.stderr
    status, doc = diagnose_json(log)
    assert status == 0  # nothing non-finite: a warning and a note
    found = rules(doc)
    assert set(found) == {"SL810", "SL811"}
    assert found["SL811"]["severity"] == "warning" and found["SL811"]["iteration"] == 5
    clips = result.stderr.count("Gradient clipping: scaling down gradients")
    assert clips > 0 and found["SL810"]["clips"] == clips


# ---------------------------------------------------------------------------------------
# Cause 4: a NaN in the input, on the published LeNet, read from an LMDB.

def digits(n, seed):
    """MNIST-shaped uint8 images whose class is a bright square's place: learnable fast."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels):
        row, col = 2 + (label % 5) * 5, 3 + (label // 5) * 13
        image[row:row + 5, col:col + 9] = 230
    return images, labels


POISONED_POSITION = 64 * 14 + 17   # LeNet's batch is 64: iteration 14


GUARD = """
layer {
  name: "data_guard" type: "Python" bottom: "data" top: "data"
  include { phase: TRAIN }
  python_param { module: "safe_layers" layer: "NaNGuard"
                 param_str: "{name: data_guard, follows: mnist, action: ACTION}" }
}
"""

WATCH_SCRIPT = """
import sys, caffe, safe_layers
caffe.set_mode_cpu()
solver = caffe.get_solver(sys.argv[1])
watch = safe_layers.watch(solver, solver_file=sys.argv[1], on_nonfinite="skip")
solver.step(18)
"""


def lenet_work(work, poison="train", debug_info=True, guard=None):
    """A folder laid out as Caffe's MNIST example expects (run from it): LMDBs written
    by Caffe's convert_mnist_data, one record then replaced by a float Datum holding a
    NaN (``poison``: "train" at POISONED_POSITION, "test" at 150, the second test batch),
    LeNet as published (tests/data) with an optional NaNGuard after its TRAIN data layer
    (``guard``: its action), and a solver of 18 iterations displaying every one."""
    import lmdb
    (work / "examples" / "mnist").mkdir(parents=True)
    images, labels = digits(64 * 20, seed=7)
    train = convert_mnist(work / "examples/mnist/mnist_train_lmdb", images, labels, "lmdb")
    test_images, test_labels = digits(200, seed=8)
    test = convert_mnist(work / "examples/mnist/mnist_test_lmdb", test_images, test_labels, "lmdb")
    db, position, source = (test, 150, test_images) if poison == "test" else (
        train, POISONED_POSITION, images)
    poisoned = source[position].astype(np.float32)[None]
    poisoned[0, 10, 12] = np.nan
    env = lmdb.open(str(db), map_size=1 << 28)
    with env.begin(write=True) as txn:
        txn.put(b"%08d" % position, datum(poisoned, 0).SerializeToString())
    env.close()
    text = (DATA / "lenet_train_test.prototxt").read_text()
    if guard:
        at = text.index('layer {\n  name: "conv1"')
        text = text[:at] + GUARD.replace("ACTION", guard).lstrip() + text[at:]
    net = work / "lenet_train_test.prototxt"
    net.write_text(text)
    tests = dict(test_iter=2, test_interval=5) if poison == "test" else dict(test_iter=1,
                                                                             test_interval=1000)
    solver = work / "solver.prototxt"
    solver.write_text(solver_text(net, base_lr=0.01, momentum=0.9, weight_decay=0.0005,
                                  lr_policy='"inv"', gamma=0.0001, power=0.75, display=1, max_iter=18,
                                  debug_info="true" if debug_info else "false", **tests))
    return solver


def run_logged(command, work):
    """Run ``command`` in ``work`` with glog on stderr; (log path, returncode)."""
    result = subprocess.run(command, cwd=work, env=dict(os.environ, GLOG_minloglevel="0"),
                            capture_output=True, text=True, timeout=600)
    log = work / "train.log"
    log.write_text(result.stderr)
    return log, result.returncode


@pytest.fixture(scope="module")
def lenet_runs(tmp_path_factory):
    """`caffe train` of LeNet with a NaN in one record: True / False (debug_info on / off),
    "test" (the NaN in the test set, debug_info on). {key: (log, workdir, returncode)}."""
    import caffe  # noqa: F401 - skip/fail like the other Caffe tests
    binary = Path(sys.executable).parent / "caffe"
    runs = {}
    for key in (True, False, "test"):
        work = tmp_path_factory.mktemp("lenet_%s" % key)
        solver = lenet_work(work, poison="test" if key == "test" else "train", debug_info=key is not False)
        log, returncode = run_logged([str(binary), "train", "-solver", str(solver)], work)
        # The NaN reaches LeNet's MAX pooling, whose CPU backward then writes outside the
        # blob (caffe-internals.md §8): the run may die of heap corruption after it ends.
        assert "Iteration 18, loss" in log.read_text(), log.read_text()[-3000:]
        runs[key] = (log, work, returncode)
    return runs


@pytest.mark.parametrize("debug_info", [True, False])
def test_nan_in_the_input_lenet(lenet_runs, debug_info, monkeypatch):
    log, work, returncode = lenet_runs[debug_info]
    status, doc = diagnose_json(log)
    assert status == 1
    found = rules(doc)
    cause = found["SL803"]
    assert cause["cause"] == "faulty input or loss layer"
    assert cause["iteration"] == POISONED_POSITION // 64
    assert "fell from" in cause["message"]
    assert cause["sources"] == ["examples/mnist/mnist_train_lmdb"]
    assert "safe-layers scan examples/mnist/mnist_train_lmdb" in cause["fix"]
    assert "NaNGuard" in cause["fix"] and "mnist" in cause["fix"]
    start, end = cause["record_positions"]
    assert start <= POISONED_POSITION <= end and end - start == 63
    assert "SL802" not in found and "SL801" not in found
    if debug_info:
        # The data layer's own top is the first non-finite value in forward order.
        assert found["SL804"]["layer"] == "mnist" and found["SL804"]["blob"] == "data"
        assert "the input itself" in found["SL804"]["message"]
        assert doc["forward_order"][:3] == ["mnist", "conv1", "pool1"]
    else:
        assert "SL804" not in found
    if returncode != 0:
        assert "MAX pooling (pool1, pool2)" in found["SL808"]["message"]
    else:
        assert "SL808" not in found
    assert_evidence_is_the_log(doc, log)
    # And scan, as advised, finds that very record.
    monkeypatch.chdir(work)
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["scan", "examples/mnist/mnist_train_lmdb", "--format", "json"]) == 1
    [bad] = json.loads(out.getvalue())["findings"]
    assert bad["rule"] == "SL901" and bad["position"] == POISONED_POSITION
    assert start <= bad["position"] <= end
    # Given the published net itself, scan reads both of its data layers' sources, with
    # LeNet's 10 classes (ip2's num_output) and batch sizes.
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["scan", "lenet_train_test.prototxt", "--format", "json",
                         "--select", "SL9"]) == 1
    document = json.loads(out.getvalue())
    assert [(f["rule"], f["position"]) for f in document["findings"]] == [("SL901", POISONED_POSITION)]
    sources = {s["path"]: s for s in document["sources"]}
    assert set(sources) == {"examples/mnist/mnist_train_lmdb", "examples/mnist/mnist_test_lmdb"}
    assert sources["examples/mnist/mnist_train_lmdb"]["num_classes"] == 10
    assert sources["examples/mnist/mnist_train_lmdb"]["labels"]["batch_size"] == 64
    assert sources["examples/mnist/mnist_test_lmdb"]["labels"]["batch_size"] == 100


def _set_fields(solver, **fields):
    """The solver file with these fields replaced or added."""
    lines = [l for l in solver.read_text().splitlines() if l.split(":")[0] not in fields]
    solver.write_text("\n".join(lines + ["%s: %s" % kv for kv in fields.items()]) + "\n")


def test_records_of_a_resumed_run_and_of_a_sparse_display(tmp_path):
    """Caffe keeps no data cursor: a run resumed at iteration 5 reads record 0 again
    there, so the poisoned record 913 (iteration 14 from the start) comes at iteration 19.
    With display 5 the first bad iteration is not in the log: the records of every
    iteration since the last finite loss are named."""
    binary = Path(sys.executable).parent / "caffe"
    work = tmp_path / "resume"
    work.mkdir()
    solver = lenet_work(work, debug_info=False)
    _set_fields(solver, max_iter=5, snapshot=5, snapshot_prefix='"snap"')
    _, returncode = run_logged([str(binary), "train", "-solver", str(solver)], work)
    assert returncode == 0 and (work / "snap_iter_5.solverstate").exists()
    _set_fields(solver, max_iter=22, snapshot=0)
    log, _ = run_logged([str(binary), "train", "-solver", str(solver), "-snapshot",
                         "snap_iter_5.solverstate"], work)
    assert "Resuming from snap_iter_5.solverstate" in log.read_text()
    status, doc = diagnose_json(log)
    cause = rules(doc)["SL803"]
    assert cause["iteration"] == 5 + POISONED_POSITION // 64
    assert cause["record_positions"] == [896, 959]  # record 913: (19 - 5) * 64 + 17
    assert "counted from iteration 5, where the run resumed" in cause["fix"]

    work = tmp_path / "display"
    work.mkdir()
    solver = lenet_work(work, debug_info=False)
    _set_fields(solver, display=5)
    log, _ = run_logged([str(binary), "train", "-solver", str(solver)], work)
    status, doc = diagnose_json(log)
    cause = rules(doc)["SL803"]
    assert cause["iteration"] == 15  # the first bad loss logged: iteration 14's is not shown
    assert "it went non-finite in iterations 11-15" in cause["message"]
    start, end = cause["record_positions"]
    assert (start, end) == (11 * 64, 16 * 64 - 1) and start <= POISONED_POSITION <= end
    assert_evidence_is_the_log(doc, log)


def test_runs_appended_to_one_log_are_told_apart(lenet_runs, caffe_train, tmp_path):
    """`caffe train ... 2>> train.log` twice: the verdict is about the last run, with its
    own solver settings and records, and says the file holds two."""
    poisoned = lenet_runs[False][0].read_text()
    diverging, _ = train_log(caffe_train, tmp_path, "diverging.log", DIVERGING_NET.replace("LAYER", ""),
                             base_lr=0.1, max_iter=40, display=1)
    both = tmp_path / "both.log"
    both.write_text(poisoned + diverging.read_text())
    status, doc = diagnose_json(both)
    found = rules(doc)
    assert set(found) == {"SL802"} and "lower base_lr (0.1)" in found["SL802"]["fix"]
    second = len(poisoned.splitlines()) + 1
    assert doc["runs"][-1] > second - 5 and len(doc["runs"]) == 2
    assert all(item["line"] > second for item in found["SL802"]["evidence"])
    both.write_text(diverging.read_text() + poisoned)
    status, doc = diagnose_json(both)
    found = rules(doc)
    assert found["SL803"]["iteration"] == POISONED_POSITION // 64
    assert "lower base_lr" not in json.dumps(found) and "training went on" not in found["SL803"]["message"]
    status, out, _ = run_diagnose(both)
    assert "holding 2 runs" in out


# ---------------------------------------------------------------------------------------
# Cause 5: a pooling window outside its input (the project's own example net).

def test_pooling_geometry_from_the_first_iteration(caffe_train, tmp_path):
    text = (ROOT / "examples/pooling_nan/train.prototxt").read_text()
    unguarded = re.sub(r'layer \{\n  name: "pool1_guard".*?\n\}\n', "", text, flags=re.S)
    assert "NaNGuard" not in unguarded
    log, result = train_log(caffe_train, tmp_path, "pooling.log", unguarded, max_iter=3, display=1,
                            debug_info="true")
    status, doc = diagnose_json(log)
    assert status == 1
    found = rules(doc)
    assert found["SL807"]["iteration"] == 0
    assert found["SL804"]["layer"] == "pool1" and found["SL804"]["iteration"] == 0
    assert "pooling window lying outside it" in found["SL804"]["message"]
    assert "safe-layers lint" in found["SL804"]["fix"]


ACCURACY = """
layer { name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy"
  include { phase: TEST } }
"""


@pytest.mark.parametrize("pool", ["AVE kernel_size: 3 stride: 5", "AVE kernel_size: 3 stride: 3 pad: 1"])
def test_accuracy_beside_a_nan_test_loss(caffe_train, tmp_path, pool):
    """Caffe's Accuracy scores a net whose every score is NaN 1.0 (AccuracyLayer counts
    `score >= score[label]`, false for NaN): the pooling net of cause 5 shows it at every test.
    The test pass of iteration 0 runs before training's iteration 0, on the same weights:
    that is not a test-only fault (no SL809)."""
    text = (ROOT / "examples/pooling_nan/train.prototxt").read_text()
    text = re.sub(r'layer \{\n  name: "pool1_guard".*?\n\}\n', "", text, flags=re.S)
    text = text.replace("AVE kernel_size: 3 stride: 5", pool) + ACCURACY
    log, result = train_log(caffe_train, tmp_path, "accuracy.log", text, max_iter=4, display=1,
                            test_iter=1, test_interval=2)
    assert result.returncode == 0
    status, doc = diagnose_json(log)
    found = rules(doc)
    tests = re.findall(r"Test net output #0: accuracy = (\S+)\n.*Test net output #1: loss = (\S+)",
                       log.read_text())
    assert len(tests) == 3  # iterations 0, 2, 4
    if "stride: 5" in pool:
        assert tests == [("1", "-nan")] * 3
        assert status == 1 and set(found) == {"SL807", "SL813"}
        accuracy = found["SL813"]
        assert accuracy["output"] == "accuracy" and accuracy["passes"] == 3
        assert accuracy["iteration"] == 0 and "at iteration 4 (accuracy = 1)" in accuracy["message"]
        assert "scores 1.0" in accuracy["message"]
        assert_evidence_is_the_log(doc, log)
    else:
        assert all(loss != "-nan" and loss != "nan" for _, loss in tests)
        assert status == 0 and found == {}


# ---------------------------------------------------------------------------------------
# Two losses, one of which explodes.

TWO_LOSSES = """
name: "two_losses"
layer { name: "data_a" type: "DummyData" top: "xa" top: "ta"
  dummy_data_param { shape { dim: 16 dim: 10 } shape { dim: 16 dim: 1 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "data_b" type: "DummyData" top: "xb" top: "tb"
  dummy_data_param { shape { dim: 16 dim: 10 } shape { dim: 16 dim: 1 }
    data_filler { type: "gaussian" std: 10 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "fc_a" type: "InnerProduct" bottom: "xa" top: "ya"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "fc_b" type: "InnerProduct" bottom: "xb" top: "yb"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss_a" type: "EuclideanLoss" bottom: "ya" bottom: "ta" top: "loss_a" }
layer { name: "loss_b" type: "EuclideanLoss" bottom: "yb" bottom: "tb" top: "loss_b"
  loss_weight: 0.5 }
"""


@pytest.mark.parametrize("debug_info", [True, False])
def test_two_losses_one_explodes(caffe_train, tmp_path, debug_info):
    log, result = train_log(caffe_train, tmp_path, "two.log", TWO_LOSSES, base_lr=0.2, max_iter=60,
                            display=1, debug_info="true" if debug_info else "false")
    assert result.returncode == 0
    status, doc = diagnose_json(log)
    assert status == 1
    cause = rules(doc)["SL802"]
    assert cause["output"] == "loss_b" and cause["layer"] == "loss_b"
    assert cause["loss_weight"] == 0.5
    assert "lower the loss_weight of layer 'loss_b' (now 0.5)" in cause["fix"]
    assert "'loss_a' stayed within" in cause["message"]
    if debug_info:
        assert rules(doc)["SL805"]["layer"] == "fc_b"
    assert_evidence_is_the_log(doc, log)


# ---------------------------------------------------------------------------------------
# The run aborted: a Caffe CHECK.

def test_fatal_check(caffe_train, tmp_path):
    net = """
    layer { name: "d" type: "Data" top: "x" top: "l"
            data_param { source: "no_such_lmdb" backend: LMDB batch_size: 2 } }
    layer { name: "s" type: "Silence" bottom: "x" bottom: "l" }
    """
    log, result = train_log(caffe_train, tmp_path, "fatal.log", net, max_iter=2)
    assert result.returncode != 0
    status, doc = diagnose_json(log)
    found = rules(doc)
    assert status == 1 and set(found) == {"SL808"}
    # Caffe's MDB_CHECK in db_lmdb.hpp fails on the missing source.
    assert "Check failed: mdb_status == 0" in found["SL808"]["message"]
    assert found["SL808"]["source"] == "db_lmdb.hpp"


# ---------------------------------------------------------------------------------------
# Logs in every shape: date prefixes, no prefix, truncated, garbage.

@pytest.fixture(scope="module")
def debug_log(lenet_runs):
    return lenet_runs[True][0]


def verdict(document):
    return sorted((f["rule"], f["line"], f.get("layer"), f.get("iteration")) for f in document["findings"])


def test_four_digit_dates_and_no_prefix(debug_log, tmp_path):
    _, original = diagnose_json(debug_log)
    text = debug_log.read_text()
    four = tmp_path / "four.log"
    four.write_text(re.sub(r"^([IWEF])\d{4}(\d{4} )", r"\1\2", text, flags=re.M))
    assert "\nI20" not in four.read_text()[:10000]
    _, document = diagnose_json(four)
    assert verdict(document) == verdict(original)
    bare = tmp_path / "bare.log"  # glog's --log_prefix=false
    bare.write_text(re.sub(r"^[IWEF]\d{8} \S+ +\d+ \S+\] ", "", text, flags=re.M))
    _, document = diagnose_json(bare)
    assert verdict(document) == verdict(original)


def test_truncated_logs(debug_log, tmp_path):
    raw = debug_log.read_bytes()
    _, original = diagnose_json(debug_log)
    bad_line = rules(original)["SL803"]["line"]
    lines = raw.split(b"\n")
    # Cut in the middle of a line well after the NaN: the same verdict, the cut line noted.
    after = b"\n".join(lines[:bad_line + 40]) + b"\n" + lines[bad_line + 40][:25]
    cut = tmp_path / "cut_after.log"
    cut.write_bytes(after)
    status, document = diagnose_json(cut)
    assert status == 1 and rules(document)["SL803"]["iteration"] == rules(original)["SL803"]["iteration"]
    assert document["incomplete_last_line"] == bad_line + 41 and not document["finished"]
    # Cut before the NaN: nothing wrong yet, and the log is said to be unfinished.
    before = tmp_path / "cut_before.log"
    before.write_bytes(b"\n".join(lines[:bad_line - 200]) + b"\n" + lines[bad_line - 200][:7])
    status, out, _ = run_diagnose(before)
    assert status == 0
    assert "ends without 'Optimization Done.'" in out and "has no newline" in out
    # Cut inside the solver's parameter block.
    block = tmp_path / "cut_block.log"
    block.write_bytes(b"\n".join(lines[:6]) + b"\n")
    assert run_diagnose(block)[0] == 0


def test_gzipped_and_piped_logs(debug_log, tmp_path):
    """A rotated `train.log.gz` is read as it streams, and `-` reads standard input; a
    gzip stream cut short exits 2 saying so."""
    import gzip
    expected = verdict(diagnose_json(debug_log)[1])
    packed = tmp_path / "train.log.gz"
    packed.write_bytes(gzip.compress(debug_log.read_bytes()))
    assert verdict(diagnose_json(packed)[1]) == expected
    piped = subprocess.run([sys.executable, "-m", "safe_layers.tools.cli", "diagnose", "-", "--format",
                            "json"], stdin=open(debug_log, "rb"), capture_output=True, text=True,
                           timeout=300)
    assert piped.returncode == 1 and verdict(json.loads(piped.stdout)) == expected
    # Cut short: what was read is diagnosed (the NaN lies in its first half), and where it
    # was cut is said.
    lines = debug_log.read_bytes().splitlines(keepends=True)
    bad_line = rules(diagnose_json(debug_log)[1])["SL803"]["line"]
    packer = zlib.compressobj(wbits=31)
    head = packer.compress(b"".join(lines[:bad_line + 20])) + packer.flush(zlib.Z_FULL_FLUSH)
    tail = packer.compress(b"".join(lines[bad_line + 20:])) + packer.flush()
    cut = tmp_path / "cut.log.gz"
    cut.write_bytes(head + tail[:len(tail) // 2])
    status, out, err = run_diagnose(cut)
    assert status == 1 and "SL8" in out
    assert re.search(r"warning: .*cut\.log\.gz: the gzip stream is cut short at byte \d+, after "
                     r"line \d+: diagnosed the \d+ lines before it", err), err
    # Cut before any line came out: nothing to diagnose, exit 2.
    cut.write_bytes(packed.read_bytes()[:12])
    status, out, err = run_diagnose(cut)
    assert status == 2 and "the gzip stream is cut short at byte 12, before its first line" in err
    # Two members, as `cat a.gz b.gz` makes them: both read.
    both = tmp_path / "both.log.gz"
    half = len(debug_log.read_bytes()) // 2
    both.write_bytes(gzip.compress(debug_log.read_bytes()[:half]) +
                     gzip.compress(debug_log.read_bytes()[half:]))
    assert verdict(diagnose_json(both)[1]) == expected


def test_garbage(debug_log, tmp_path):
    rng = random.Random(3)
    junk = tmp_path / "random.bin"
    junk.write_bytes(bytes(rng.randrange(256) for _ in range(200000)))
    status, _, err = run_diagnose(junk)
    assert status == 2 and "not a Caffe log" in err
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")
    assert run_diagnose(empty)[0] == 2
    assert run_diagnose(tmp_path)[0] == 2
    status, _, err = run_diagnose(tmp_path / "missing.log")
    assert status == 2 and "no such file" in err
    # Garbage lines between the real ones change nothing.
    _, original = diagnose_json(debug_log)
    mixed_lines = []
    noise = [b"\x00\xff\xfe garbage \x80\x81", b"I20261125 12:00:00.000000  1 solver.cpp:239] Iteration x, loss = y",
             b"    Train net output #0: loss = banana", b"random text Iteration", b"[Forward] Layer",
             b"E1125 10:00:00.123456 99 foo.cc:1] something unknown", b"A" * 200000]
    for i, line in enumerate(debug_log.read_bytes().split(b"\n")):
        mixed_lines.append(line)
        if i % 3 == 0:
            mixed_lines.append(rng.choice(noise))
    mixed = tmp_path / "mixed.log"
    mixed.write_bytes(b"\n".join(mixed_lines))
    _, document = diagnose_json(mixed)
    assert [(f["rule"], f.get("layer"), f.get("iteration")) for f in document["findings"]] == \
        [(f["rule"], f.get("layer"), f.get("iteration")) for f in original["findings"]]


def test_nan_in_the_test_set_only(lenet_runs):
    """The test net's Forward lines (debug_info logs them on every test pass) are not
    training: a NaN there is a test-data fault, and training is not blamed."""
    log, _, returncode = lenet_runs["test"]
    assert returncode == 0
    status, doc = diagnose_json(log)
    assert status == 1
    found = rules(doc)
    assert set(found) == {"SL809", "SL813"}
    assert found["SL809"]["output"] in ("accuracy", "loss") and found["SL809"]["iteration"] == 0
    assert doc["first_nonfinite"] is None
    # One NaN sample among 200 makes every test loss NaN, and Caffe's Accuracy counts that
    # sample as right: each of the 4 test passes (iterations 0, 5, 10, 15) printed an accuracy
    # beside a NaN loss.
    accuracy = found["SL813"]
    assert accuracy["severity"] == "warning" and accuracy["output"] == "accuracy"
    assert accuracy["iteration"] == 0 and accuracy["passes"] == 4
    quoted = [item["text"] for item in accuracy["evidence"]]
    assert len(quoted) == 4 and "accuracy = " in quoted[0] and "loss = -nan" in quoted[1]
    assert "at iteration 15" in accuracy["message"]
    assert_evidence_is_the_log(doc, log)


def test_guarded_lenet_names_the_guard_and_the_data_layer(caffe, tmp_path):
    """A NaNGuard after LeNet's data layer (action: abort) under `caffe train`: our
    report line (read by reporting.parse_line) names the guard, the layer it follows and
    the iteration; the run stopped there."""
    solver = lenet_work(tmp_path, guard="abort", debug_info=False)
    log, returncode = run_logged([str(Path(sys.executable).parent / "caffe"), "train", "-solver",
                                  str(solver)], tmp_path)
    assert returncode == 1
    status, doc = diagnose_json(log)
    assert status == 1
    found = rules(doc)
    report = found["SL806"]
    assert report["layer"] == "mnist" and report["iteration"] == POISONED_POSITION // 64
    assert report["report"]["layer"] == "data_guard" and report["report"]["action"] == "abort"
    assert report["report"]["nan"] == 1 and report["report"]["first_index"] == [17, 0, 10, 12]
    assert "NaNGuard 'data_guard' (after 'mnist') caught non-finite forward data in TRAIN" in report["message"]
    assert "safe-layers scan examples/mnist/mnist_train_lmdb" in report["fix"]
    assert "FaultAbort" in found["SL808"]["message"]   # the abort ended the run
    assert "SL803" not in found      # no NaN ever reached the loss
    assert_evidence_is_the_log(doc, log)


def test_watched_pycaffe_run_names_the_producer(caffe, tmp_path):
    """safe_layers.watch on a pycaffe solver, skipping the bad iteration: its WATCH
    producer line names the data layer; the loss never went non-finite."""
    solver = lenet_work(tmp_path, debug_info=False)
    log, returncode = run_logged([sys.executable, "-c", WATCH_SCRIPT, str(solver)], tmp_path)
    assert returncode == 0, log.read_text()[-3000:]
    assert "WATCH producer" in log.read_text()
    status, doc = diagnose_json(log)
    assert status == 1
    found = rules(doc)
    report = found["SL806"]
    assert report["layer"] == "mnist" and report["report"]["source"] == "watch"
    assert report["iteration"] == POISONED_POSITION // 64
    assert report["report"]["first_index"] == [17, 0, 10, 12]
    # Caffe logged that iteration's NaN loss before the watch skipped it: the cause is
    # named, and that training went on.
    cause = found["SL803"]
    assert cause["iteration"] == POISONED_POSITION // 64
    assert "training went on: the loss is finite again from iteration 14 (a watch skipped" in cause["message"]
    assert "SL802" not in found and "SL808" not in found
    assert_evidence_is_the_log(doc, log)


def test_safe_layers_train_log(caffe, write_solver, tmp_path):
    """`safe-layers train` writes Caffe's own log lines plus the watch's: the same reader
    reads them, the cause from the losses, the layer from the watch's producer line (whose
    inputs are two bottoms here, joined by '; ')."""
    solver = write_solver(DIVERGING_NET.replace("LAYER", ""), base_lr=0.1, max_iter=40, display=1)
    result = subprocess.run([sys.executable, "-m", "safe_layers.tools.cli", "train", "-solver",
                             str(solver), "--no-lint", "--progress", "never"], cwd=tmp_path,
                            env=dict(os.environ, GLOG_minloglevel="0"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    log = tmp_path / "st.log"
    log.write_text(result.stderr + result.stdout)
    status, doc = diagnose_json(log)
    assert status == 1
    found = rules(doc)
    assert found["SL802"]["cause"] == "exploding gradients"
    assert "until a report stopped it" in found["SL802"]["message"]
    watch = found["SL806"]
    assert watch["layer"] == "loss" and watch["report"]["source"] == "watch"
    assert watch["iteration"] == found["SL802"]["iteration"]
    assert "could not be parsed" not in run_diagnose(log)[1]
    assert_evidence_is_the_log(doc, log)


# ---------------------------------------------------------------------------------------
# What a watch did: skips, rollbacks (segments), and who stopped the run.

def safe_layers_train(solver, *options, cwd):
    """`safe-layers train` with its watch options; (log with stderr and stdout, returncode)."""
    result = subprocess.run([sys.executable, "-m", "safe_layers.tools.cli", "train", "-solver",
                             str(solver), "--no-lint", "--progress", "never", *options], cwd=cwd,
                            env=dict(os.environ, GLOG_minloglevel="0"), capture_output=True,
                            text=True, timeout=600)
    log = Path(cwd) / ("%s.log" % Path(solver).stem)
    log.write_text(result.stderr + result.stdout)
    return log, result.returncode


def watch_events(path, kind):
    return [e for e in map(json.loads, Path(path).read_text().splitlines())
            if e.get("event") == "watch" and e.get("kind") == kind]


def diverging_solver(write_solver, tmp_path, prefix):
    """DIVERGING_NET (support/nets.py) at base_lr 0.1: its loss grows ~9-fold per iteration
    and overflows to inf at iteration 19."""
    return write_solver(DIVERGING_NET.replace("LAYER", ""), base_lr=0.1, momentum=0.9, max_iter=60,
                        display=1, snapshot_prefix='"%s"' % (tmp_path / prefix))


def test_skips_and_rollbacks_of_a_run_that_finished(caffe, write_solver, tmp_path, monkeypatch):
    """Skip, then roll back to iteration 0 with base_lr / 100, and train on to the end: the
    cause is read from the iterations before the first fault (the replayed ones after the
    rollback are a new segment, finite and falling), and SL814 says what the watch did."""
    solver = diverging_solver(write_solver, tmp_path, "sk")
    log, returncode = safe_layers_train(solver, "--on-nonfinite", "skip", "--rollback-after", "2",
                                        "--checkpoint-every", "5", "--lr-factor", "0.01", cwd=tmp_path)
    assert returncode == 0, log.read_text()[-3000:]
    text = log.read_text()
    lines = text.splitlines()
    rollback_lines = [n for n, l in enumerate(lines, 1) if "WATCH rollback" in l]
    assert rollback_lines and "Optimization Done." in text
    status, doc = diagnose_json(log)
    assert status == 1
    found = rules(doc)
    cause = found["SL802"]
    assert cause["iteration"] == 19 and cause["rise"] > 1e10
    assert all(item["line"] < rollback_lines[0] for item in cause["evidence"])
    assert "stopped" not in cause["message"]
    assert "until a report caught it at iteration 19" in cause["message"]
    assert doc["first_nonfinite"]["value"] == "inf"
    assert doc["first_nonfinite"]["words"] == "EuclideanLoss 'loss' forward top 'loss' data = inf"
    watched = found["SL814"]
    skips = watch_events(tmp_path / "sk_events.jsonl", "skip")
    rollbacks = watch_events(tmp_path / "sk_events.jsonl", "rollback")
    assert watched["severity"] == "warning" and watched["ended"] == "finished"
    assert watched["skipped"] == len(skips) > 0 and watched["rollbacks"] == len(rollbacks)
    # (the log prints 6 digits of the float32 base_lr the event log holds in full)
    assert [(r["at"], r["to"], r["base_lr_from"], r["base_lr_to"]) for r in watched["rolled_back"]] == [
        (r["from"], r["to"], pytest.approx(r["base_lr_from"], rel=1e-6),
         pytest.approx(r["base_lr_to"], rel=1e-6)) for r in rollbacks]
    assert "from iteration 19 (non-finite loss) to the checkpoint of iteration 0, base_lr 0.1 -> 0.001" \
        in watched["message"]
    assert "the run then finished at iteration 60" in watched["message"]
    assert doc["segments"] == 2 and doc["ended"] == "finished"
    assert_evidence_is_the_log(doc, log)
    status, out, _ = run_diagnose(log)
    assert "in 2 segments (1 rollback)" in out and out.rstrip().endswith("the run finished (Optimization Done.)")
    # The plot's label names the value the report printed, inf (not a placeholder nan).
    import matplotlib.axes
    labels = []
    annotate = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda self, text, *a, **k: labels.append(text) or annotate(self, text, *a, **k))
    assert run_diagnose(log, "--plot", tmp_path / "sk.png")[0] == 1
    assert labels == ["first non-finite: EuclideanLoss 'loss' forward top 'loss' data = inf\n"
                      "iteration 19 (line %d)" % doc["first_nonfinite"]["line"],
                      "rolled back to 0 (line %d)" % watched["rolled_back"][0]["line"]]


def test_the_watch_stopped_the_run(caffe, write_solver, tmp_path):
    """on_nonfinite stop (the default): the run ends at the watch's report, which
    `safe-layers train` prints again as its last line; and a watch that rolled back as
    often as max_rollbacks allows stops too."""
    log, returncode = safe_layers_train(diverging_solver(write_solver, tmp_path, "st"), cwd=tmp_path)
    assert returncode == 1
    lines = log.read_text().splitlines()
    status, doc = diagnose_json(log)
    found = rules(doc)
    assert status == 1 and found["SL802"]["iteration"] == 19
    watched = found["SL814"]
    assert watched["severity"] == "error" and watched["ended"] == "stopped"
    assert watched["stopped_at"] == 19 and watched["skipped"] == 0 and watched["rollbacks"] == 0
    assert "the watch stopped the run at iteration 19: non-finite top 'loss' data" in watched["message"]
    stop_line = watched["line"]
    assert "action=stop" in lines[stop_line - 1] and stop_line < len(lines) - 3  # the watch's, not the echo
    assert doc["report_lines"] == 1          # the echo is the same report
    _, out, _ = run_diagnose(log)
    assert out.rstrip().endswith("the watch stopped the run at iteration 19 (line %d)" % stop_line)
    assert "Optimization Done." not in out
    assert_evidence_is_the_log(doc, log)

    # No checkpoint after iteration 0 (the loss only grows: checkpoint_loss_ratio), so the
    # second rollback goes to that one again; the third fault stops.
    log, returncode = safe_layers_train(diverging_solver(write_solver, tmp_path, "mr"), "--on-nonfinite",
                                        "skip", "--rollback-after", "1", "--checkpoint-every", "5",
                                        "--max-rollbacks", "2", "--lr-factor", "1", cwd=tmp_path)
    assert returncode == 1
    status, doc = diagnose_json(log)
    watched = rules(doc)["SL814"]
    assert watched["ended"] == "stopped" and watched["rollbacks"] == 2 and watched["severity"] == "error"
    assert [(r["to"], r["same_again"], r["at"] > 10) for r in watched["rolled_back"]] == [
        (0, False, True), (0, True, True)]
    assert watched["message"].endswith("2 rollbacks already (max_rollbacks)")
    assert "rolling back did not get past the fault" in watched["fix"]
    assert all(item["line"] < watched["rolled_back"][0]["line"] for item in rules(doc)["SL802"]["evidence"])


def test_text_output_and_plot(debug_log, tmp_path):
    status, out, _ = run_diagnose(debug_log, "--plot", tmp_path / "run.png")
    assert status == 1
    first = out.splitlines()[0]
    assert re.match(r"%s:\d+:1: SL803 error faulty input or loss layer: " % re.escape(str(debug_log)), first)
    assert "evidence for SL803" in out
    status, out, _ = run_diagnose(debug_log, "--ignore", "SL804,SL808")
    assert status == 1 and [l.split(": ")[1].split()[0] for l in out.splitlines() if ": SL8" in l
                            and not l.startswith("evidence")] == ["SL803"]
    status, out, _ = run_diagnose(debug_log, "--select", "SL801")
    assert status == 0 and ": SL8" not in out
    from PIL import Image
    with Image.open(tmp_path / "run.png") as image:
        assert image.format == "PNG"
    status, _, err = run_diagnose(debug_log, "--plot", debug_log)
    assert status == 2 and "would overwrite the log" in err


def test_bad_plot_paths_and_rule_ids_exit_2_before_reading_the_log(debug_log, tmp_path):
    """Checked before the log is read: a missing folder, a folder; a plot named .prototxt
    is still a PNG; a --select / --ignore id that no rule has is a typo, not a filter."""
    for path, what in ((tmp_path / "missing" / "x.png", "does not exist"), (tmp_path, "it is a folder")):
        status, out, err = run_diagnose(debug_log, "--plot", path)
        assert status == 2 and out == "" and what in err and "Traceback" not in err
    status, _, err = run_diagnose(tmp_path / "no.log", "--plot", tmp_path / "missing" / "x.png")
    assert status == 2 and "plot" in err            # the plot path, before the log
    odd = tmp_path / "plot.prototxt"
    assert run_diagnose(debug_log, "--plot", odd)[0] == 1
    assert odd.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for option in ("--select", "--ignore"):
        status, out, err = run_diagnose(debug_log, option, "SL803,SL999")
        assert status == 2 and out == "" and "%s SL999: no such rule" % option in err
    assert run_diagnose(debug_log, "--select", "SL81")[0] == 0      # a prefix of rules is fine


def test_the_rule_list_is_one():
    """diagnose.RULES holds every rule a finding can have; the module docstring and the
    README's table name the same ones."""
    rule_ids = set(diagnose_module.RULES)
    source = Path(diagnose_module.__file__).read_text()
    assert set(re.findall(r'"(SL8\d\d)"', source.split("KNOWN_RULE_IDS")[1])) <= rule_ids
    assert set(re.findall(r"^  (SL8\d\d) ", diagnose_module.__doc__, re.M)) == rule_ids
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## After a run: `safe-layers diagnose`")[1].split("\nExit 0 when")[0]
    assert set(re.findall(r"^\| (SL8\d\d)", section, re.M)) | set(
        re.findall(r"^\| SL8\d\d / (SL8\d\d)", section, re.M)) == rule_ids


def test_list_rules_names_every_rule():
    """`diagnose --list-rules` prints the rule table as lint's does and exits 0; every SL8xx
    id the diagnose package names (each a finding can have) is listed, with its doc."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as stopped:
        cli.main(["diagnose", "--list-rules"])
    assert stopped.value.code == 0 and err.getvalue() == ""
    assert out.getvalue() == "\n".join(rule_table.list_lines("diagnose")) + "\n"
    listed = re.findall(r"^(SL8\d\d)  (error|warning|info) +\S", out.getvalue(), re.M)
    assert len(listed) == len(out.getvalue().splitlines())
    listed = {rule for rule, _ in listed}
    package = Path(diagnose_module.__file__).parent
    named = set()
    for path in package.rglob("*.py"):
        named |= set(re.findall(r'"(SL8\d\d)"', path.read_text()))
    assert named and named <= listed, sorted(named - listed)
    assert listed == set(diagnose_module.RULES) == set(diagnose_module.KNOWN_RULE_IDS)
    assert all(r.doc for r in rule_table.rules_of("diagnose"))


def test_plot_heatmap_only_with_debug_info(lenet_runs, tmp_path):
    from PIL import Image
    sizes = {}
    for debug_info in (True, False):
        log = lenet_runs[debug_info][0]
        png = tmp_path / ("%s.png" % debug_info)
        assert run_diagnose(log, "--plot", png)[0] == 1
        with Image.open(png) as image:
            sizes[debug_info] = image.size
    assert sizes[True][1] > sizes[False][1]  # the third panel: the per-layer heatmap


def test_memory_stays_bounded():
    """Whatever the number of iterations, what a Diagnosis keeps is bounded."""
    from safe_layers.readers.caffe_log import LogEvent as Event
    d = diagnose_module.Diagnosis("synthetic.log")
    line = 0
    for iteration in range(30000):
        for layer in ("data", "conv", "loss"):
            line += 1
            d.feed(Event("forward", line, "x", layer=layer, blob_kind="top", blob=layer, value=1.0 + iteration))
        line += 1
        d.feed(Event("backward", line, "x", layer="conv", blob_kind="param", blob="0", value=0.5))
        line += 1
        d.feed(Event("loss", line, "x", iteration=iteration, value=1.0 / (1 + iteration)))
        line += 1
        d.feed(Event("output", line, "x", phase="TRAIN", index=0, name="loss", value=1.0, weight=1.0,
                     weighted=1.0))
        line += 1
        d.feed(Event("lr", line, "x", iteration=iteration, value=0.01))
    d.finish(line)
    assert len(d.loss.series.points) <= diagnose_module.SERIES_POINTS
    assert len(d.lr_series.points) <= diagnose_module.SERIES_POINTS
    assert len(d.outputs["loss"].series.points) <= diagnose_module.SERIES_POINTS
    assert len(d.heatmap.columns) <= diagnose_module.HEATMAP_COLUMNS
    assert all(len(h) <= diagnose_module.GRADIENT_WINDOW for h in d.gradients.values())
    assert d.block_lines == 0 and d.debug_blocks == 30000
    # The kept points still span the run.
    xs = [x for x, _ in d.loss.series.points]
    assert xs[0] == 0 and xs[-1] > 29000


def synthetic_log(path, losses):
    """A log in `caffe train`'s format whose losses are ``losses`` (one per iteration)."""
    lines = ["I20261125 10:00:00.000001  7 solver.cpp:45] Initializing solver from parameters: ",
             "base_lr: 0.05", 'lr_policy: "fixed"',
             "I20261125 10:00:00.000002  7 solver.cpp:289] Solving synthetic"]
    for iteration, loss in enumerate(losses):
        lines.append("I20261125 10:00:01.%06d  7 solver.cpp:239] Iteration %d (9 iter/s, 0.1s/1 iters), "
                     "loss = %s" % (iteration, iteration, loss))
        lines.append("I20261125 10:00:01.%06d  7 solver.cpp:258]     Train net output #0: loss = %s "
                     "(* 1 = %s loss)" % (iteration, loss, loss))
        lines.append("I20261125 10:00:01.%06d  7 sgd_solver.cpp:112] Iteration %d, lr = 0.05"
                     % (iteration, iteration))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("losses, rule", [
    (["1", "10", "100", "1000", "10000", "-nan"], "SL802"),     # four orders of magnitude
    (["1", "8", "60", "150", "nan"], "SL802"),                 # 150x: two orders
    (["1", "5", "50", "nan"], "SL802"),                        # 50x: more than an order of magnitude
    (["1", "3", "20", "inf"], "SL802"),                        # an overflow after a 20x rise
    (["1", "3", "9", "inf"], "SL803"),                         # an overflow after less than 10x
    (["1", "2", "4", "nan"], "SL803"),                         # 4x: rose, but not an explosion
    (["2.3", "0.5", "0.05", "0.6", "0.08", "nan"], "SL803"),   # 12x above its minimum, not above its start
    # examples/demo.py high_lr, a softmax classifier at base_lr 10 under `caffe train`
    # (every 5th iteration): 31x above the first loss, then NaN.
    (["2.31229", "68.6884", "19.0303", "9.06676", "72.8139", "9.22389", "-nan"], "SL802"),
    (["2.3", "1.5", "0.9", "0.7", "nan"], "SL803"),            # falling, then sudden
    (["1.0", "1.1", "0.9", "1.0", "-nan"], "SL803"),           # flat, then sudden
    (["nan", "nan"], "SL807"),                                 # from the first iteration
    (["1", "10", "100", "1000", "10000"], "SL802"),            # no NaN yet, still climbing
    (["1", "10", "100", "1000", "2"], None),                   # it came back down
    (["1", "3", "9", "27", "81"], None),                       # under 1000x
])
def test_trend_thresholds(tmp_path, losses, rule):
    status, doc = diagnose_json(synthetic_log(tmp_path / "synthetic.log", losses))
    assert [f["rule"] for f in doc["findings"]] == ([rule] if rule else [])
    bad = [i for i, v in enumerate(losses) if v.lstrip("-") in ("nan", "inf")]
    if bad:
        assert status == 1 and doc["findings"][0]["iteration"] == bad[0]
    else:
        # Warnings only: still climbing is said, not an error (nothing is lost yet).
        assert status == 0
        if rule:
            assert doc["findings"][0]["severity"] == "warning"
            assert doc["findings"][0]["iteration"] == len(losses) - 1


def test_a_rise_below_an_order_of_magnitude_is_said_as_a_rise(tmp_path):
    status, doc = diagnose_json(synthetic_log(tmp_path / "synthetic.log", ["1", "2", "4", "nan"]))
    [finding] = doc["findings"]
    assert finding["rule"] == "SL803"
    assert "the loss rose from 1 (iteration 0) to 4 (iteration 2), 4.0x" in finding["message"]


def test_a_log_appended_to_many_times_is_read_in_bounded_memory(tmp_path):
    """Each "Initializing solver" starts a run; the runs before the last are counted and
    named by their first and last few, never all kept."""
    from safe_layers.tools.diagnose.series import RunStarts
    starts = RunStarts()
    for line in range(1, 100001):
        starts.append(line)
    assert len(starts) == 100000 and len(starts.shown()) == 2 * RunStarts.KEPT + 1
    assert starts.shown()[:2] == [1, 2] and starts.shown()[RunStarts.KEPT] is None
    assert starts.shown()[-1] == 100000
    run = ("I20261207 01:00:00.000000  1 solver.cpp:45] Initializing solver from parameters:\n"
           "I20261207 01:00:00.000000  1 solver.cpp:239] Iteration 0 (0 iter/s), loss = 2.3\n")
    log = tmp_path / "appended.log"
    log.write_text(run * 30)
    status, document = diagnose_json(log)
    assert document["run_count"] == 30 and len(document["runs"]) == 2 * RunStarts.KEPT + 1
    assert document["runs"][:2] == [1, 3] and document["runs"][-1] == 59
    status, out, _ = run_diagnose(log)
    assert "holding 30 runs (each from an \"Initializing solver\" line: 1, 3," in out
    assert ", ..., " in out and "this is about the last, from line 59" in out

