"""safe_layers.watch on real SGDSolvers and real (published) nets."""

import math
import re

import numpy as np
import pytest

from safe_layers import reporting
from safe_layers.anomaly import NonFiniteError, parse_line, replay, watch
from support.nets import DIVERGING_NET, POOLING_NET, guarded_poison_net, regression_net
from support.published import published_net, published_solver_fields
from support.weights import all_finite, assert_bit_equal, weights

LENET = "lenet_train_test.prototxt"
CIFAR = "cifar10_quick_train_test.prototxt"
BATCH = 8


@pytest.fixture
def batches(tmp_path):
    """batches(n, nan_at=[(batch, sample)], shape=(1, 28, 28)) -> (data.npy, labels.npy):
    n batches of BATCH MNIST-like images, NaN in one pixel of the chosen samples."""
    def make(n, nan_at=(), shape=(1, 28, 28), seed=0, name="set"):
        rng = np.random.RandomState(seed)
        data = rng.uniform(0, 1, (n * BATCH,) + shape).astype(np.float32)
        labels = rng.randint(0, 10, n * BATCH).astype(np.float32)
        for batch, sample in nan_at:
            data[batch * BATCH + sample, 0, 3, 4] = np.nan
        paths = tmp_path / (name + "_x.npy"), tmp_path / (name + "_y.npy")
        np.save(paths[0], data)
        np.save(paths[1], labels)
        return paths
    return make


@pytest.fixture
def lenet_solver(caffe, write_solver, batches):
    """lenet_solver(nan_at=..., n=..., **solver fields) -> (solver, solver path): the
    published LeNet and its published solver settings, its Data layer serving arrays."""
    def build(nan_at=(), n=40, name="set", arrays=None, **fields):
        arrays = arrays or batches(n, nan_at, name=name)
        net = published_net(LENET, data="array", batch=BATCH, arrays=arrays, phase_only="TRAIN")
        values = published_solver_fields("lenet_solver.prototxt")
        values.update(fields)
        path = write_solver(net, **values)
        return caffe.get_solver(str(path)), path
    return build


def test_nan_sample_named_at_the_data_layer_and_skip_is_bit_exact(lenet_solver, caffe):
    solver, path = lenet_solver(nan_at=[(3, 5)])
    seen = {}

    def listener(item):
        if item.kind == "skip":  # the moment after the skipped attempt, before the retry
            seen["weights"] = weights(solver.net)
            seen["iter"] = solver.iter

    w = watch(solver, solver_file=path, on_nonfinite="skip", log_first=0)
    w.listener = listener
    solver.step(3)
    before = weights(solver.net)
    solver.step(1)  # batch 3 is skipped, batch 4 makes iteration 3
    producer = w.faults[0]
    assert producer.kind == "producer" and producer.pass_ == "forward"
    assert (producer.layer, producer.layer_type, producer.blob) == ("mnist", "Python", "data")
    assert producer.iteration == 3 and producer.fault.samples == [5]
    assert producer.fault.first_index == (5, 0, 3, 4) and producer.fault.nan == 1
    assert w.skipped == [3] and solver.iter == 4
    assert seen["iter"] == 3
    assert_bit_equal(seen["weights"], before)

    # The skip left momentum and iter as if batch 3 had never come: a solver that never
    # saw it ends bit-equal after the same updates.
    data = np.load(str(path.parent / "set_x.npy"))
    labels = np.load(str(path.parent / "set_y.npy"))
    keep = np.r_[0:3 * BATCH, 4 * BATCH:len(data)]
    clean = path.parent / "clean_x.npy", path.parent / "clean_y.npy"
    np.save(str(clean[0]), data[keep])
    np.save(str(clean[1]), labels[keep])
    reference, _ = lenet_solver(arrays=clean)
    reference.step(4)
    assert_bit_equal(weights(solver.net), weights(reference.net))
    assert all_finite(solver.net)


