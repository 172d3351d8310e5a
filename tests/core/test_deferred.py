"""Deferred checks (safe_layers.core.deferred): a net's fault flags stay where its arrays are and
are read on the host once per pass (once per iteration under a watch), not once per layer.

A GPU is not needed to prove it: the same code runs over NumPy arrays when the checks are
deferred by switch (backend.set_checks, SAFE_LAYERS_CHECKS), and every host read of the
package goes through safe_layers.kernels.xp.to_numpy, which counts it (HOST_READS): what
the code would synchronise on a GPU. Expected counts come from the nets' structure.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from safe_layers.core import backend, deferred
from safe_layers import reporting
from safe_layers.kernels import batch_norm, clip, finite, xp
from support.guarded import guard_every_layer
from support.paths import TESTS
from support.published import published_net
from support.switches import TEST_MODE


@pytest.fixture
def checks():
    """checks('immediate' | 'deferred'): how the layers check, for this test only."""
    yield backend.set_checks
    backend.set_checks(None)


def reads_of(step):
    """(host reads, their sites) of one call of ``step``."""
    with xp.HOST_READS.recording() as block:
        step()
    return block.count, block.sites


def resnet50_guarded(batch=1):
    """ResNet-50 (tests/data) with a NaNGuard after every layer and StableBatchNorm in
    place of its BatchNorm layers; (text, guards, batch norms)."""
    text = published_net("resnet50_train_val.prototxt", data="dummy", batch=batch, phase_only="TRAIN")
    guarded, guards = guard_every_layer(text, stable_batch_norm=True)
    return guarded, guards, text.count('type: "BatchNorm"')


# ---- the count: O(1) per iteration, not O(layers) -----------------------------------------

def test_resnet50_with_a_guard_after_every_layer_reads_twice_per_iteration_not_560_times(
        caffe, write_solver, checks):
    text, guards, norms = resnet50_guarded()
    assert (guards, norms) == (227, 53)
    path = write_solver(text, base_lr=0.001)
    seen = {}
    for policy in ("immediate", "deferred"):
        checks(policy)
        solver = caffe.SGDSolver(str(path))
        seen[policy] = [reads_of(lambda: solver.step(1)) for _ in range(4)]
    # At once: every guard reads its check in forward and in backward, every StableBatchNorm
    # reads its fast check and its statistics update in forward: 2 * 227 + 2 * 53.
    assert [count for count, _ in seen["immediate"]] == [2 * guards + 2 * norms] * 4
    # Deferred: the first two iterations teach each board where its passes end (read after
    # each check meanwhile); then one read at the end of the forward pass, one at the end
    # of the backward pass, whatever the number of layers.
    counts = [count for count, _ in seen["deferred"]]
    assert counts[2:] == [2, 2], counts
    assert dict(seen["deferred"][3][1]) == {"deferred.py:%d read" % _read_line(): 2}


def _read_line():
    import inspect
    lines, start = inspect.getsourcelines(deferred.Board.read)
    return start + next(i for i, line in enumerate(lines) if "to_numpy(" in line)


CHAIN = """
name: "chain" force_backward: true
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 4 dim: 8 } shape { dim: 4 dim: 8 }
    data_filler { type: "uniform" min: 0.5 max: 1 } data_filler { type: "constant" value: 0 } } }
