"""NaNGuard inside real Caffe: caffe.Net, caffe.SGDSolver and the `caffe` binary."""

import json
import os
import re

import numpy as np
import pytest

from safe_layers import reporting
from safe_layers.core.params import ParamError
from support import nets
from support.nets import DIVERGING_NET


def guard(bottom, param_str, top=None, name=None):
    bottoms = bottom if isinstance(bottom, list) else [bottom]
    tops = top if top is not None else bottoms
    tops = tops if isinstance(tops, list) else [tops]
    return ('layer { name: "%s" type: "Python" %s %s python_param { module: "safe_layers" '
            'layer: "NaNGuard" param_str: "%s" } }\n'
            % (name or "guard_" + bottoms[0], " ".join('bottom: "%s"' % b for b in bottoms),
               " ".join('top: "%s"' % t for t in tops), param_str))


def log_net(param_str):
    """x -> Log -> guard -> EuclideanLoss: log of a negative (or zero) is NaN (or -Inf)."""
    return nets.log_net(guard("y", param_str))


def last(layer, phase="TRAIN"):
    logs = reporting.fault_logs(layer, phase)
    assert logs, "no NaNGuard named %r was built" % layer
    return logs[-1]


def test_forward_fault_from_a_real_log_layer(make_net, capfd):
    net = make_net(log_net("{name: fwd, follows: log}"))
    net.blobs["x"].data[...] = [[1.0, 2.0, 3.0], [4.0, -1.0, 0.0]]
    net.forward()
    report = last("fwd").last
    assert report.pass_ == "forward data" and report.phase == "TRAIN"
    assert (report.call, report.iteration) == (1, 0)
    assert (report.nan, report.posinf, report.neginf, report.over) == (1, 0, 1, 0)
    assert report.first_index == (1, 1) and np.isnan(report.first_value)
    assert report.finite_min == 0.0 and report.finite_max == pytest.approx(np.log(4.0))
    assert report.shape == (2, 3) and report.blob_index == 0 and report.follows == "log"
    err = capfd.readouterr().err
    assert ("NaNGuard fwd (after log) in TRAIN: non-finite forward data, iteration 0 (call 1), "
            "bottom[0] shape 2x3: nan=1 +inf=0 -inf=1; first bad at [1, 1] = nan; "
            "finite min=0 max=1.3862944 mean|x|=0.79451346; action=warn") in err
    # Structured form: every field, JSON-safe.
    parsed = json.loads(report.to_json())
    assert parsed["first_index"] == [1, 1] and parsed["first_value"] == "nan"
    assert parsed["pass"] == "forward data" and parsed["layer"] == "fwd"
    # The third forward is iteration 2 and says so.
    net.forward()
    net.forward()
    assert last("fwd").last.iteration == 2 and last("fwd").count == 3
    assert last("fwd").first.call == 1 and last("fwd").last.call == 3  # first stays the first


def test_iteration_accounts_for_iter_size(make_net):
    net = make_net(log_net("{name: itersize, iter_size: 2}"))
    net.blobs["x"].data[...] = -1.0
    for _ in range(3):
        net.forward()
    assert last("itersize").last.call == 3 and last("itersize").last.iteration == 1


GRAD_OVERFLOW = """
name: "overflow" force_backward: true
layer { name: "in" type: "Input" top: "x" top: "t" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } } }
%s
layer { name: "times10" type: "Power" bottom: "x" top: "y" power_param { scale: 10 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "l" loss_weight: 1e37 }
"""


def test_backward_fault_is_found_in_backward_not_forward(make_net):
    # Forward is finite; dL/dy = 1e37 * 10 / 2 and then x10 in Power's backward overflows.
    net = make_net(GRAD_OVERFLOW % guard("x", "{name: bwd, follows: in}"))
    net.blobs["x"].data[...] = 1.0
    net.blobs["t"].data[...] = 0.0
    net.forward()
    assert last("bwd").count == 0
    assert np.isfinite(net.blobs["l"].data).all()
    net.backward()
    log = last("bwd")
    assert log.count == 1
    report = log.last
    assert report.pass_ == "backward diff" and report.posinf == 6 and report.nan == 0
    assert report.first_index == (0, 0) and report.first_value == np.inf


def test_backward_zero_action_zeroes_the_gradient(make_net):
    net = make_net(GRAD_OVERFLOW % guard("x", "{name: bwdzero, action: warn, backward_action: zero}"))
    net.blobs["x"].data[...] = 1.0
    net.forward()
    net.backward()
    assert last("bwdzero").count == 1
    np.testing.assert_array_equal(net.blobs["x"].diff, np.zeros((2, 3), np.float32))