DATA_GUARD = """
layer {
  name: "data_guard" type: "Python" bottom: "data" top: "data"
  python_param { module: "safe_layers" layer: "NaNGuard"
                 param_str: "{name: data_guard, follows: mnist, action: ACTION}" }
}
"""


@pytest.mark.parametrize("action", ["clamp", "warn", "abort"])
def test_stop_leaves_a_repair_in_place_to_the_guard(caffe, write_solver, batches, action):
    """A net hardened to repair (a NaNGuard clamping in place after its data layer) under
    the default on_nonfinite 'stop': the watch reports the data layer as the producer and
    that the guard repaired it, and training goes on with finite weights. A guard that only
    warns repairs nothing: the watch stops at the layer that uses the blob next, before
    any backward or update."""
    arrays = batches(8, [(3, 5)])
    net = published_net(LENET, data="array", batch=BATCH, arrays=arrays, phase_only="TRAIN")
    at = net.index('layer {\n  name: "conv1"')
    net = net[:at] + DATA_GUARD.replace("ACTION", action).lstrip() + net[at:]
    values = published_solver_fields("lenet_solver.prototxt")
    path = write_solver(net, **values)
    solver = caffe.get_solver(str(path))
    # Always on: a fault the guard repairs never reaches the loss or the diffs, so the
    # default mode has nothing to replay (the guard's own report names the layer it follows).
    w = watch(solver, solver_file=path, log_first=0, check_layers="always")
    solver.step(3)
    before = weights(solver.net)
    if action == "clamp":
        solver.step(2)
        [producer] = [f for f in w.faults if f.kind == "producer"]
        assert (producer.layer, producer.iteration, producer.action) == ("mnist", 3, "report")
        assert producer.note == "repaired in place by Python data_guard"
        assert parse_line(producer.line())["note"] == producer.note
        assert solver.iter == 5 and all_finite(solver.net)
    elif action == "abort":
        # The strict guard stops the pass itself (its own report); the watch's producer is
        # still reported, once, and the next clean iteration is not stopped by it.
        with pytest.raises(FloatingPointError, match="NaNGuard data_guard"):
            solver.step(1)
        solver.step(1)
        [producer] = [f for f in w.faults if f.kind == "producer"]
        assert (producer.layer, producer.iteration, producer.action) == ("mnist", 3, "report")
        assert "the pass ended (an exception) before the next layer ran" in producer.note
        assert solver.iter == 4 and all_finite(solver.net)
    else:
        with pytest.raises(NonFiniteError) as caught:
            solver.step(1)
        stop = caught.value.report
        assert (stop.kind, stop.layer, stop.iteration, stop.action) == ("producer", "mnist", 3, "stop")
        assert stop.fault.samples == [5] and stop.note == ""
        assert solver.iter == 3
        assert_bit_equal(weights(solver.net), before)
    w.close()


def test_zeroing_diffs_is_no_skip_and_apply_update_advances_iter(lenet_solver):
    """Why skip raises before the update: the other doors stock pycaffe offers move the
    weights (momentum, weight decay) or iter."""
    solver, _ = lenet_solver()
    solver.step(2)
    net = solver.net

    def zero_diffs():
        for blobs in net.params.values():
            for blob in blobs:
                blob.diff[...] = 0

    solver.add_callback(lambda: None, zero_diffs)
    before = weights(net)
    solver.step(1)
    moved = [name for name, blobs in weights(net).items()
             if any(not np.array_equal(x, y) for x, y in zip(blobs, before[name]))]
    assert "conv1" in moved and solver.iter == 3
    solver.apply_update()
    assert solver.iter == 4