%s
layer { name: "loss" type: "EuclideanLoss" bottom: "x%d" bottom: "t" top: "l" }
"""


def chain(links, action="warn"):
    """x -> (Power x0.99, NaNGuard) x links -> EuclideanLoss."""
    body = []
    for k in range(links):
        body.append('layer { name: "p%d" type: "Power" bottom: "x%s" top: "x%d" power_param { scale: 0.99 } }'
                    % (k, k - 1 if k else "", k))
        body.append('layer { name: "g%d" type: "Python" bottom: "x%d" top: "x%d" python_param { '
                    'module: "safe_layers" layer: "NaNGuard" param_str: "{name: g%d, follows: p%d, '
                    'action: %s}" } }' % (k, k, k, k, k, action))
    return (CHAIN % ("\n".join(body), links - 1)).replace('bottom: "x-1"', 'bottom: "x"')


@pytest.mark.parametrize("links", [2, 8, 32])
def test_reads_per_iteration_grow_with_the_guards_at_once_and_stay_constant_deferred(
        caffe, write_solver, checks, links):
    path = write_solver(chain(links))
    counts = {}
    for policy in ("immediate", "deferred"):
        checks(policy)
        solver = caffe.SGDSolver(str(path))
        counts[policy] = [reads_of(lambda: solver.step(1))[0] for _ in range(4)]
    assert counts["immediate"] == [2 * links] * 4
    assert counts["deferred"][2:] == [2, 2]


def test_a_pass_with_more_checks_than_a_row_buffer_holds_is_read_whole_in_one_read(make_net, checks):
    checks("deferred")
    links = deferred.CHUNK + 44
    text = chain(links).replace('"p290" type: "Power" bottom: "x289" top: "x290" power_param { scale: 0.99 }',
                                '"p290" type: "Power" bottom: "x289" top: "x290" power_param { power: 0.5 '
                                'shift: -2 }')  # (0.99^290 x - 2)^0.5: NaN from link 290 on
    net = make_net(text)
    for _ in range(3):
        net.forward()
        net.backward()
    reporting.clear_fault_logs(net=net)
    count, _ = reads_of(net.forward)
    assert count == 1
    assert [log.layer for log in reporting.fault_logs(net=net) if log.count] == \
        ["g%d" % k for k in range(290, links)]


def test_under_a_watch_the_boards_are_read_once_per_iteration(caffe, write_solver, checks):
    import safe_layers
    checks("deferred")
    path = write_solver(chain(8), iter_size=2)
    solver = caffe.SGDSolver(str(path))
    watch = safe_layers.watch(solver, solver_file=str(path), on_nonfinite="stop")
    (board,) = watch.boards
    for _ in range(3):
        before = board.reads
        count, sites = reads_of(lambda: solver.step(1))
        # Two forward and two backward passes (iter_size 2), one read of the guards' rows.
        assert board.reads - before == 1
        assert sites["deferred.py:%d read" % _read_line()] == 1, sites  # from the first iteration


# ---- the reports: the first flagged layer, exactly, with the data as it arrived ---------

# x -> Log -> y and its guard, then Power(power 0) overwrites y in place with ones (Caffe's
# Power with power 0 writes 1 without reading its input); w = Log(x) again, with the last
# guard of the pass: the board is read at its end, after y was overwritten.
REPORTED = """
name: "reported" force_backward: true
layer { name: "in" type: "Input" top: "x" top: "t" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } } }
layer { name: "log" type: "Log" bottom: "x" top: "y" }
layer { name: "g_log" type: "Python" bottom: "y" top: "y" python_param { module: "safe_layers" layer: "NaNGuard" param_str: "{name: g_log, follows: log}" } }
layer { name: "ones" type: "Power" bottom: "y" top: "y" power_param { power: 0 } }
layer { name: "log2" type: "Log" bottom: "x" top: "w" }
layer { name: "g_w" type: "Python" bottom: "w" top: "w" python_param { module: "safe_layers" layer: "NaNGuard" param_str: "{name: g_w, follows: log2}" } }
layer { name: "sum" type: "Eltwise" bottom: "y" bottom: "w" top: "z" }
layer { name: "loss" type: "EuclideanLoss" bottom: "z" bottom: "t" top: "l" }
"""


def _learned(net):
    """Three clean iterations: the net's board knows where its passes end."""
    net.blobs["x"].data[...] = 1.0
    net.blobs["t"].data[...] = 0.0
    for _ in range(3):
        net.forward()
        net.backward()
    return net


def _faults(make_net, policy, checks, x):
    """Reports of the fourth forward (after three clean ones), by guard."""
    checks(policy)
    net = _learned(make_net(REPORTED))
    assert not [log for log in reporting.fault_logs(net=net) if log.count]
    net.blobs["x"].data[...] = x
    net.forward()
    return {log.layer: log.last for log in reporting.fault_logs(net=net) if log.count}, net


