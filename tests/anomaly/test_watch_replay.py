"""check_layers 'replay' (the default) against 'always': the same reports, field for field,
on real faults of real nets; a fault a replay cannot reproduce is said to be one."""

import json

import numpy as np
import pytest

from safe_layers.anomaly import NonFiniteError, watch
from safe_layers.core.float_text import jsonable
from support.nets import POOLING_NET, guarded_poison_net, poison_layer, regression_net
from support.published import published_net, published_solver_fields
from support.weights import assert_bit_equal, weights

LENET = "lenet_train_test.prototxt"
CIFAR = "cifar10_quick_train_test.prototxt"
BATCH = 8

# BatchNorm with eps 0 on a batch whose channel is constant: var 0, (x - mu) / sqrt(0) = 0/0.
BATCH_NORM_NET = """
name: "bn_constant"
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 4 dim: 3 dim: 2 dim: 2 } shape { dim: 4 dim: 5 }
    data_filler { type: "constant" value: 0.5 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "conv" type: "Convolution" bottom: "x" top: "c"
  convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" batch_norm_param { eps: 0 } }
layer { name: "fc" type: "InnerProduct" bottom: "c" top: "y"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "l" }
"""

# InfogainLoss whose true class gets probability 0 (logits spread by weights of std 1000:
# the softmax underflows, the loss takes log(1e-20) = -46) with an information gain of 1e37
# in H: 46 x 1e37 overflows float32, the loss is +inf.
INFOGAIN_NET = """
name: "infogain_zero"
layer { name: "data" type: "DummyData" top: "x" top: "label"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 }
    data_filler { type: "uniform" min: 0 max: 1 } data_filler { type: "constant" value: 0 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "logits"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1000 } } }
layer { name: "H" type: "DummyData" top: "H"
  dummy_data_param { shape { dim: 1 dim: 1 dim: 3 dim: 3 }
    data_filler { type: "constant" value: 1e37 } } }
layer { name: "loss" type: "InfogainLoss" bottom: "logits" bottom: "label" bottom: "H"
  top: "loss" propagate_down: true propagate_down: false propagate_down: false }
"""


def reports(w):
    """Every report of a watch, field for field (NaN spelled out, so that it compares)."""
    return [json.dumps(jsonable(f.as_dict()), sort_keys=True) for f in w.faults]


def run(solver, path, mode, steps, **options):
    """(reports, NonFiniteError report or None, weights after) of ``steps`` under a watch."""
    w = watch(solver, solver_file=path, check_layers=mode, log_first=0, **options)
    stopped = None
    try:
        solver.step(steps)
    except NonFiniteError as caught:
        stopped = json.dumps(jsonable(caught.report.as_dict()), sort_keys=True)
    found = reports(w), stopped, weights(solver.net), int(solver.iter), w
    w.close()
    return found


@pytest.fixture
def lenet_nan_sample(caffe, write_solver, tmp_path):
    """LeNet serving arrays, a NaN pixel in sample 5 of batch 3."""
    rng = np.random.RandomState(0)
    data = rng.uniform(0, 1, (8 * BATCH, 1, 28, 28)).astype(np.float32)
    data[3 * BATCH + 5, 0, 3, 4] = np.nan
    labels = rng.randint(0, 10, 8 * BATCH).astype(np.float32)
    arrays = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(arrays[0], data)
    np.save(arrays[1], labels)
    net = published_net(LENET, data="array", batch=BATCH, arrays=arrays, phase_only="TRAIN")
    path = write_solver(net, **published_solver_fields("lenet_solver.prototxt"))
    return lambda: (caffe.get_solver(str(path)), path)


def cifar_lr_10(caffe, write_solver, tmp_path):
    net = published_net(CIFAR, data="dummy", batch=4, phase_only="TRAIN")
    fields = published_solver_fields("cifar10_quick_solver.prototxt")
    fields.update(base_lr=10, snapshot_prefix='"%s"' % (tmp_path / "ck"))
    path = write_solver(net, **fields)
    return lambda: (caffe.get_solver(str(path)), path)