def test_stop_raises_before_the_update_with_the_report(lenet_solver, capfd):
    solver, path = lenet_solver(nan_at=[(2, 1)])
    w = watch(solver, solver_file=path)
    solver.step(2)
    before = weights(solver.net)
    with pytest.raises(NonFiniteError) as caught:
        solver.step(5)
    report = caught.value.report
    assert report.kind == "producer" and report.layer == "mnist" and report.action == "stop"
    assert solver.iter == 2
    assert_bit_equal(weights(solver.net), before)
    line = [l for l in capfd.readouterr().err.splitlines() if "WATCH producer" in l][-1]
    assert re.match(r"^E\d{8} \d\d:\d\d:\d\d\.\d{6} +\d+ safe_layers\] WATCH producer", line)
    parsed = parse_line(line)
    expected = report.as_dict()
    for key in ("pass", "layer", "layer_type", "iteration", "blob", "samples", "nan", "shape",
                "first_index", "action", "role", "blob_index"):
        assert parsed[key] == expected[key], key
    w.close()


def test_record_replays_the_faulty_batch(lenet_solver, caffe, tmp_path):
    solver, path = lenet_solver(nan_at=[(1, 6)])
    record_dir = tmp_path / "record"
    w = watch(solver, solver_file=path, on_nonfinite="skip", record_dir=str(record_dir),
              log_first=0)
    solver.step(2)
    assert w.record_path.endswith("iter1.json")
    net_text = published_net(LENET, data="input", batch=BATCH, phase_only="TRAIN")
    net_path = tmp_path / "replay.prototxt"
    net_path.write_text(net_text)
    fresh = caffe.Net(str(net_path), caffe.TRAIN)
    found = replay(w.record_path, fresh, log_first=0)
    assert found and (found[0].layer, found[0].fault.samples) == ("mnist", [6])
    w.close()


def test_pooling_geometry_producer_is_named_not_the_layers_after_it(make_solver):
    solver = make_solver(POOLING_NET)
    w = watch(solver, on_nonfinite="skip", max_skips=2, log_first=0)
    with pytest.raises(NonFiniteError) as caught:
        solver.step(1)
    assert caught.value.report.kind == "stopped"
    producers = [f for f in w.faults if f.kind == "producer"]
    assert {(p.layer, p.layer_type, p.pass_) for p in producers} == {("pool1", "Pooling", "forward")}
    first = producers[0]
    assert first.blob == "pool1" and first.fault.shape == (8, 4, 3, 3)
    assert first.fault.samples == list(range(8)) and first.fault.nan == 8 * 4 * 5
    assert first.inputs[0]["blob"] == "conv1" and math.isfinite(first.inputs[0]["max"])
    assert solver.iter == 0 and all_finite(solver.net)


EXPLODING_GRADIENT_NET = """
name: "sqrt_at_zero"
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "h"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 }
                        bias_filler { type: "constant" value: -100 } } }
layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "root" type: "Power" bottom: "h" top: "r" power_param { power: 0.5 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "r" bottom: "t" top: "loss" }
"""


def test_backward_producer_of_an_exploding_gradient(make_solver):
    solver = make_solver(EXPLODING_GRADIENT_NET)
    w = watch(solver, on_nonfinite="skip", max_skips=1, log_first=0)
    with pytest.raises(NonFiniteError):
        solver.step(1)
    producers = [f for f in w.faults if f.kind == "producer"]
    # The forward is finite (sqrt(0) = 0); d sqrt(h)/dh = inf at h = 0 appears in root's
    # backward, whose top diff was finite: root is the producer, not relu or fc below it.
    assert producers and producers[0].pass_ == "backward"
    assert (producers[0].layer, producers[0].layer_type) == ("root", "Power")
    assert producers[0].role == "bottom" and producers[0].blob == "h"
    assert {p.layer for p in producers} == {"root"}
    gradients = [f for f in w.faults if f.kind in ("gradients", "stopped")]
    assert gradients and "fc[0]" in gradients[0].params


