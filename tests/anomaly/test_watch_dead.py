"""The watch's dead-net checks (on_dead) on real SGDSolvers: a dead layer, vanished
gradients, the loss flat at chance; warn, stop and rollback; no alarm on a healthy run."""

import importlib.util
import math

import pytest

from safe_layers.anomaly import NonFiniteError, SolverFault, parse_line, watch
from safe_layers.kernels.xp import HOST_READS
from safe_layers.reporting import watch_lines
from support.nets import dead_relu
from support.paths import ROOT

# Every unit of a Sigmoid saturated (z = 100 * 8 for inputs of 1), the fc after it frozen
# (lr_mult 0): every param diff is exactly zero, the loss stays where it started, and no
# top is all zeros (the sigmoid's are all ones).
VANISHED_NET = """
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 4 dim: 8 } shape { dim: 4 dim: 1 }
    data_filler { type: "constant" value: 1 } data_filler { type: "constant" value: 3 } } }
layer { name: "fc1" type: "InnerProduct" bottom: "x" top: "z"
  inner_product_param { num_output: 5 weight_filler { type: "constant" value: 100 } } }
layer { name: "sigmoid" type: "Sigmoid" bottom: "z" top: "s" }
layer { name: "fc2" type: "InnerProduct" bottom: "s" top: "y"
  param { lr_mult: 0 } param { lr_mult: 0 }
  inner_product_param { num_output: 1 weight_filler { type: "constant" value: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""

# A linear softmax classifier of random labels (new ones every batch), from zero weights:
# its loss starts at ln 10 exactly and has nothing to learn.
CHANCE_NET = """
layer { name: "data" type: "DummyData" top: "x" top: "label"
  dummy_data_param { shape { dim: 64 dim: 5 } shape { dim: 64 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "uniform" min: 0 max: 9.99 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "score"
  inner_product_param { num_output: 10 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
"""


def dead_faults(w):
    return [f for f in w.faults if f.kind == "dead"]


def test_a_dead_relu_is_found_and_named(caffe, write_solver, capfd):
    w = watch(str(write_solver(dead_relu(), base_lr=0.1)), on_dead="warn", dead_after=5)
    w.solver.step(12)
    faults = dead_faults(w)
    assert len(faults) == 1  # one report per dead episode, not one per iteration
    fault = faults[0]
    assert fault.iteration == 4 and fault.action == "warn"
    assert fault.details["since"] == 0
    assert [(l["layer"], l["type"], l["blob"]) for l in fault.details["layers"]] == [
        ("relu", "ReLU", "h")]
    assert w.dead is fault_state(w) and w.dead.since == 0
    line = next(l for l in capfd.readouterr().err.splitlines() if "WATCH dead" in l)
    assert 'dead layers: "relu" ("ReLU", top "h", all zeros 5 iterations in a row)' in line
    assert "ended dead since iteration 0" in w.summary()
    w.close()


def test_a_relu_that_dies_after_learning_is_found_and_named(caffe, write_solver):
    """Its params had non-zero diffs on every iteration before (the default mode reads no
    layer then); a bias set by hand kills the ReLU at iteration 5: the zero diffs of
    params that had learned make the watch look at the layers, and it names the ReLU."""
    w = watch(str(write_solver(dead_relu(bias=0), base_lr=0.1)), on_dead="warn", dead_after=5)
    w.solver.step(5)
    assert dead_faults(w) == []
    w.solver.net.params["fc1"][1].data[...] = -100
    w.solver.step(8)
    faults = dead_faults(w)
    assert len(faults) == 1 and faults[0].iteration == 9
    assert [(l["layer"], l["since"]) for l in faults[0].details["layers"]] == [("relu", 5)]
    w.close()


def fault_state(w):
    return w.checks.liveness.state


def test_a_live_relu_is_not_dead(caffe, write_solver):
    """The same net with a bias of 0: half its units fire, no dead report."""
    w = watch(str(write_solver(dead_relu(bias=0), base_lr=0.1)), on_dead="stop", dead_after=5)
    w.solver.step(30)
    assert dead_faults(w) == [] and w.dead is None
    assert "ended dead" not in w.summary()
    w.close()


def test_vanished_gradients_are_found_naming_the_layers(caffe, write_solver):
    w = watch(str(write_solver(VANISHED_NET, base_lr=0.1)), on_dead="warn", dead_after=6)
    w.solver.step(10)
    faults = dead_faults(w)
    assert len(faults) == 1 and faults[0].iteration == 5
    vanished = faults[0].details["vanished"]
    assert vanished["ratio"] is None  # every diff exactly zero
    assert vanished["zero_layers"] == ["fc1", "fc2"]
    assert faults[0].details["layers"] == [] and faults[0].details["chance"] is None
    assert "vanished gradients: every param diff zero for 6 iterations" in faults[0].message
    w.close()


def test_the_loss_at_chance_from_the_start_is_found(caffe, write_solver):
    """Never below ln 10: found after 5 x chance_after iterations at chance."""
    w = watch(str(write_solver(CHANCE_NET, base_lr=0.001)), on_dead="warn", chance_after=4,
              growth_window=5)
    w.solver.step(30)
    faults = dead_faults(w)
    assert faults, [f.line() for f in w.faults]
    chance = faults[0].details["chance"]
    assert chance["never_left"] and chance["terms"] == [(1.0, 10)]
    assert chance["level"] == pytest.approx(math.log(10))
    assert abs(chance["mean"] - math.log(10)) <= 0.05 * math.log(10)
    assert faults[0].iteration == 4 + 5 * 4 - 1  # 5 losses fill the window, then 20 at chance
    assert "within 5% of the chance level 2.30259 = ln 10" in faults[0].message
    w.close()


def test_on_dead_stop_raises_before_the_update(caffe, write_solver):
    w = watch(str(write_solver(dead_relu(), base_lr=0.1)), on_dead="stop", dead_after=3)
    with pytest.raises(NonFiniteError) as caught:
        w.solver.step(10)
    assert caught.value.report.kind == "dead" and caught.value.report.action == "stop"
    assert w.solver.iter == 2  # iteration 2 found it: its update was not applied
    w.close()


def test_on_dead_rollback_needs_rollback_after(caffe, write_solver):
    with pytest.raises(ValueError, match="on_dead 'rollback' needs rollback_after"):
        watch(str(write_solver(dead_relu())), on_dead="rollback")


def test_a_net_dead_from_its_start_has_no_checkpoint_to_return_to(caffe, write_solver, tmp_path):
    path = write_solver(dead_relu(), base_lr=0.1, snapshot_prefix='"%s"' % (tmp_path / "ck"))
    w = watch(str(path), rollback_after=2, dead_after=3, on_dead="rollback")
    assert w.checks.on_dead == "rollback"
    with pytest.raises(NonFiniteError) as caught:
        w.solver.step(10)
    assert "no checkpoint from before iteration 0, when the net died" in caught.value.report.message
    w.close()


@pytest.fixture(scope="module")
def digits_lmdb(tmp_path_factory):
    """The demo's digits LMDBs (examples/digits.py)."""
    spec = importlib.util.spec_from_file_location("digits", ROOT / "examples" / "digits.py")
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    folder = tmp_path_factory.mktemp("digits")
    digits.write_digits(folder)
    return folder


def digits_solver(write_solver, folder, **fields):
    net = (ROOT / "examples" / "demo" / "digits_train_test.prototxt").read_text()
    net = net.replace('source: "digits_', 'source: "%s/digits_' % folder)
    values = dict(momentum=0.9, weight_decay=0.0005, random_seed=1)
    values.update(fields)
    return str(write_solver(net, **values))


def test_digits_at_lr_1_die_and_roll_back_to_before_it_then_learn(caffe, write_solver,
                                                                    digits_lmdb, tmp_path):
    """The measured failure: the digits net at base_lr 1 keeps a finite loss while its
    ReLUs die, at chance. The dead state is rolled back to a checkpoint from before it died
    (none taken while it was dying), base_lr lowered, and the net learns."""
    path = digits_solver(write_solver, digits_lmdb, base_lr=1,
                         snapshot_prefix='"%s"' % (tmp_path / "ck"))
    w = watch(path, on_nonfinite="skip", rollback_after=3, checkpoint_every=10, keep_checkpoints=10)
    w.solver.step(200)
    dead = dead_faults(w)
    rollbacks = [e for e in w.events if e.kind == "rollback"]
    assert dead and dead[0].action == "rollback" and dead[0].details["layers"]
    # Its loss never left chance at base_lr 1: every checkpoint after the start is passed
    # over, though its ReLUs died later.
    taken = [e.iteration for e in w.events if e.kind == "checkpoint"]
    assert dead[0].details["since"] == 1 and dead[0].details["evidence_since"] > 10
    assert [t for t in taken if t < dead[0].iteration][:3] == [0, 10, 20]
    assert rollbacks[0].details["to"] == 0
    assert rollbacks[0].details["base_lr_to"] == pytest.approx(0.1)
    assert "after dead at iteration %d" % dead[0].iteration in rollbacks[0].message
    assert w.dead is None and w.loss < 0.5
    w.close()


def test_a_healthy_run_raises_nothing(caffe, write_solver, digits_lmdb):
    w = watch(digits_solver(write_solver, digits_lmdb, base_lr=0.1), on_dead="stop")
    w.solver.step(150)
    assert dead_faults(w) == [] and w.dead is None and w.loss < 0.5
    w.close()


def test_the_dead_checks_add_no_host_read(caffe, write_solver, digits_lmdb):
    """Host reads per iteration (each one a drain of the stream on a GPU, counted on the
    CPU alike) with the dead checks and without them: the same."""
    counts = []
    for live in (True, False):
        w = watch(digits_solver(write_solver, digits_lmdb, base_lr=0.1))
        if not live:
            w.checks.liveness = None
            w.probes[0].track_zeros = False
        w.solver.step(2)
        before = HOST_READS.count
        w.solver.step(5)
        counts.append(HOST_READS.count - before)
        w.close()
    assert counts[0] == counts[1]


@pytest.mark.parametrize("layers, vanished, chance", [
    ([{"layer": 'r"; vanished gradients: x', "type": "ReLU", "blob": "h", "iterations": 20}], None,
     None),
    ([{"layer": "relu2", "type": "ReLU", "blob": "conv2", "iterations": 21},
      {"layer": "relu3", "type": "ReLU", "blob": "ip1", "iterations": 20}],
     {"ratio": 2.5e-12, "threshold": 1e-9, "iterations": 20, "loss": 2.31, "zero_layers": ["a, b"]},
     {"mean": 2.3, "level": 2.30259, "terms": [(1.0, 10)], "window": 20, "band": 0.05,
      "iterations": 100, "never_left": False}),
    ([], {"ratio": None, "threshold": 1e-9, "iterations": 7, "loss": 4.0, "zero_layers": []},
     {"mean": 7.5, "level": 7.59, "terms": [(1.0, 1000), (0.3, 10)], "window": 5, "band": 0.1,
      "iterations": 500, "never_left": True}),
])
def test_the_dead_line_reads_back(layers, vanished, chance):
    fault = SolverFault("dead", "TRAIN", 65, watch_lines.dead_message(45, layers, vanished, chance),
                        "rollback")
    fields = parse_line("W20261207 06:55:14.395731  6890 safe_layers] " + fault.line())
    assert fields["kind"] == "dead" and fields["iteration"] == 65 and fields["action"] == "rollback"
    back = watch_lines.dead_details(fields)
    assert back["since"] == 45 and back["layers"] == layers
    if vanished is not None and vanished["ratio"] is None:
        vanished = dict(vanished, threshold=None)  # shown only with a ratio
    assert back["vanished"] == vanished
    if chance is None:
        assert back["chance"] is None
    else:
        expected = dict(chance, terms=back["chance"]["terms"])
        assert back["chance"] == pytest.approx(expected)
        assert back["chance"]["terms"].startswith("ln %d" % chance["terms"][0][1])


def test_the_summary_says_ended_dead_and_reads_back():
    line = watch_lines.summary_line(2, {"dead": 1}, 0, 0, 1, 0, ended_dead=12)
    assert line.endswith("; ended dead since iteration 12")
    assert parse_line(line)["ended_dead"] == 12
    assert parse_line(watch_lines.summary_line(0, {}, 0, 0, 1, 0))["ended_dead"] is None
