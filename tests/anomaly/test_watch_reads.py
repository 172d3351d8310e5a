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


# ``BELOW_LOSS``: where a test puts a layer between big and the loss.
BIG_NET = """
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 4 dim: 512 } shape { dim: 4 dim: 2 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "big" type: "InnerProduct" bottom: "x" top: "h"
  inner_product_param { num_output: 160 weight_filler { type: "gaussian" std: 0.05 } } }
BELOW_LOSS
layer { name: "small" type: "InnerProduct" bottom: "h" top: "y"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""


def _read_at_the_end(w):
    """The sums of squares of every param diff of the watch's net, as Caffe's update will
    see them (once each: a shared blob is one of Caffe's learnable params)."""
    seen = []

    def on_gradients_ready():
        seen.append([float(np.vdot(blob.diff, blob.diff)) for _, _, _, blob in w.checks.params])
    w.solver.add_callback(lambda: None, on_gradients_ready)  # after the watch's own
    return seen


@pytest.mark.parametrize("iter_size", [1, 3])
def test_the_gradient_norm_is_that_of_the_final_diffs(make_solver, iter_size):
    w = watch(make_solver(BIG_NET.replace("BELOW_LOSS", ""), base_lr=0.01, momentum=0.9,
                          iter_size=iter_size))
    seen = _read_at_the_end(w)
    norms = []
    for _ in range(4):
        w.solver.step(1)
        norms.append(w.grad_norm)
    assert w.faults == [] and len(seen) == 4
    assert norms == pytest.approx([math.sqrt(sum(squares)) for squares in seen], rel=1e-12)
    w.close()


def test_a_nan_in_a_diff_under_a_finite_loss_is_caught_before_the_update(make_solver):
    """A layer between big and the loss puts NaN into the diff it passes down at the third
    backward: its replay names the layer, big's diffs are named, and the update is skipped
    (applied, the NaN diffs would have made big's weights NaN)."""
    poison = ('layer { name: "poison" type: "Python" bottom: "h" top: "hp"\n'
              '  python_param { module: "support.poison" layer: "PoisonAtCall" '
              'param_str: "{backward_calls: [3]}" } }\n')
    net = BIG_NET.replace("BELOW_LOSS", poison).replace('bottom: "h" top: "y"', 'bottom: "hp" top: "y"')
    w = watch(make_solver(net, base_lr=0.01, momentum=0.9), on_nonfinite="skip")
    w.solver.step(3)
    assert [f.kind for f in w.faults] == ["producer", "gradients"]
    assert (w.faults[0].layer, w.faults[0].pass_) == ("poison", "backward")
    assert w.faults[1].params == ["big[0]", "big[1]"]
    assert "non-finite loss" not in w.faults[1].message
    assert w.skipped == [2] and w.solver.iter == 3
    assert all(np.isfinite(blob.data).all() for blobs in w.solver.net.params.values()
               for blob in blobs)
    w.close()


def test_a_finite_diff_whose_float32_squares_overflow_is_no_fault(make_solver):
    """1e20 (finite) passed down at the third backward: big's weights' diff holds elements
    near 1e20, whose float32 sum of squares is inf; read again in float64 it is finite."""
    poison = ('layer { name: "poison" type: "Python" bottom: "h" top: "hp"\n'
              '  python_param { module: "support.poison" layer: "PoisonAtCall" '
              'param_str: "{backward_calls: [3], value: 1e20}" } }\n')
    net = BIG_NET.replace("BELOW_LOSS", poison).replace('bottom: "h" top: "y"', 'bottom: "hp" top: "y"')
    w = watch(make_solver(net, base_lr=1e-30), on_nonfinite="stop")
    seen = _read_at_the_end(w)
    w.solver.step(3)
    assert w.checks.labels[0] == "big[0]" and seen[2][0] == math.inf  # in float32
    assert w.faults == [] and 1e20 < w.grad_norm < 1e30
    w.close()


# big2 shares big's weights (param { name }): one blob of Caffe's learnable params, whose
# diff both layers' backward add to (Net::AppendParam / ShareWeights, src/caffe/net.cpp).
SHARED_NET = BIG_NET.replace(
    'layer { name: "big" type: "InnerProduct" bottom: "x" top: "h"\n',
    'layer { name: "big" type: "InnerProduct" bottom: "x" top: "h" param { name: "w" }\n').replace(
    "BELOW_LOSS",
    'layer { name: "big2" type: "InnerProduct" bottom: "x" top: "h2" param { name: "w" }\n'
    '  inner_product_param { num_output: 160 weight_filler { type: "gaussian" std: 0.05 } } }\n'
    'layer { name: "sum" type: "Eltwise" bottom: "h" bottom: "h2" top: "hs" }\n').replace(
    'bottom: "h" top: "y"', 'bottom: "hs" top: "y"')


def test_shared_weights_count_once_in_the_norm_and_are_clipped_once(make_solver):
    solver = make_solver(SHARED_NET, base_lr=0.01)
    params = solver.net.params
    learnable = [params["big"][0], params["big"][1], params["big2"][1], params["small"][0],
                 params["small"][1]]
    assert np.shares_memory(params["big"][0].diff, params["big2"][0].diff)
    before, after = [], []
    solver.add_callback(lambda: None, lambda: before.append([b.diff.copy() for b in learnable]))
    w = watch(solver, clip_gradients=1e-3)
    solver.add_callback(lambda: None, lambda: after.append([b.diff.copy() for b in learnable]))
    w.solver.step(1)
    norm = math.sqrt(sum(float(np.vdot(d, d)) for d in before[0]))
    assert w.grad_norm == pytest.approx(norm, rel=1e-6)
    assert [e.kind for e in w.events] == ["clip"]
    for raw, clipped in zip(before[0], after[0]):
        np.testing.assert_allclose(clipped, raw * np.float32(1e-3 / norm), rtol=1e-5)
    assert w.checks.labels == ["big[0]", "big[1]", "big2[1]", "small[0]", "small[1]"]
    w.close()