def test_poly_without_max_iter_stops_at_iteration_zero(caffe, write_solver, tmp_path):
    path = write_solver(DIVERGING_NET.replace("LAYER", ""), lr_policy='"poly"', power=0.9,
                        max_iter=0)
    text = path.read_text().replace("max_iter: 0\n", "")
    path.write_text(text)
    w = watch(str(path), on_nonfinite="skip")
    before = weights(w.solver.net)
    with pytest.raises(NonFiniteError) as caught:
        w.solver.step(3)
    report = caught.value.report
    assert report.kind == "lr" and report.iteration == 0 and report.action == "stop"
    assert 'lr_policy "poly"' in report.message and "max_iter is unset" in report.message
    assert w.solver.iter == 0
    assert_bit_equal(weights(w.solver.net), before)


def test_unknown_policy_is_refused_before_caffe_aborts(caffe, write_solver):
    path = write_solver(DIVERGING_NET.replace("LAYER", ""), lr_policy='"cosine"')
    # Caffe would LOG(FATAL) at the first update and take this test process with it.
    with pytest.raises(ValueError, match="lr_policy 'cosine' is not one Caffe knows"):
        watch(str(path))


def test_diverging_base_lr_reported_before_any_weight_is_nonfinite(caffe, write_solver):
    path = write_solver(DIVERGING_NET.replace("LAYER", ""), base_lr=0.1, momentum=0.9)
    w = watch(str(path), warn_growth=10, log_first=0)
    finite_at_warning = []
    w.listener = lambda item: (item.kind == "growth" and finite_at_warning.append(
        (item.iteration, all_finite(w.solver.net))))
    with pytest.raises(NonFiniteError) as caught:
        w.solver.step(200)
    stop = caught.value.report
    assert finite_at_warning and finite_at_warning[0][1]
    assert finite_at_warning[0][0] < stop.iteration
    # The stop came before the update, so no weight went non-finite.
    assert all_finite(w.solver.net)
    assert stop.kind in ("producer", "loss", "gradients")


def test_diverging_published_net_skip_and_rollback_keep_training_finite(caffe, write_solver,
                                                                     tmp_path):
    """CIFAR-10 quick with base_lr 10: its weights went non-finite by iteration 3 (issue 8).
    Under the watch it stops before that; with rollback and lr_factor it trains on."""
    net = published_net(CIFAR, data="dummy", batch=4, phase_only="TRAIN")
    fields = published_solver_fields("cifar10_quick_solver.prototxt")
    fields.update(base_lr=10, snapshot_prefix='"%s"' % (tmp_path / "ck"))
    path = write_solver(net, **fields)
    w = watch(str(path), log_first=0)
    with pytest.raises(NonFiniteError) as caught:
        w.solver.step(30)
    assert caught.value.report.iteration <= 10 and all_finite(w.solver.net)
    w.close()

    # Checkpoints far enough apart that the one restored predates the divergence.
    w = watch(str(path), on_nonfinite="skip", rollback_after=2, checkpoint_every=10, lr_factor=0.01,
              log_first=0)
    w.solver.step(30)
    assert w.solver.iter == 30 and all_finite(w.solver.net)
    assert w.rollbacks >= 1 and w.solver.param.base_lr < 10
    w.close()


def test_rollback_restores_exactly_the_saved_weights_and_iter(lenet_solver, tmp_path):
    # Sample 1, not 0: a NaN window in stock MAX pooling makes its CPU backward write one
    # element before the channel, which for sample 0's first channel is before the blob
    # itself (heap corruption that aborts some later test of this process).
    solver, path = lenet_solver(nan_at=[(7, 1), (8, 1)], snapshot_prefix='"%s"' % (tmp_path / "ck"))
    w = watch(solver, solver_file=path, on_nonfinite="skip", rollback_after=2, checkpoint_every=5,
              log_first=0)
    at_rollback = {}

    def listener(item):
        if item.kind == "rollback":
            at_rollback.update(iter=solver.iter, weights=weights(solver.net), to=item.details["to"])

    w.listener = listener
    solver.step(5)
    saved = weights(solver.net)
    solver.step(5)  # batches 5, 6 fine; 7 and 8 bad: rollback to 5, then on to 10
    assert at_rollback["iter"] == 5 and at_rollback["to"] == 5
    assert_bit_equal(at_rollback["weights"], saved)
    assert solver.iter == 10 and w.skipped == [7] and w.rolled_back == [7]
    assert (tmp_path / "ck_iter_5.solverstate").exists()
    w.close()
    assert not (tmp_path / "ck_iter_5.solverstate").exists()  # the watch's own files go