def test_deferred_reports_equal_the_reports_at_once_even_after_the_blob_was_overwritten(
        make_net, checks, capfd):
    x = [[1.0, 2.0, -3.0], [4.0, 0.0, -1.0]]
    at_once, _ = _faults(make_net, "immediate", checks, x)
    capfd.readouterr()
    later, net = _faults(make_net, "deferred", checks, x)
    assert set(at_once) == set(later) == {"g_log", "g_w"}
    for name in at_once:
        assert later[name] == at_once[name], name  # every field
    report = later["g_log"]
    assert (report.nan, report.neginf, report.first_index, np.isnan(report.first_value)) == \
        (2, 1, (0, 2), True)
    assert report.finite_min == 0.0 and report.finite_max == pytest.approx(np.log(4.0))
    # y holds only ones by the time the board was read: these statistics were taken on the
    # device when g_log checked.
    np.testing.assert_array_equal(net.blobs["y"].data, np.ones((2, 3), np.float32))
    err = capfd.readouterr().err
    assert 0 <= err.index("NaNGuard g_log") < err.index("NaNGuard g_w")  # execution order


def test_the_read_names_the_first_flagged_layer_in_execution_order(make_net, checks):
    checks("deferred")
    net = _learned(make_net(REPORTED))
    names = list(net._layer_names)
    board = net.layers[names.index("g_log")].fault_log.board
    assert board.learned == {"forward": True, "backward": True}
    net.blobs["x"].data[...] = -1.0
    net._forward(0, names.index("g_w") - 1)  # the pass stops before its last layer
    assert len(board.pending) == 1
    assert [r.layer for r in board.read()] == ["g_log"]
    net.forward()
    assert [log.layer for log in reporting.fault_logs(net=net) if log.count] == ["g_log", "g_w"]


# ---- repairs on the device, no host decision ----------------------------------------------

CLAMPED = """
name: "clamped" force_backward: true
layer { name: "in" type: "Input" top: "x" top: "t" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } } }
layer { name: "log" type: "Log" bottom: "x" top: "y" }
layer { name: "g" type: "Python" bottom: "y" top: "y" python_param { module: "safe_layers" layer: "NaNGuard" param_str: "{name: g, follows: log, action: clamp, nan_value: 0.5, bound: 7, escalate_after: 0}" } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "l" }
"""


@pytest.mark.parametrize("policy", ["immediate", "deferred"])
def test_clamp_repairs_without_a_host_decision_when_deferred(make_net, checks, policy):
    checks(policy)
    net = _learned(make_net(CLAMPED))
    net.blobs["x"].data[...] = [[np.nan, 0.0, 1.0], [np.e, -1.0, 1.0]]
    count, sites = reads_of(net.forward)
    np.testing.assert_allclose(net.blobs["y"].data, [[0.5, -7.0, 0.0], [1.0, 0.5, 0.0]], rtol=1e-6)
    assert reporting.fault_logs("g", net=net)[0].repaired == 1
    if policy == "deferred":
        assert count == 1 and list(sites) == ["deferred.py:%d read" % _read_line()]  # the pass end
    else:
        assert count == 2  # the fast check, then the report's statistics


@pytest.mark.parametrize("flagged", [False, True])
def test_flagged_repairs_touch_the_array_only_where_the_row_says_so(flagged):
    host = np.array([np.nan, np.inf, -np.inf, 5.0, -5.0, 1.0], np.float32)
    row = finite.empty_rows(np, 1)[0]
    row[finite.NAN] = 1 if flagged else 0  # what the row says, not what the array holds
    got = finite.clamp_flagged_(host.copy(), row, nan_value=0.0, bound=2.0, max_abs=3.0)
    expected = np.array([0.0, 2.0, -2.0, 2.0, -2.0, 1.0], np.float32) if flagged else host
    np.testing.assert_array_equal(got, expected)
    zeroed = finite.zero_flagged_(host.copy(), row)
    np.testing.assert_array_equal(zeroed, np.zeros(6, np.float32) if flagged else host)


# ---- abort: raised at the read, with the first fault's full report ------------------------

ABORTING = REPORTED.replace("{name: g_log, follows: log}", "{name: g_log, follows: log, action: abort}")


