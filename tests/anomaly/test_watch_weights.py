"""The weights a watch checks, and when: the params a forward writes (BatchNorm's
statistics) with every iteration's diffs, in the same read; every weight after an update
that could have made one non-finite, before every checkpoint, and every WEIGHTS_EVERY
iterations besides. A finite loss over non-finite weights is a dead net."""

import numpy as np
import pytest

from safe_layers.anomaly import NonFiniteError, watch
from safe_layers.anomaly.checks import WEIGHTS_EVERY
from support.weights import all_finite

# x ~ 1e20 into a BatchNorm: its variance (x - mean)^2 overflows to inf in the forward
# (src/caffe/layers/batch_norm_layer.cpp), the normalized output is x / sqrt(inf) = 0, and
# the loss and every diff stay finite. The statistics blob is what a deployed net uses.
BN_OVERFLOW_NET = """
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 8 dim: 3 } shape { dim: 8 dim: 1 }
    data_filler { type: "uniform" min: 0 max: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "h"
  inner_product_param { num_output: 4 weight_filler { type: "uniform" min: 5e19 max: 1e20 } } }
layer { name: "bn" type: "BatchNorm" bottom: "h" top: "hn" }
layer { name: "out" type: "InnerProduct" bottom: "hn" top: "y"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""

# A healthy regression net with a side branch nothing reads (Silence): a weight of that
# branch set to inf leaves the loss and every diff finite, and the update keeps it inf.
SIDE_BRANCH_NET = """
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 8 dim: 3 } shape { dim: 8 dim: 1 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "y"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "side" type: "InnerProduct" bottom: "x" top: "s"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "silence" type: "Silence" bottom: "s" }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""


def test_batch_norm_statistics_that_overflow_under_a_finite_loss_stop_that_iteration(
        caffe, write_solver):
    path = write_solver(BN_OVERFLOW_NET, base_lr=0.01)
    w = watch(str(path), log_first=0)
    with pytest.raises(NonFiniteError) as caught:
        w.solver.step(3)
    report = caught.value.report
    assert report.kind == "weights" and report.iteration == 0, report.line()
    assert report.params == ["bn[1]"] and "after the forward of iteration 0" in report.message
    assert np.isfinite(w.solver.net.blobs["loss"].data).all()  # a finite loss all along
    assert w.solver.iter == 0  # stopped before iteration 0's update
    w.close()


def test_batch_norm_statistics_that_overflow_roll_back(caffe, write_solver, tmp_path):
    path = write_solver(BN_OVERFLOW_NET, base_lr=0.01, snapshot_prefix='"%s"' % (tmp_path / "ck"))
    w = watch(str(path), on_nonfinite="skip", rollback_after=1, checkpoint_every=1,
              max_rollbacks=1, log_first=0)
    with pytest.raises(NonFiniteError):  # the same batch overflows again: out of rollbacks
        w.solver.step(3)
    faults = [f for f in w.faults if f.kind == "weights"]
    assert faults[0].action == "rollback" and faults[0].params == ["bn[1]"]
    assert w.rollbacks == 1
    w.close()


def _count_weight_reads(w):
    calls = []
    reads = w.checks.reads.weights

    def counted():
        calls.append(int(w.solver.iter))
        return reads()

    w.checks.reads.weights = counted
    return calls


def test_healthy_updates_read_the_weights_every_weights_every_iterations(caffe, write_solver):
    w = watch(str(write_solver(SIDE_BRANCH_NET, base_lr=0.01, momentum=0.9)), log_first=0)
    calls = _count_weight_reads(w)
    w.solver.step(2 * WEIGHTS_EVERY + 5)
    # The first update (no norm of the weights yet), then every WEIGHTS_EVERY-th.
    assert calls == [1, WEIGHTS_EVERY + 1, 2 * WEIGHTS_EVERY + 1], calls
    w.close()


def test_an_update_near_float32s_range_is_followed_by_a_read(caffe, write_solver):
    # base_lr 1e30: every update is past the bound, each is followed by a read.
    w = watch(str(write_solver(SIDE_BRANCH_NET, base_lr=1e30)), on_nonfinite="warn", log_first=0)
    calls = _count_weight_reads(w)
    w.solver.step(10)
    assert calls == list(range(1, 11)), calls
    w.close()


def test_a_weight_set_non_finite_between_steps_is_never_kept_as_a_checkpoint(
        caffe, write_solver, tmp_path):
    path = write_solver(SIDE_BRANCH_NET, base_lr=0.01, snapshot_prefix='"%s"' % (tmp_path / "ck"))
    w = watch(str(path), on_nonfinite="warn", rollback_after=1, checkpoint_every=10,
              max_rollbacks=1, log_first=0)
    w.solver.step(5)
    w.solver.net.params["side"][0].data[0, 0] = np.inf  # the caller's mistake
    w.solver.step(10)
    fault = next(f for f in w.faults if f.kind == "weights")
    # Found by the read before the checkpoint of iteration 10 (the loss and the diffs say
    # nothing), not kept, rolled back to the checkpoint of iteration 0.
    assert fault.iteration == 9 and fault.params == ["side[0]"], fault.line()
    assert w.rollbacks == 1 and all_finite(w.solver.net)
    w.close()


def test_a_step_before_a_snapshot_reads_every_weight(caffe, write_solver):
    # safe-layers train steps so before each snapshot: none is written of weights unread.
    w = watch(str(write_solver(SIDE_BRANCH_NET, base_lr=0.01)), log_first=0)
    # Past dead_after (20): in the first iterations a zero diff (the silenced branch's)
    # has the iteration replayed, which would name the inf top.
    w.solver.step(w.options.dead_after + 5)
    calls = _count_weight_reads(w)
    w.step(1)
    assert calls == []
    w.solver.net.params["side"][0].data[0, 0] = np.inf
    w.step(1)
    assert calls == []  # the loss and the diffs say nothing of it
    with pytest.raises(NonFiniteError) as caught:
        w.step(1, check_weights=True)
    assert calls == [w.options.dead_after + 8] and caught.value.report.params == ["side[0]"]
    w.close()


def test_an_overflowed_statistic_under_warn_is_reported_once_an_iteration(caffe, write_solver):
    # warn_growth reads every weight after every update too: that read leaves out what the
    # iteration's forward-written check reported already.
    w = watch(str(write_solver(BN_OVERFLOW_NET, base_lr=0.01)), on_nonfinite="warn",
              warn_growth=10, log_first=0)
    w.solver.step(3)
    reports = [(f.iteration, f.message.split(":")[0]) for f in w.faults if f.kind == "weights"]
    assert reports == [(i, "non-finite param data after the forward of iteration %d" % i)
                       for i in range(3)], reports
    w.close()