def test_no_checkpoint_of_a_state_worse_than_the_start(caffe, write_solver, tmp_path):
    """CIFAR-10 quick at base_lr 10 with a checkpoint every iteration: the loss climbs for a
    few iterations before the first NaN, and a checkpoint of those states brings the blow-up
    back with it. Checkpoints only while the recent loss is within checkpoint_loss_ratio of
    the first one: the rollbacks reach a sane state and training runs on; without that
    gate the same run exhausts its rollbacks."""
    net = published_net(CIFAR, data="dummy", batch=4, phase_only="TRAIN")
    fields = published_solver_fields("cifar10_quick_solver.prototxt")
    fields.update(base_lr=10, snapshot_prefix='"%s"' % (tmp_path / "ck"))
    path = write_solver(net, **fields)
    outcome = {}
    for ratio in (1.5, 1e9):
        w = watch(str(path), on_nonfinite="skip", rollback_after=2, checkpoint_every=1,
                  lr_factor=0.01, log_first=0, checkpoint_loss_ratio=ratio,
                  check_layers="always")  # the dead-layer evidence of every iteration
        try:
            w.solver.step(30)
            outcome[ratio] = ("done", w.solver.iter, all_finite(w.solver.net))
        except NonFiniteError as caught:
            outcome[ratio] = ("stopped", caught.report.kind)
        finally:
            w.close()
    assert outcome[1.5] == ("done", 30, True)
    assert outcome[1e9][0] == "stopped"


def test_growth_warnings_of_abandoned_iterations_do_not_block_checkpoints(caffe, write_solver,
                                                                          tmp_path):
    """The regression of the tests at base_lr 0.1 warns of growth from iteration 5 and
    overflows at 19; the rollback goes to checkpoint 0 with a hundredth of the rate. The
    warnings belonged to the iterations the rollback abandoned: checkpoints are taken again
    from iteration 5 of the replayed run (they were held back until the abandoned run's
    last warning + checkpoint_every)."""
    path = write_solver(DIVERGING_NET.replace("LAYER", ""), base_lr=0.1, momentum=0.9,
                        snapshot_prefix='"%s"' % (tmp_path / "ck"))
    w = watch(str(path), on_nonfinite="skip", rollback_after=2, checkpoint_every=5, lr_factor=0.01,
              warn_growth=10, log_first=0)
    w.solver.step(40)
    kinds = [(e.kind, e.iteration) for e in w.events if e.kind in ("checkpoint", "rollback")]
    rollback = kinds.index(("rollback", 0))
    growth = [f.iteration for f in w.faults if f.kind == "growth"]
    assert growth and max(growth) > 10  # warnings up to the overflow, past checkpoint 10
    assert kinds[:rollback] == [("checkpoint", 0)]
    assert kinds[rollback + 1:rollback + 3] == [("checkpoint", 5), ("checkpoint", 10)]
    assert w.solver.iter == 40 and all_finite(w.solver.net)
    w.close()


def test_a_rollback_to_the_only_checkpoint_says_it_is_the_same_again(caffe, write_solver, tmp_path):
    """With base_lr kept (lr_factor 1) the regression diverges again after its rollback to
    checkpoint 0, and none was taken since (its loss was never back near the start): the
    second rollback can only restore checkpoint 0 again, and says so (not "one further back")."""
    path = write_solver(DIVERGING_NET.replace("LAYER", ""), base_lr=0.1, momentum=0.9,
                        snapshot_prefix='"%s"' % (tmp_path / "ck"))
    w = watch(str(path), on_nonfinite="skip", rollback_after=2, checkpoint_every=5, max_rollbacks=2,
              log_first=0, lr_factor=1)
    with pytest.raises(NonFiniteError) as caught:
        w.solver.step(100)
    assert "2 rollbacks already (max_rollbacks)" in caught.value.report.message
    rollbacks = [e for e in w.events if e.kind == "rollback"]
    assert [e.details["to"] for e in rollbacks] == [0, 0]
    assert "failed again" not in rollbacks[0].message
    assert "no older one is kept: the same one again" in rollbacks[1].message
    assert "further back" not in rollbacks[1].message
    w.close()