def small(text, **fields):
    def build(caffe, write_solver, tmp_path):
        path = write_solver(text, **fields)
        return lambda: (caffe.get_solver(str(path)), path)
    return build


SCENARIOS = {
    "cifar_base_lr_10": (cifar_lr_10, 30),
    "pooling_outside_input": (small(POOLING_NET), 3),
    "batch_norm_constant_batch": (small(BATCH_NORM_NET), 3),
    "infogain_zero_probability": (small(INFOGAIN_NET), 3),
}


def same_in_both_modes(build, steps, options):
    results = {}
    for mode in ("always", "replay"):
        solver, path = build()
        results[mode] = run(solver, path, mode, steps, **options)
    always, replay = results["always"], results["replay"]
    assert always[0], "the scenario has no fault"
    assert replay[0] == always[0]          # every report, field for field
    assert replay[1] == always[1]          # the report it stopped with
    assert replay[3] == always[3]          # iter
    assert_bit_equal(replay[2], always[2])  # the weights after it all
    return results


@pytest.mark.parametrize("options", [{}, {"on_nonfinite": "skip", "max_skips": 2},
                                     {"on_nonfinite": "warn"}], ids=["stop", "skip", "warn"])
def test_a_nan_sample_reports_the_same_in_both_modes(lenet_nan_sample, options):
    results = same_in_both_modes(lenet_nan_sample, 5, options)
    producer = json.loads(results["replay"][0][0])
    assert (producer["layer"], producer["blob"], producer["pass"]) == ("mnist", "data", "forward")
    assert producer["iteration"] == 3 and producer["samples"] == [5]
    assert producer["first_index"] == [5, 0, 3, 4]
    replays = [e for e in results["replay"][4].events if e.kind == "replay"]
    assert replays[0].details["reproduced"] and replays[0].details["seconds"] > 0


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.parametrize("options", [{}, {"on_nonfinite": "skip", "max_skips": 2}],
                         ids=["stop", "skip"])
def test_scenarios_report_the_same_in_both_modes(name, options, caffe, write_solver, tmp_path):
    maker, steps = SCENARIOS[name]
    results = same_in_both_modes(maker(caffe, write_solver, tmp_path), steps, options)
    assert any(json.loads(r)["kind"] == "producer" for r in results["replay"][0])


# A Dropout whose mask alone makes the fault: Log of a unit Dropout dropped is log(0) =
# -inf. With 4 units kept at p = 0.5 all four are dropped one pass in 16; the replay
# draws a new mask.
DROPOUT_NET = """
name: "dropout_log"
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 1 dim: 4 } shape { dim: 1 dim: 1 }
    data_filler { type: "constant" value: 1 } data_filler { type: "constant" value: 0 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "h"
  inner_product_param { num_output: 4 weight_filler { type: "constant" value: 0.25 } } }
layer { name: "drop" type: "Dropout" bottom: "h" top: "d" dropout_param { dropout_ratio: 0.5 } }
layer { name: "sum" type: "Reduction" bottom: "d" top: "s" reduction_param { axis: 1 } }
layer { name: "log" type: "Log" bottom: "s" top: "y" }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "l" }
"""


def test_a_fault_the_replay_cannot_reproduce_is_said_so(caffe, write_solver):
    path = write_solver(DROPOUT_NET.replace("dim: 1 dim: 1 }", "dim: 1 }"), base_lr=0)
    w = watch(str(path), on_nonfinite="skip", max_skips=1000, log_first=0)
    w.solver.step(60)
    replays = [e for e in w.events if e.kind == "replay"]
    assert replays and w.skipped
    missed = [e for e in replays if not e.details["reproduced"]]
    assert missed and missed[0].details["random_layers"] == ["drop"]
    fault = next(f for f in w.faults if f.kind in ("loss", "gradients") and f.iteration == missed[0].iteration)
    assert "the replay of this iteration with every layer checked found every value finite" \
        in fault.message and "random layers drew anew (drop)" in fault.message
    assert fault.details["replay"] == "not reproduced"
    w.close()