def test_abort_under_pycaffe_raises_with_the_report_and_net_stays_usable(make_net, capfd):
    net = make_net(log_net("{name: stop, follows: log, action: abort}"))
    net.blobs["x"].data[...] = [[1.0, 2.0, 3.0], [4.0, 5.0, -6.0]]
    with pytest.raises(FloatingPointError) as info:
        net.forward()
    message = str(info.value)
    assert message.startswith("NaNGuard stop (after log) in TRAIN: non-finite forward data, iteration 0")
    assert "nan=1 +inf=0 -inf=0; first bad at [1, 2] = nan" in message
    err = capfd.readouterr().err
    assert "ABORT " + message in err and "ABORT report: {" in err
    # The abort is recorded like any fault, and the exception carries the structured report.
    log = last("stop")
    assert log.count == 1 and log.first is log.last is info.value.report
    assert info.value.report.action == "abort" and info.value.report.first_index == (1, 2)
    assert isinstance(info.value, reporting.FaultAbort)
    # The same net keeps working on finite input.
    net.blobs["x"].data[...] = 2.0
    net.blobs["t"].data[...] = 0.0
    out = net.forward()
    assert out["l"] == pytest.approx(np.log(2.0) ** 2 * 6 / 4, rel=1e-5)
    net.backward()
    assert np.isfinite(net.blobs["x"].diff).all()


# Constant input -1 (so Log and sqrt give NaN) and target 0; {middle} maps x to y.
CLI_NET = """
name: "cli"
layer {{ name: "data" type: "DummyData" top: "x" top: "t" dummy_data_param {{ shape {{ {shape} }} shape {{ {shape} }}
  data_filler {{ type: "constant" value: -1 }} data_filler {{ type: "constant" value: 0 }} }} }}
{middle}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "l" }}
"""


def test_abort_under_caffe_train_exits_nonzero_with_the_report(caffe_train):
    result = caffe_train(
        CLI_NET.format(shape="dim: 4 dim: 3", middle=(
            'layer { name: "fc" type: "InnerProduct" bottom: "x" top: "h" inner_product_param { '
            'num_output: 3 weight_filler { type: "constant" value: 1 } } }\n'
            'layer { name: "sqrt" type: "Power" bottom: "h" top: "y" power_param { power: 0.5 } }\n'
            + guard("y", "{name: sqrt_guard, follows: sqrt, action: abort}"))),
        max_iter=10, display=1)
    assert result.returncode == 1, result.stderr[-2000:]
    assert ("ABORT NaNGuard sqrt_guard (after sqrt) in TRAIN: non-finite forward data, "
            "iteration 0 (call 1), bottom[0] shape 4x3: nan=12 +inf=0 -inf=0; first bad at [0, 0] = nan"
            in result.stderr)
    assert "FaultAbort" in result.stderr  # the Python traceback, thanks to WITH_PYTHON_LAYER
    # It stopped before the first update: Caffe's display line "Iteration 0 (... iter/s ...),
    # loss = " and ApplyUpdate's "Iteration 0, lr = " never came.
    assert not re.search(r"Iteration 0 \(.*\), loss = |Iteration 0, lr = ", result.stderr)


def test_final_summary_is_printed_at_exit_of_caffe_train(caffe_train):
    result = caffe_train(
        CLI_NET.format(shape="dim: 2 dim: 3", middle=(
            'layer { name: "log" type: "Log" bottom: "x" top: "y" }\n'
            + guard("y", "{name: warner, follows: log, action: clamp, log_first: 1, log_every: 1000}"))),
        max_iter=4, display=1)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [l for l in result.stderr.splitlines() if "NaNGuard warner" in l]
    assert len(lines) == 2, lines  # the first fault in full, then only the exit summary
    assert "iteration 0 (call 1)" in lines[0] and "action=clamp" in lines[0]
    # 4 iterations + the solver's final loss forward = 5 forward calls, 6 NaN each.
    assert ("final summary: NaNGuard warner (after log) in TRAIN: 5 faults so far (5 repaired; nan=30 "
            in lines[1])
    assert "Iteration 4, loss = 0" in result.stderr  # clamped to 0 = the target