def test_a_checkpoint_that_fails_again_rolls_back_one_further(lenet_solver, tmp_path):
    """Batches 7-10 are poisoned: the rollback to checkpoint 5 meets poison again before
    checkpoint 10 is taken, so the next rollback goes to checkpoint 0 (bit-exact), and the
    files of the abandoned checkpoint 5 are gone."""
    solver, path = lenet_solver(nan_at=[(7, 1), (8, 1), (9, 1), (10, 1)],  # not sample 0: see above
                                snapshot_prefix='"%s"' % (tmp_path / "ck"))
    w = watch(solver, solver_file=path, on_nonfinite="skip", rollback_after=2, checkpoint_every=5,
              log_first=0)
    restored = []
    w.listener = lambda item: item.kind == "rollback" and restored.append(
        (item.details["to"], weights(solver.net), "further back" in item.line(),
         (tmp_path / "ck_iter_5.solverstate").exists()))
    at_zero = weights(solver.net)
    solver.step(10)
    assert [(to, further, kept5) for to, _, further, kept5 in restored] == \
        [(5, False, True), (0, True, False)]  # the abandoned checkpoint 5 is dropped
    assert_bit_equal(restored[1][1], at_zero)
    assert solver.iter == 10 and all_finite(solver.net)
    w.close()


def test_resume_under_pycaffe_and_iter_size_report_the_true_iteration(lenet_solver, caffe, capfd,
                                                                      tmp_path):
    prefix = tmp_path / "snap"
    first, _ = lenet_solver(snapshot_prefix='"%s"' % prefix)
    first.step(20)
    first.snapshot()
    # A new process-like start: a fresh solver restored at 20, whose data layer starts
    # at its batch 0; batch 17 has a NaN, and the user runs 3 extra forwards first.
    solver, path = lenet_solver(nan_at=[(17, 2)], name="resumed", snapshot_prefix='"%s"' % prefix)
    solver.restore(str(prefix) + "_iter_20.solverstate")
    w = watch(solver, solver_file=path, on_nonfinite="skip", log_first=1)
    for _ in range(3):
        solver.net.forward()
    solver.step(20)
    producer = next(f for f in w.faults if f.kind == "producer")
    assert producer.iteration == 20 + 17 - 3
    assert w.skipped == [34]


GUARDED_ITER_SIZE_NET = guarded_poison_net("guarded", calls=[7])


def test_layer_reports_use_the_watched_iteration_with_iter_size(caffe, write_solver):
    path = write_solver(GUARDED_ITER_SIZE_NET, iter_size=2)
    w = watch(str(path), on_nonfinite="skip", log_first=0)
    w.solver.net.forward()  # an extra forward of the user's: call 1, no iteration
    w.solver.step(5)
    guard = reporting.fault_logs("guard")[-1]
    # Forward call 7 is the 6th of the solver: iteration 2 (iter_size 2). The guard's own
    # count (iter_size 1 in its param_str) would say 6.
    assert guard.first.iteration == 2
    producer = next(f for f in w.faults if f.kind == "producer")
    assert producer.iteration == 2 and producer.layer == "poison"
    assert w.skipped == [2] and w.solver.iter == 5