# A poisoned sample caught by a NaNGuard (warn) and a GradientClip on the way back: the
# watch's replay of the iteration runs both again.
GUARDED_NET = guarded_poison_net("guarded_replay", calls=[3], after_fc=(
    'layer { name: "clip" type: "Python" bottom: "y" top: "y"\n'
    '  python_param { module: "safe_layers" layer: "GradientClip" '
    'param_str: "{max_norm: 1, log_every: 0, nonfinite: keep}" } }\n'))


@pytest.fixture
def checks():
    from safe_layers.core import backend
    yield backend.set_checks
    backend.set_checks(None)


@pytest.mark.parametrize("policy", ["immediate", "deferred"])
@pytest.mark.parametrize("mode", ["always", "replay"])
def test_our_layers_report_and_count_a_replayed_iteration_once(caffe, write_solver, capfd, checks,
                                                               policy, mode):
    from safe_layers import reporting
    checks(policy)
    w = watch(str(write_solver(GUARDED_NET)), check_layers=mode, on_nonfinite="skip", log_first=0)
    w.solver.step(5)
    assert w.skipped == [2]
    assert [e.kind for e in w.events if e.kind == "replay"] == (["replay"] if mode == "replay" else [])
    guard = reporting.fault_logs("guard", net=w.solver)[-1]
    clip = next(layer for layer in reporting.layers_of(w.solver.net)
                if layer.fault_log.layer_type == "GradientClip")
    assert guard.count == 1 and guard.first.iteration == 2
    assert clip.stats.calls == 6  # 6 backward calls: 5 iterations and the skipped one's retry
    ours = [l.split("] ", 1)[1] for l in capfd.readouterr().err.splitlines()
            if "safe_layers] " in l and "] WATCH " not in l]
    assert len([l for l in ours if l.startswith("NaNGuard guard (after poison)")]) == 1, ours
    assert len(ours) == len(set(ours)), ours  # no line of our layers said twice
    w.close()


def test_a_once_only_warning_of_the_replayed_iteration_is_said_once(caffe, write_solver, capfd):
    # StableBatchNorm with use_global_stats on fresh (zero) statistics warns once, in the
    # first forward; that forward's iteration is the poisoned one, so the replay runs it
    # again from the layer's state before its warning.
    net = regression_net("once_replay", fc_bottom="xn", before_fc=(
        poison_layer([1])
        + 'layer { name: "bn" type: "Python" bottom: "xp" top: "xn"\n'
        '  python_param { module: "safe_layers" layer: "StableBatchNorm" '
        'param_str: "{use_global_stats: true}" } }\n'))
    w = watch(str(write_solver(net)), on_nonfinite="skip", log_first=0)
    w.solver.step(2)
    assert w.skipped == [0] and [e.kind for e in w.events if e.kind == "replay"] == ["replay"]
    err = capfd.readouterr().err
    assert err.count("stored statistics unusable under use_global_stats") == 1, err[-3000:]
    w.close()


def test_a_replay_cut_short_by_a_stop_still_leaves_no_second_report(caffe, write_solver, capfd,
                                                                     checks):
    # Deferred: the replay's rows of our layers are read inside it even when the producer
    # it finds stops the run from within the pass.
    from safe_layers import reporting
    from safe_layers.core import deferred
    checks("deferred")
    w = watch(str(write_solver(GUARDED_NET)), log_first=0)
    with pytest.raises(NonFiniteError):
        w.solver.step(5)
    deferred.BOARDS.read_all()  # what the process's exit would read
    guard = reporting.fault_logs("guard", net=w.solver)[-1]
    assert guard.count == 1
    err = capfd.readouterr().err
    assert err.count("NaNGuard guard (after poison) in TRAIN: non-finite") == 1, err[-3000:]
    w.close()