CONVNET = """
name: "convnet" force_backward: true
layer { name: "in" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 2 dim: 8 dim: 8 } shape { dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "constant" value: 0.1 } } }
GUARD_CONV1
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "relu1" }
layer { name: "pool1" type: "Pooling" bottom: "relu1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "POOL_OUT" top: "fc"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
GUARD_FC
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def _convnet(guarded):
    if not guarded:
        return CONVNET.replace("GUARD_CONV1", "").replace("GUARD_FC", "").replace("POOL_OUT", "pool1")
    return (CONVNET.replace("GUARD_CONV1", guard("conv1", "{name: c1, action: abort}"))
            .replace("GUARD_FC", guard(["fc"], "{name: f, action: clamp, max_abs: 1e6}"))
            # a not-in-place guard over two blobs between pool1 and fc
            .replace("POOL_OUT", "pool1_g")
            .replace('layer { name: "fc"', guard(["pool1", "relu1"], "{name: two, action: clamp}",
                                                 top=["pool1_g", "relu1_g"]) + 'layer { name: "fc"'))


def test_finite_input_is_bit_identical_to_the_unguarded_net(make_net):
    plain = make_net(_convnet(False))
    guarded = make_net(_convnet(True))
    for name in ("conv1", "fc"):
        for p_plain, p_guarded in zip(plain.params[name], guarded.params[name]):
            p_guarded.data[...] = p_plain.data
    rng = np.random.default_rng(3)
    data = rng.standard_normal((4, 2, 8, 8)).astype(np.float32)
    label = np.array([0, 1, 2, 1], np.float32)
    for net in (plain, guarded):
        net.blobs["data"].data[...] = data
        net.blobs["label"].data[...] = label
        net.forward()
        net.backward()
    assert guarded.blobs["loss"].data == plain.blobs["loss"].data
    for blob in ("conv1", "relu1", "pool1", "fc"):
        np.testing.assert_array_equal(guarded.blobs[blob].data, plain.blobs[blob].data)
    np.testing.assert_array_equal(guarded.blobs["pool1_g"].data, plain.blobs["pool1"].data)
    for blob in ("data", "conv1", "pool1", "fc"):
        np.testing.assert_array_equal(guarded.blobs[blob].diff, plain.blobs[blob].diff)
    for name in ("conv1", "fc"):
        for p_plain, p_guarded in zip(plain.params[name], guarded.params[name]):
            np.testing.assert_array_equal(p_guarded.diff, p_plain.diff)
    assert all(log.count == 0 for log in reporting.fault_logs() if log.layer in ("c1", "f", "two"))


def test_separate_top_is_repaired_and_the_bottom_left_alone(make_net):
    net = make_net('name: "sep" force_backward: true\n'
                   'layer { name: "in" type: "Input" top: "x" top: "z" '
                   'input_param { shape { dim: 2 dim: 2 } shape { dim: 3 } } }\n'
                   + guard(["x", "z"], "{name: sep, action: clamp, nan_value: -5}", top=["xg", "zg"])
                   + 'layer { name: "sx" type: "Reduction" bottom: "xg" top: "sx" loss_weight: 1 }\n'
                   'layer { name: "sz" type: "Reduction" bottom: "zg" top: "sz" loss_weight: 1 }\n')
    net.blobs["x"].data[...] = [[1.0, np.nan], [np.inf, 2.0]]
    net.blobs["z"].data[...] = [np.nan, 1.0, 1.0]
    net.forward()
    # +Inf becomes the default bound, 1000 (README: "Choosing the clamp bound").
    np.testing.assert_array_equal(net.blobs["xg"].data, [[1.0, -5.0], [1000.0, 2.0]])
    np.testing.assert_array_equal(net.blobs["zg"].data, [-5.0, 1.0, 1.0])
    assert np.isnan(net.blobs["x"].data[0, 1]) and np.isinf(net.blobs["x"].data[1, 0])
    log = last("sep")
    assert log.count == 2 and log.last.blob_index == 1  # each faulty bottom reported
    net.backward()  # Reduction SUM's gradient is 1 everywhere: copied to both bottoms
    np.testing.assert_array_equal(net.blobs["x"].diff, np.ones((2, 2)))
    np.testing.assert_array_equal(net.blobs["z"].diff, np.ones(3))


@pytest.mark.parametrize("param_str, expected", [
    ("{name: b, action: clamp, bound: 7}", [[7.0, -7.0, 0.0], [1.0, 20.0, -30.0]]),
    ("{name: b, action: clamp, bound: 7, max_abs: 10}", [[7.0, -7.0, 0.0], [1.0, 7.0, -7.0]]),
    ("{name: b, action: clamp, max_abs: 10, nan_value: -3}", [[10.0, -10.0, -3.0], [1.0, 10.0, -10.0]]),
])
def test_bound_is_what_clamp_writes(make_net, param_str, expected):
    net = make_net('name: "b"\nlayer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
                   + guard("x", param_str))
    net.blobs["x"].data[...] = [[np.inf, -np.inf, np.nan], [1.0, 20.0, -30.0]]
    net.forward()
    np.testing.assert_array_equal(net.blobs["x"].data, expected)


@pytest.mark.parametrize("check", ["forward", "backward", "both"])
def test_check_chooses_the_passes(make_net, check):
    # Forward: Log(-1) is NaN. Backward: dL/dy = 1e37 * 10 / 2 overflows in Power's backward.
    net = make_net(GRAD_OVERFLOW % guard("x", "{name: chk, action: clamp, check: %s}" % check))
    net.blobs["x"].data[...] = 1.0
    net.blobs["x"].data[0, 0] = np.nan
    net.forward()
    net.backward()
    passes = [r for r in (last("chk").first, last("chk").last) if r is not None]
    assert {r.pass_ for r in passes} == {"forward": {"forward data"}, "backward": {"backward diff"},
                                         "both": {"forward data", "backward diff"}}[check]
    assert np.isnan(net.blobs["x"].data[0, 0]) == (check == "backward")  # repaired only when checked
    assert np.isfinite(net.blobs["x"].diff).all() == (check != "forward")


def test_max_abs_on_gradients(make_net):
    # loss_weight 1: dL/dx = 10 * (10 x - t) / 2 = 50 for x = 1, t = 0: out of range for max_abs 20.
    net = make_net((GRAD_OVERFLOW % guard("x", "{name: gmax, check: backward, action: clamp, max_abs: 20}"))
                   .replace("loss_weight: 1e37", "loss_weight: 1"))
    net.blobs["x"].data[...] = 1.0
    net.blobs["t"].data[...] = 0.0
    net.forward()
    net.backward()
    report = last("gmax").last
    assert (report.pass_, report.kind, report.over, report.max_abs) == ("backward diff", "out-of-range", 6, 20.0)
    assert report.first_value == 50.0 and report.finite_max == 50.0
    assert "out-of-range backward diff" in report.line() and "over|20|=6" in report.line()
    np.testing.assert_array_equal(net.blobs["x"].diff, np.full((2, 3), 20.0))  # bound defaults to max_abs


def test_max_abs_flags_exploding_finite_values(make_net):
    net = make_net(log_net("{name: early, action: clamp, max_abs: 2, check: forward}"))
    net.blobs["x"].data[...] = [[1.0, 2.0, 3.0], [1e3, 1e-3, 1.0]]
    net.forward()
    report = last("early").last
    assert (report.over, report.nan, report.first_index) == (2, 0, (1, 0))
    np.testing.assert_allclose(net.blobs["y"].data,
                               [[0.0, np.log(2.0), np.log(3.0)], [2.0, -2.0, 0.0]], rtol=1e-6)


def test_test_phase_reports_test_and_no_iteration(make_net):
    net = make_net(log_net("{name: tst}"), phase="TEST")
    net.blobs["x"].data[...] = -1.0
    net.forward()
    report = last("tst", "TEST").last
    assert report.phase == "TEST" and report.iteration is None and report.call == 1
    assert "NaNGuard tst in TEST: non-finite forward data, call 1," in report.line()


def test_logging_is_rate_limited_with_periodic_and_final_summaries(make_net, capfd):
    net = make_net(log_net("{name: noisy, check: forward, log_first: 2, log_every: 3}"))
    net.blobs["x"].data[...] = -1.0
    for _ in range(8):
        net.forward()
    lines = [l for l in capfd.readouterr().err.splitlines() if "NaNGuard noisy" in l]
    assert len(lines) == 2 + 2  # two in full, then summaries at faults 5 and 8
    assert lines[1].endswith("(further faults summarised every 3)")
    assert "noisy in TRAIN: 5 faults so far (0 repaired; nan=30 " in lines[2]
    assert "noisy in TRAIN: 8 faults so far" in lines[3]
    last("noisy").final_summary()
    assert "final summary: NaNGuard noisy in TRAIN: 8 faults so far" in capfd.readouterr().err


def test_flight_recorder_writes_the_first_fault_once(make_net, tmp_path):
    dump = tmp_path / "dumps"
    net = make_net(log_net("{name: rec, check: forward, dump_dir: '%s'}" % dump))
    x = np.array([[1.0, -2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
    net.blobs["x"].data[...] = x
    net.forward()
    net.forward()
    stem = "TRAIN-rec-forward-data-iter0-call1"
    assert sorted(p.name for p in dump.iterdir()) == [stem + ".json", stem + ".npz"]
    saved = np.load(dump / (stem + ".npz"))["bottom0"]
    np.testing.assert_array_equal(np.isnan(saved), x < 0)
    record = json.loads((dump / (stem + ".json")).read_text())
    assert record["arrays"] == ["bottom0"]
    assert reporting.FaultReport.from_json(record["report"]) == last("rec").first
    assert record["line"] == last("rec").first.line()


def test_flight_recorder_size_cap_through_the_layer(make_net, tmp_path):
    # Two 2x3 float32 bottoms are 24 bytes each; a 30-byte cap keeps the first only.
    dump = tmp_path / "capped"
    net = make_net('name: "two" force_backward: true\n'
                   'layer { name: "in" type: "Input" top: "a" top: "b" '
                   'input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } } }\n'
                   + guard(["a", "b"], "{name: cap, check: forward, dump_dir: '%s', dump_max_mb: 3e-5}" % dump))
    net.blobs["a"].data[...] = np.nan
    net.blobs["b"].data[...] = 1.0
    net.forward()
    (record_path,) = dump.glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["arrays"] == ["bottom0"] and record["max_bytes"] == 30
    assert record["skipped_over_size_cap"] == [{"name": "bottom1", "shape": [2, 3], "bytes": 24}]
    assert list(np.load(record_path.with_suffix(".npz"))) == ["bottom0"]


@pytest.mark.parametrize("where", ["file", "sysfs"])
def test_flight_recorder_failure_is_reported_once_and_abort_goes_ahead(make_net, tmp_path, capfd, where):
    if where == "file":
        blocker = tmp_path / "dumps"
        blocker.write_text("a file where the folder should be")
        error = "FileExistsError"
    else:  # a folder nobody may create, like one on a read-only disk (tests run as root here)
        blocker = "/sys/safe_layers_dumps"
        error = "PermissionError"
        if os.path.exists(blocker):
            pytest.skip("%s exists on this machine" % blocker)
    net = make_net(log_net("{name: ro, action: abort, dump_dir: '%s'}" % blocker))
    net.blobs["x"].data[...] = -1.0
    with pytest.raises(reporting.FaultAbort) as info:
        net.forward()
    lines = [reporting.parse_line(l) for l in capfd.readouterr().err.splitlines()]
    assert [l.kind for l in lines if l is not None] == ["abort", "abort_report", "record_failure"]
    assert lines[0].report == info.value.report  # the report came first, intact
    assert lines[2].failure.action == "abort" and error in lines[2].failure.error
    assert last("ro").count == 1


def test_flight_recorder_failure_keeps_training_going_with_warn(make_net, tmp_path, capfd):
    net = make_net(log_net("{name: rw, action: clamp, dump_dir: '%s'}" % (tmp_path / "f" / "sub")))
    (tmp_path / "f").write_text("not a folder")
    net.blobs["x"].data[...] = -1.0
    for _ in range(3):
        net.forward()
    kinds = [reporting.parse_line(l).kind for l in capfd.readouterr().err.splitlines()]
    assert kinds == ["fault", "record_failure", "fault", "fault"]  # the failure said once
    assert np.isfinite(net.blobs["y"].data).all() and last("rw").count == 3


FULL_DISK = """
import resource, sys
import numpy as np
import caffe
caffe.set_mode_cpu()
# Files may not grow beyond 4 kB: like a disk that fills up in the middle of the .npz.
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
net = caffe.Net(sys.argv[1], caffe.TRAIN)
net.blobs["x"].data[...] = np.random.default_rng(0).standard_normal(net.blobs["x"].data.shape)
net.forward()
print("forward done")
"""


def test_a_full_disk_leaves_no_partial_record_and_training_goes_on(tmp_path):
    import subprocess
    import sys
    dump = tmp_path / "dumps"
    net_path = tmp_path / "net.prototxt"
    net_path.write_text(log_net("{name: full, check: forward, dump_dir: '%s'}" % dump).replace(
        "dim: 2 dim: 3 } shape { dim: 2 dim: 3", "dim: 64 dim: 512 } shape { dim: 64 dim: 512"))
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    result = subprocess.run([sys.executable, str(script), str(net_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "forward done" in result.stdout, result.stderr[-2000:]
    kinds = [p.kind for p in map(reporting.parse_line, result.stderr.splitlines()) if p is not None]
    assert kinds[:2] == ["fault", "record_failure"], result.stderr[-2000:]
    assert "File too large" in result.stderr
    assert list(dump.iterdir()) == []  # no partial .npz, no temporary file


def test_a_guard_named_like_a_path_records_under_caffe_train(caffe_train, tmp_path):
    result = caffe_train(
        CLI_NET.format(shape="dim: 2 dim: 3", middle=(
            'layer { name: "log" type: "Log" bottom: "x" top: "y" }\n'
            + guard("y", "{name: ip/guard, follows: log, action: clamp, dump_dir: dumps}"))),
        max_iter=2)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "NaNGuard ip/guard (after log) in TRAIN: non-finite forward data, iteration 0" in result.stderr
    (record,) = (tmp_path / "dumps").glob("*.json")
    assert record.name.startswith("TRAIN-ip_guard-") and record.name.endswith("-forward-data-iter0-call1.json")
    assert json.loads(record.read_text())["report"]["layer"] == "ip/guard"


def test_an_over_long_name_still_records(make_net, tmp_path):
    name = "g" * 300
    net = make_net(log_net("{name: %s, dump_dir: '%s'}" % (name, tmp_path)))
    net.blobs["x"].data[...] = -1.0
    net.forward()
    (record,) = tmp_path.glob("*.json")
    assert len(record.name) < 200 and json.loads(record.read_text())["report"]["layer"] == name


def test_guard_needs_matching_tops(make_net):
    with pytest.raises(ParamError, match="NaNGuard param_str: needs as many tops as bottoms"):
        make_net('name: "m"\nlayer { name: "in" type: "Input" top: "x" top: "z" '
                 'input_param { shape { dim: 1 } shape { dim: 1 } } }\n'
                 'layer { name: "g" type: "Python" bottom: "x" bottom: "z" top: "x" '
                 'python_param { module: "safe_layers" layer: "NaNGuard" } }\n')


def test_clamp_on_a_diverging_solver_escalates_to_abort(make_solver):
    # lr 0.1 on inputs of std 10 diverges: every step multiplies the error by ~|1 - 0.1*100|.
    plain = make_solver(DIVERGING_NET.replace("LAYER", ""), base_lr=0.1)
    plain.step(200)
    assert not np.isfinite(plain.net.params["fc"][0].data).all()
    guarded = make_solver(DIVERGING_NET.replace("LAYER", guard("y", "{name: div, action: clamp, max_abs: 1e3}")),
                          base_lr=0.1)
    with pytest.raises(reporting.FaultAbort) as info:
        guarded.step(200)
    report = info.value.report
    assert (report.action, report.escalated_from, report.escalated_after) == ("abort", "clamp", 10)
    assert "action=abort (escalated from clamp after 10 consecutive faulty calls)" in report.line()
    log = last("div")
    assert (log.count, log.repaired) == (10, 9) and log.last is report
    assert [log.first.call, report.call] == [report.call - 9, report.call]
    # escalate_after: 0 repairs for ever: the numbers stay finite while the fit is lost,
    # which is why repairs escalate by default.
    forever = make_solver(DIVERGING_NET.replace("LAYER", guard(
        "y", "{name: div0, action: clamp, max_abs: 1e3, escalate_after: 0}")), base_lr=0.1)
    forever.step(200)
    assert np.isfinite(forever.net.params["fc"][0].data).all()
    assert last("div0").count > 150 and last("div0").repaired == last("div0").count


def test_escalation_needs_consecutive_faulty_calls(make_net, capfd):
    net = make_net(log_net("{name: alt, action: clamp, check: forward, escalate_after: 3}"))
    for value in [-1, 1, -1, -1, 1, -1, -1, 1] * 3:  # never three faulty calls in a row
        net.blobs["x"].data[...] = value
        net.forward()
    assert last("alt").count == 15 and last("alt").repaired == 15
    net.blobs["x"].data[...] = -1
    net.forward()
    net.forward()
    with pytest.raises(reporting.FaultAbort, match=r"escalated from clamp after 3 consecutive faulty calls"):
        net.forward()
    lines = [reporting.parse_line(l) for l in capfd.readouterr().err.splitlines()]
    assert [l.kind for l in lines[-3:]] == ["abort", "abort_report", "notice"]
    assert lines[-1].message == ("clamp was needed on 3 calls in a row: the net is dead (or the fault is built "
                                 "into it and repairing it is meant: then say escalate_after: 0)")