def test_weights_made_nonfinite_by_the_update_are_named(caffe, write_solver, tmp_path):
    """Finite gradients, a finite rate, and an update that overflows: the weights check
    after the update names the param blob (and with rollback restores the checkpoint)."""
    path = write_solver(DIVERGING_NET.replace("LAYER", ""), base_lr=3e38,
                        snapshot_prefix='"%s"' % (tmp_path / "ck"))
    w = watch(str(path), log_first=0)
    with pytest.raises(NonFiniteError) as caught:
        w.solver.step(3)
    report = caught.value.report
    assert report.kind == "weights" and report.iteration == 0 and "fc[0]" in report.params
    assert "after the update of iteration 0" in report.message
    w.close()

    # warn: the gradients are finite, and the weights' rollback comes at once.
    w = watch(str(path), on_nonfinite="warn", rollback_after=1, checkpoint_every=1,
              max_rollbacks=2, lr_factor=1e-38, log_first=0)
    w.solver.step(3)
    assert w.rollbacks == 1 and w.solver.iter == 3 and all_finite(w.solver.net)
    w.close()


def test_nan_aware_global_clip(caffe, write_solver):
    path = write_solver(DIVERGING_NET.replace("LAYER", ""), base_lr=1, momentum=0)
    w = watch(str(path), clip_gradients=0.5, log_first=0)
    before = w.solver.net.params["fc"][0].data.copy(), w.solver.net.params["fc"][1].data.copy()
    w.solver.step(1)
    after = w.solver.net.params["fc"][0].data, w.solver.net.params["fc"][1].data
    step = math.sqrt(sum(float(((a - b).astype(np.float64) ** 2).sum()) for a, b in zip(after, before)))
    # lr 1, no momentum, no decay: the update is the clipped gradient, L2 norm 0.5.
    assert step == pytest.approx(0.5, rel=1e-4)
    assert w.counts["clip"] == 1
    w.close()


CLIP_NAN_NET = """
name: "one_nan_gradient"
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 1 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "poison" type: "Python" bottom: "x" top: "xp"
  python_param { module: "support.poison" layer: "PoisonAtCall" param_str: "{calls: [1], sample: 0}" } }
layer { name: "fc" type: "InnerProduct" bottom: "xp" top: "y"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "other" type: "InnerProduct" bottom: "x" top: "z"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
layer { name: "loss2" type: "EuclideanLoss" bottom: "z" bottom: "t" top: "loss2" }
"""


def test_clip_zeroes_nonfinite_diffs_where_caffes_would_pass_nan(caffe, write_solver):
    path = write_solver(CLIP_NAN_NET, base_lr=0.1, clip_gradients=10)  # Caffe's own clip too
    plain = caffe.get_solver(str(path))
    plain.step(1)
    assert not all_finite(plain.net)  # Caffe's clip_gradients let the NaN through
    w = watch(str(path), on_nonfinite="warn", clip_gradients=10, log_first=0)
    w.solver.step(1)
    assert all_finite(w.solver.net)
    assert any(f.kind == "gradients" and f.action == "warn" for f in w.faults)
    w.close()


TEST_POISONED_NET = regression_net("test_poisoned", before_fc=(
    'layer { name: "poison" type: "Python" bottom: "x" top: "x" include { phase: TEST }\n'
    '  python_param { module: "support.poison" layer: "PoisonAtCall" param_str: "{calls: [1], sample: 2}" } }\n'))


def test_test_nets_are_checked_and_reported_only(caffe, write_solver):
    """A producer in the TEST net is reported with phase TEST and the solver's
    iteration; training goes on, even under on_nonfinite stop."""
    path = write_solver(TEST_POISONED_NET, test_iter=1, test_interval=2)
    w = watch(str(path), log_first=0)
    w.solver.step(3)
    found = [f for f in w.faults if f.kind == "producer"]
    assert [(f.phase, f.layer, f.action, f.iteration, f.fault.samples) for f in found] == [
        ("TEST", "poison", "report", 0, [2])]
    assert w.solver.iter == 3
    w.close()


