"""Host reads of the watch's default mode (each one a drain of the stream on a GPU; counted
on the CPU alike, safe_layers.kernels.xp.HOST_READS): the solver-level checks read the
loss, every param diff and the params a forward writes at once; every weight, at once, only
after an update that could have made one non-finite and every WEIGHTS_EVERY iterations
(tests/anomaly/test_watch_weights.py)."""

import math

import numpy as np
import pytest

from safe_layers.anomaly import watch
from safe_layers.anomaly.fused_read import read_reductions
from safe_layers.kernels.xp import HOST_READS
from support import devices

# Six param blobs (conv, ip1, ip2: weights and biases) and two loss tops (weights 1 and
# 0.5): before the fused reads, 1 + 2 + 6 + 6 host reads per iteration.
NET = """
layer { name: "data" type: "DummyData" top: "x" top: "label" top: "t"
  dummy_data_param { shape { dim: 8 dim: 2 dim: 6 dim: 6 } shape { dim: 8 } shape { dim: 8 dim: 3 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "uniform" min: 0 max: 3.99 }
    data_filler { type: "gaussian" std: 1 } } }
layer { name: "conv" type: "Convolution" bottom: "x" top: "c"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "c" top: "c" }
layer { name: "ip1" type: "InnerProduct" bottom: "c" top: "score"
  inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "ip2" type: "InnerProduct" bottom: "c" top: "y"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "l1" }
layer { name: "l2" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "l2" loss_weight: 0.5 }
"""

# The same with a BatchNorm (three blobs its forward writes: read with the diffs).
BN_NET = NET.replace('layer { name: "relu"', 'layer { name: "bn" type: "BatchNorm" bottom: "c" '
                     'top: "c" }\nlayer { name: "relu"')

# And with ip2 frozen (lr_mult 0: Caffe computes no diff for it, a zero diff is no dead layer).
FROZEN_NET = NET.replace('top: "y"\n  inner_product_param', 'top: "y"\n  param { lr_mult: 0 } '
                         'param { lr_mult: 0 }\n  inner_product_param')

# Per healthy iteration: one read in on_gradients_ready (the two loss tops' sums, the six
# diffs' sums of squares, and BatchNorm's statistics' where there is one).
READS_PER_ITERATION = 1


@pytest.mark.parametrize("steps", ["one call", "one call per iteration"])
@pytest.mark.parametrize("net", [NET, BN_NET, FROZEN_NET],
                         ids=["conv-ip", "with BatchNorm", "with a frozen layer"])
def test_a_healthy_iteration_reads_the_host_once(write_solver, steps, net):
    assert net.count("lr_mult: 0") == (2 if net is FROZEN_NET else 0)
    w = watch(str(write_solver(net, base_lr=0.01, momentum=0.9, random_seed=1)))
    assert w.options.check_layers == "replay"  # the default
    w.solver.step(2)
    with HOST_READS.recording() as reads:
        if steps == "one call":
            w.solver.step(5)
        else:
            for _ in range(5):
                w.solver.step(1)
    assert reads.count == 5 * READS_PER_ITERATION, reads.sites
    assert w.faults == []
    w.close()


def test_the_loss_read_with_the_diffs_is_caffes(make_solver):
    """The loss of the fused read is the one Caffe's Net::Forward returns for the batch."""
    w = watch(make_solver(NET, base_lr=0.01, random_seed=1))
    w.solver.step(3)
    blobs = w.solver.net.blobs
    expected = np.float32(float(blobs["l1"].data) + np.float32(float(blobs["l2"].data) * 0.5))
    assert w.loss == pytest.approx(float(expected), rel=1e-6)
    w.close()


@pytest.mark.parametrize("xp", devices.array_modules())
def test_one_read_tells_finite_from_not_and_confirms_only_the_overflowed(xp):
    # On a device the reductions are gathered into one array read at once; on the host
    # they are the values themselves: one read either way.
    big = xp.full(10, 1e20, np.float32)      # finite, but its float32 squares overflow
    bad = xp.asarray(np.array([1, np.nan, 2], np.float32))
    tops = [xp.asarray(np.array([0.25, 0.5], np.float32))]
    with HOST_READS.recording() as reads:
        sums, squares = read_reductions(tops, [xp.ones(4, np.float32), big, bad, xp.ones(0, np.float32)])
    assert sums == [0.75]
    assert squares[0] == 4 and squares[1] == pytest.approx(1e41, rel=1e-6)
    assert math.isnan(squares[2]) and squares[3] == 0
    assert reads.count == 1 + 2  # the fused read, then one each for the two non-finite sums


def test_the_host_reductions_are_a_lone_sum_and_dot():
    rng = np.random.RandomState(0)
    arrays = [rng.randn(*shape).astype(np.float32) for shape in ((16, 1, 3, 3), (500, 800), (7,))]
    sums, squares = read_reductions(arrays[:1], arrays)
    assert sums == [float(arrays[0].sum())]
    assert squares == [float(a.reshape(-1).dot(a.reshape(-1))) for a in arrays]