def test_abort_is_raised_at_the_end_of_the_pass_with_the_first_faults_report(make_net, checks, capfd):
    x = [[1.0, 2.0, -3.0], [4.0, 0.0, -1.0]]
    checks("immediate")
    net = make_net(ABORTING)
    net.blobs["x"].data[...] = x
    with pytest.raises(reporting.FaultAbort) as at_once:
        net.forward()
    checks("deferred")
    net = _learned(make_net(ABORTING))
    layers = dict(zip(net._layer_names, net.layers))
    calls = layers["g_w"].forward_calls
    capfd.readouterr()
    net.blobs["x"].data[...] = x
    with pytest.raises(reporting.FaultAbort) as later:
        net.forward()
    report = later.value.report
    assert (report.layer, report.action, report.call, report.iteration) == ("g_log", "abort", 4, 3)
    at_once.value.report.call, at_once.value.report.iteration = 4, 3  # the first forward there
    assert report == at_once.value.report
    # The delay: the layers after g_log ran (g_w checked its own NaN) before the
    # read at the end of the pass; g_w's fault, which the abort would have stopped at
    # once, is dropped, not reported.
    assert layers["g_w"].forward_calls == calls + 1
    assert reporting.fault_logs("g_w", net=net)[0].count == 0
    err = capfd.readouterr().err
    assert "ABORT NaNGuard g_log" in err and "g_w" not in err


BURST = """
name: "burst"
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 4 dim: 5 } shape { dim: 4 dim: 3 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 0 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "h"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "g" type: "Python" bottom: "h" top: "h" python_param { module: "safe_layers" layer: "NaNGuard" param_str: "{name: g, follows: fc, action: abort}" } }
layer { name: "burst" type: "Python" bottom: "h" top: "hb" python_param { module: "support.read_counter" layer: "GradientBurst" param_str: "{calls: [5]}" } }
layer { name: "g2" type: "Python" bottom: "hb" top: "hb" python_param { module: "safe_layers" layer: "NaNGuard" param_str: "{name: g2, follows: burst}" } }
layer { name: "loss" type: "EuclideanLoss" bottom: "hb" bottom: "t" top: "l" }
"""