@pytest.mark.parametrize("further_back, same_again, base_lr", [
    (False, False, None), (True, False, (0.1, 0.001)), (False, True, None), (False, True, (10.0, 1.0))])
def test_rollback_and_skip_messages_read_back(further_back, same_again, base_lr):
    """The watch's rollback and skip messages are written and read in one module
    (anomaly.report): what a tool reads back from a log line is what was written."""
    from safe_layers.reporting import watch_lines
    message = watch_lines.rollback_message("/tmp/ck_iter_5.solverstate", 5, "loss", 19, further_back,
                                      same_again, base_lr, rollbacks=2)
    line = watch_lines.Event("rollback", 5, message).line()
    details = watch_lines.event_details(parse_line(line))
    assert details == {"to": 5, "at": 19, "cause": "loss", "state": "/tmp/ck_iter_5.solverstate",
                       "further_back": further_back, "same_again": same_again,
                       "base_lr_from": base_lr[0] if base_lr else None,
                       "base_lr_to": base_lr[1] if base_lr else None, "rollbacks": 2}
    skip = watch_lines.Event("skip", 7, watch_lines.skip_message(3)).line()
    assert watch_lines.event_details(parse_line(skip)) == {"skipped": 3}


GUARDED_INPUT = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 } } }
GUARD
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
  inner_product_param { num_output: 2 weight_filler { type: "constant" value: 0 } } }
"""
GUARD = """layer { name: "data_guard" type: "Python" bottom: "data" top: "data"
  python_param { module: "safe_layers" layer: "NaNGuard" param_str: "{name: data_guard}" } }"""


@pytest.mark.parametrize("guarded, phase, expected", [
    (True, None, "TEST"), (False, None, "NET"), (False, "TEST", "TEST")])
def test_a_lone_net_is_reported_in_its_own_phase_and_large_finite_blobs_are_no_fault(
        make_net, guarded, phase, expected):
    """A lone net's reports name its phase (that of our layers in it, pycaffe exposing no
    net's own), and its faults act (stop) whatever that phase. A blob of 1e38s is finite:
    the fast check's sums overflow on it, and the exact check clears it."""
    net = make_net(GUARDED_INPUT.replace("GUARD", GUARD if guarded else ""), phase="TEST")
    w = watch(net, phase=phase, log_first=0)
    net.blobs["data"].data[...] = 1e38
    net.forward()
    assert w.faults == []
    net.blobs["data"].data[1, 2] = np.nan
    with pytest.raises(NonFiniteError) as caught:
        net.forward()
    stop = caught.value.report
    assert (stop.layer, stop.phase, stop.action, stop.fault.samples) == ("data", expected, "stop", [1])
    assert " in %s, call 2:" % expected in stop.line()
    w.close()
    with pytest.raises(ValueError, match="phase 'test'; allowed: 'TRAIN', 'TEST'"):
        watch(net, phase="test")


def test_rollback_with_a_snapshot_folder_that_does_not_exist_fails_when_attached(
        caffe, write_solver, tmp_path, monkeypatch):
    """The published cifar10_quick solver's prefix is "examples/cifar10/cifar10_quick",
    relative to Caffe's root: from anywhere else its folder is missing, and Caffe's first
    snapshot would abort the process. The watch refuses at once, saying why."""
    monkeypatch.chdir(tmp_path)
    path = write_solver(DIVERGING_NET.replace("LAYER", ""),
                        snapshot_prefix='"examples/cifar10/cifar10_quick"')
    with pytest.raises(ValueError, match=r"folder %s does not exist" % re.escape(
            str(tmp_path / "examples" / "cifar10"))):
        watch(str(path), on_nonfinite="skip", rollback_after=2)
    (tmp_path / "examples" / "cifar10").mkdir(parents=True)
    w = watch(str(path), on_nonfinite="skip", rollback_after=2, checkpoint_every=5)
    w.solver.step(6)
    assert [e.iteration for e in w.events if e.kind == "checkpoint"] == [0, 5]
    w.close()