def test_a_backward_abort_read_at_the_pass_end_still_comes_before_the_update(
        caffe, write_solver, checks, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    checks("deferred")
    solver = caffe.SGDSolver(str(write_solver(BURST, base_lr=0.1)))
    solver.step(4)
    assert solver.net.layers[list(solver.net._layer_names).index("g")].fault_log.board.learned == \
        {"forward": True, "backward": True}
    weights = solver.net.params["fc"][0].data.copy()
    with pytest.raises(reporting.FaultAbort) as info:
        solver.step(1)
    report = info.value.report
    assert (report.layer, report.pass_, report.iteration, report.posinf + report.neginf) == \
        ("g", "backward diff", 4, 12)
    np.testing.assert_array_equal(solver.net.params["fc"][0].data, weights)  # no update
    assert solver.iter == 4


ESCALATING = CLAMPED.replace("escalate_after: 0", "escalate_after: 3")


def test_escalation_to_abort_is_decided_at_the_read_after_the_repairs(make_net, checks):
    checks("deferred")
    net = _learned(make_net(ESCALATING))
    net.blobs["x"].data[...] = -1.0
    net.forward()
    net.forward()
    np.testing.assert_array_equal(net.blobs["y"].data, np.full((2, 3), 0.5, np.float32))
    with pytest.raises(reporting.FaultAbort) as info:
        net.forward()
    report = info.value.report
    assert (report.action, report.escalated_from, report.escalated_after) == ("abort", "clamp", 3)
    np.testing.assert_array_equal(net.blobs["y"].data, np.full((2, 3), 0.5, np.float32))  # repaired


# ---- the caffe binary: reads per iteration inside it, and an abort -----------------------

def _counted_lenet(tmp_path, action="warn"):
    text, guards = guard_every_layer(published_net("lenet_train_test.prototxt", data="dummy",
                                                   batch=8, phase_only="TRAIN"), action=action)
    counter = ('layer { name: "reads" type: "Python" bottom: "data" top: "data" python_param { '
               'module: "support.read_counter" layer: "ReadCounter" param_str: "{path: %s}" } }\n'
               % (tmp_path / "reads.txt"))
    at = text.index('layer {\n  name: "conv1"')
    return text[:at] + counter + text[at:], guards


@pytest.mark.parametrize("policy", ["immediate", "deferred"])
def test_inside_the_caffe_binary_two_reads_per_iteration_deferred(caffe_bin, write_solver, tmp_path,
                                                                  monkeypatch, policy):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(TESTS)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    monkeypatch.setenv("SAFE_LAYERS_CHECKS", policy)
    text, guards = _counted_lenet(tmp_path)
    result = caffe_bin("train", "-solver", write_solver(text, max_iter=8, base_lr=0.001), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    counts = [int(line.split()[1]) for line in (tmp_path / "reads.txt").read_text().splitlines()]
    per_iteration = [b - a for a, b in zip(counts, counts[1:])]
    assert len(per_iteration) == 7  # the reads of iterations 0-6, seen from the next forward
    if policy == "immediate":
        assert per_iteration == [2 * guards] * 7
    else:
        assert per_iteration[2:] == [2] * 5, per_iteration


def test_inside_the_caffe_binary_a_deferred_abort_stops_before_the_update(caffe_bin, write_solver,
                                                                           tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(TESTS)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    monkeypatch.setenv("SAFE_LAYERS_CHECKS", "deferred")
    poisoned = BURST.replace("{calls: [5]}", "{calls: [6]}")
    result = caffe_bin("train", "-solver", write_solver(poisoned, max_iter=10, display=1,
                                                        base_lr=0.1), cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert ("ABORT NaNGuard g (after fc) in TRAIN: non-finite backward diff, iteration 5 (call 6), "
            "bottom[0] shape 4x3:") in result.stderr
    # Caffe's display line of iteration 4 and its update, none of iteration 5.
    assert "Iteration 4 (" in result.stderr and "Iteration 4, lr = 0.1" in result.stderr
    assert "Iteration 5 (" not in result.stderr and "Iteration 5, lr" not in result.stderr


# ---- no host read hidden anywhere: every conversion goes through to_numpy ----------------

class _Strict(np.ndarray):
    """A NumPy array that refuses to become a host value (float, int, bool, index, item,
    tolist) except through xp.to_numpy, which views it as a plain array: the strictness of
    a device array, for the code that runs on both array modules. What is computed from it
    stays strict: ufuncs, reductions and NumPy functions (einsum, where, stack, ...)."""

    def __array_wrap__(self, array, context=None, return_scalar=False):
        return array.view(_Strict)

    def __array_function__(self, func, types, args, kwargs):
        return _strict(func(*_plain(args), **_plain(kwargs)))

    def _refuse(self, *args, **kwargs):
        raise AssertionError("a host read outside safe_layers.kernels.xp.to_numpy")

    __float__ = __int__ = __bool__ = __index__ = item = tolist = _refuse


def _plain(value):
    if isinstance(value, _Strict):
        return value.view(np.ndarray)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _strict(value):
    if isinstance(value, (np.ndarray, np.generic)):
        return np.asarray(value).view(_Strict)
    if isinstance(value, (list, tuple)):
        return type(value)(_strict(v) for v in value)
    return value


@pytest.fixture
def strict_arrays(monkeypatch):
    """Blob arrays as _Strict views; NumPy twins of device kernels see plain arrays. (On a
    GPU, tests/gpu/test_gpu_deferred.py asks CuPy itself to refuse synchronisations.)"""
    if TEST_MODE == "gpu":
        pytest.skip("host arrays by design: the NumPy semantics of a device array")
    monkeypatch.setattr(backend, "data", lambda blob: blob.data.view(_Strict))
    monkeypatch.setattr(backend, "diff", lambda blob: blob.diff.view(_Strict))


STRICT_NET = """
name: "strict"
layer { name: "data" type: "DummyData" top: "x" top: "label"
  dummy_data_param { shape { dim: 4 dim: 3 dim: 5 dim: 5 } shape { dim: 4 dim: 1 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "conv" type: "Convolution" bottom: "x" top: "c"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "g" type: "Python" bottom: "c" top: "c" python_param { module: "safe_layers" layer: "NaNGuard" param_str: "{name: g, action: clamp, max_abs: 1e6}" } }
layer { name: "bn" type: "Python" bottom: "c" top: "c" param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 }
  python_param { module: "safe_layers" layer: "StableBatchNorm" param_str: "{name: bn}" } }
layer { name: "clip" type: "Python" bottom: "c" top: "c" python_param { module: "safe_layers" layer: "GradientClip" param_str: "{name: clip, max_norm: 1, log_every: 3}" } }
layer { name: "fc" type: "InnerProduct" bottom: "c" top: "s"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "Python" bottom: "s" bottom: "label" top: "l" loss_weight: 1
  python_param { module: "safe_layers" layer: "SafeInfogainLoss" param_str: "{name: loss, source: H}" } }
"""


def test_the_deferred_path_reads_nothing_on_the_host_but_through_to_numpy(
        caffe, write_solver, checks, strict_arrays, tmp_path):
    np.save(tmp_path / "H.npy", np.eye(3))
    checks("deferred")
    solver = caffe.SGDSolver(str(write_solver(STRICT_NET.replace("source: H", "source: %s"
                                                                 % (tmp_path / "H.npy")))))
    solver.step(6)  # learning and learned passes, a clip summary every 3 calls
    assert np.isfinite(solver.net.blobs["l"].data).all()


def test_strict_arrays_do_catch_a_host_read(caffe, make_net, checks, strict_arrays):
    """The control: the same net, checks at once, converts on the host outside to_numpy."""
    checks("immediate")
    monkey = finite._host_all_finite
    try:
        finite._host_all_finite = lambda x, max_abs: bool(x.sum() == x.sum())  # a hidden read
        net = make_net(CLAMPED)
        net.blobs["x"].data[...] = 1.0
        with pytest.raises(AssertionError, match="outside safe_layers.kernels.xp.to_numpy"):
            net.forward()
    finally:
        finite._host_all_finite = monkey


# ---- the other layers' reads --------------------------------------------------------------

@pytest.mark.parametrize("policy", ["immediate", "deferred"])
def test_reads_of_batch_norm_infogain_and_clip(caffe, write_solver, checks, tmp_path, policy):
    np.save(tmp_path / "H.npy", np.eye(3))
    checks(policy)
    net = STRICT_NET.replace("source: H", "source: %s" % (tmp_path / "H.npy"))
    solver = caffe.SGDSolver(str(write_solver(net.replace("log_every: 3", "log_every: 1000"))))
    solver.step(2)
    count, sites = reads_of(lambda: solver.step(1))
    if policy == "immediate":
        # g: check fwd + bwd; bn: fast check + statistics update; clip: check; loss: logits,
        # labels, loss.
        assert count == 2 + 2 + 1 + 3, sites
    else:
        assert count == 2, sites


def test_a_bad_label_is_raised_at_the_read_before_the_update(caffe, write_solver, checks, tmp_path,
                                                             capfd):
    np.save(tmp_path / "H.npy", np.eye(3))
    checks("deferred")
    net = (STRICT_NET.replace("source: H", "source: %s" % (tmp_path / "H.npy"))
           .replace('top: "x" top: "label"', 'top: "x" top: "label0"')
           .replace('layer { name: "conv"', 'layer { name: "poison" type: "Python" bottom: "label0" '
                    'top: "label" python_param { module: "support.poison" layer: "PoisonAtCall" '
                    'param_str: "{calls: [4], sample: 2, value: 7}" } }\nlayer { name: "conv"'))
    solver = caffe.SGDSolver(str(write_solver(net)))
    solver.step(3)
    weights = solver.net.params["fc"][0].data.copy()
    with pytest.raises(ValueError, match=r"label 7.0 at position \(2, 0\) \(outer, inner\) is "
                                         r"outside \[0, 3\)"):
        solver.step(1)
    np.testing.assert_array_equal(solver.net.params["fc"][0].data, weights)
    assert "SafeInfogainLoss loss in TRAIN: label 7.0" in capfd.readouterr().err


# ---- the policy -----------------------------------------------------------------------------

def test_checks_policy_is_validated_and_auto_defers_only_device_arrays(monkeypatch):
    with pytest.raises(ValueError, match="checks 'later'; allowed: auto, immediate, deferred"):
        backend.set_checks("later")
    monkeypatch.setenv("SAFE_LAYERS_CHECKS", "sometimes")
    with pytest.raises(ValueError, match="SAFE_LAYERS_CHECKS='sometimes'; allowed"):
        backend.checks()
    monkeypatch.setenv("SAFE_LAYERS_CHECKS", "")
    assert backend.checks() == "auto"
    assert not backend.deferred_checks(np.zeros(3, np.float32))
    assert backend.deferred_checks(_DeviceLike())
    monkeypatch.setenv("SAFE_LAYERS_CHECKS", "deferred")
    assert backend.deferred_checks(np.zeros(3, np.float32))
    try:
        backend.set_checks("immediate")
        assert not backend.deferred_checks(_DeviceLike())
    finally:
        backend.set_checks(None)


class _DeviceLike:
    """Not a NumPy array (what auto looks at)."""


def test_a_guard_with_a_flight_recorder_checks_at_once(make_net, checks, tmp_path):
    checks("deferred")
    dumps = tmp_path / "dumps"
    net = _learned(make_net(CLAMPED.replace("escalate_after: 0",
                                            "escalate_after: 0, dump_dir: %s" % dumps)))
    net.blobs["x"].data[...] = -1.0
    count, sites = reads_of(net.forward)
    # Checked at once: the fast check, the report's statistics, the record's copy.
    assert count == 3 and not any("deferred.py" in site for site in sites), sites
    assert sorted(p.suffix for p in dumps.iterdir()) == [".json", ".npz"]


def test_rows_left_unread_at_exit_are_read_and_reported(tmp_path):
    script = tmp_path / "partial.py"
    script.write_text(textwrap.dedent('''
        import os, sys
        os.environ["GLOG_minloglevel"] = "2"
        import caffe
        from safe_layers.core import backend
        backend.set_checks("deferred")
        net = caffe.Net(sys.argv[1], caffe.TRAIN)
        net.blobs["x"].data[...] = 1.0
        for _ in range(3):
            net.forward()
            net.backward()
        net.blobs["x"].data[...] = -1.0
        names = list(net._layer_names)
        net._forward(0, names.index("g_w") - 1)  # a partial pass: its last layer does not run
        print("pending", len(net.layers[names.index("g_log")].fault_log.board.pending), flush=True)
    '''))
    net_path = tmp_path / "net.prototxt"
    net_path.write_text(REPORTED)
    result = subprocess.run([sys.executable, str(script), str(net_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pending 1" in result.stdout
    assert "NaNGuard g_log (after log) in TRAIN: non-finite forward data, iteration 3 (call 4)" in \
        result.stderr


@pytest.mark.parametrize("policy", ["immediate", "deferred"])
@pytest.mark.parametrize("in_place", [False, True])
def test_batch_norm_squares_beyond_float32_in_place_or_not(make_net, checks, capfd, policy, in_place):
    """Each way the same: y exact, the running statistics kept out (float32 cannot hold
    the variance), the report's statistics those of x (in place, y has taken x's memory)."""
    checks(policy)
    top = "x" if in_place else "y"
    net = make_net("""name: "bn" force_backward: true
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 4 dim: 1 dim: 2 dim: 2 } } }
layer { name: "bn" type: "Python" bottom: "x" top: "%s" param { lr_mult: 0 } param { lr_mult: 0 }
  param { lr_mult: 0 } python_param { module: "safe_layers" layer: "StableBatchNorm" param_str: "{name: bn}" } }
""" % top)
    x = np.zeros((4, 1, 2, 2), np.float32)
    x[0], x[1] = 3e19, -3e19
    net.blobs["x"].data[...] = x
    capfd.readouterr()
    net.forward()
    y = (x - x.mean()) / np.sqrt(x.astype(np.float64).var() + 1e-5)
    np.testing.assert_allclose(net.blobs[top].data, y, rtol=1e-6)
    assert [float(net.params["bn"][i].data[0]) for i in range(3)] == [0.0, 0.0, 0.0]
    report = reporting.fault_logs("bn", net=net)[0].last
    f32 = np.float32
    assert (report.finite_min, report.finite_max, report.finite_mean_abs) == \
        (float(f32(-3e19)), float(f32(3e19)), float(f32(f32(3e19) / 2)))
    assert "the running variance would overflow float32 (channel 0: 4.8e+38)" in report.detail


# ---- kernels: the row, on NumPy (the CuPy twins: tests/gpu/test_gpu_deferred.py) ------------

def test_fault_stats_row_on_numpy_matches_the_exact_counts():
    rng = np.random.default_rng(3)
    host = rng.standard_normal((3, 40, 7)).astype(np.float32)
    host[1, 2, 3], host[0, 39, 6], host[2, 0, 0], host[0, 5, 1] = np.nan, np.inf, -np.inf, 9.0
    row = finite.fault_stats(host, finite.empty_rows(np, 1)[0], max_abs=5.0)
    finite_values = host[np.isfinite(host)]
    assert list(row[:finite.FIRST]) == [1, 1, 1, 1]
    assert row[finite.FIRST] == np.ravel_multi_index((0, 5, 1), host.shape)  # 9.0 comes first
    assert row[finite.FIRST_VALUE] == 9.0
    assert (row[finite.FINITE_MIN], row[finite.FINITE_MAX]) == (finite_values.min(), finite_values.max())
    assert row[finite.SUM_ABS] == np.abs(finite_values).sum(dtype=np.float64)
    assert row[finite.FINITE] == host.size - 3
    clean = finite.fault_stats(np.ones(5, np.float32), finite.empty_rows(np, 1)[0])
    assert not finite.row_faulty(clean) and clean[finite.FIRST] == -1


def test_wide_squares_and_the_device_side_statistics_update():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 50)).astype(np.float32) * 1e19  # float32 squares overflow
    got = batch_norm.channel_sum_squares_wide(x)
    np.testing.assert_allclose(got, (x.astype(np.float64) ** 2).sum(axis=(0, 2)), rtol=1e-12)
    m, v, s = np.zeros(2, np.float32), np.ones(2, np.float32), np.ones(1, np.float32)
    facts = batch_norm.update_running_stats_where(m, v, s, np.array([1.0, 4e38]), np.zeros(2), 4,
                                                  0.5, np.asarray(True))
    assert list(facts) == [1.0, 0.0, 1.0, 4e38]  # kept out: the mean of channel 1
    assert (m.tolist(), v.tolist(), s.tolist()) == ([0, 0], [1, 1], [1])
    facts = batch_norm.update_running_stats_where(m, v, s, np.array([1.0, 2.0]), np.zeros(2), 4,
                                                  0.5, np.asarray(False))
    assert facts[0] == 0 and m.tolist() == [0, 0]  # not accepted (a non-finite batch): untouched
    batch_norm.update_running_stats_where(m, v, s, np.array([1.0, 2.0]), np.zeros(2), 4, 0.5,
                                          np.asarray(True))
    assert (m.tolist(), v.tolist(), s.tolist()) == ([1, 2], [0.5, 0.5], [1.5])


def test_clip_reads_its_statistics_in_one_read_per_summary():
    from safe_layers.layers.gradient_clip import ClipStats

    class Log:
        subject = reporting.Subject("GradientClip", "c", None, "TRAIN")

        def on_final(self, hook):
            pass

        def note(self, text):
            self.text = text
    log = Log()
    stats = ClipStats(history=50, every=10, fault_log=log)
    g = np.ones((2, 3), np.float32)
    count, _ = reads_of(lambda: [stats.add(clip.l2_norms(g * k), np.bool_(k > 5)) for k in range(1, 11)])
    assert count == 1  # ten calls, one summary, one read
    assert "clipped 5 of the last 10 calls (5 of 10 in all)" in log.text
