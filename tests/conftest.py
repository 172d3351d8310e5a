"""Fixtures that build small real Caffe nets (pycaffe) and run the real `caffe` binary.

A test that needs Caffe skips when pycaffe is missing, except in CI (CI=true), where a
missing pycaffe fails the run: CI must never go green by skipping the real thing.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Caffe's INFO/WARNING lines would bury pytest's output; errors still show.
os.environ.setdefault("GLOG_minloglevel", "2")

IN_CI = os.environ.get("CI", "").lower() == "true"


def _import_caffe():
    try:
        import caffe
    except ImportError as exc:
        message = "pycaffe is not importable (%s); run `make setup`" % exc
        if IN_CI:
            pytest.fail("CI=true: " + message, pytrace=False)
        pytest.skip(message)
    caffe.set_mode_cpu()
    return caffe


@pytest.fixture(autouse=True)
def _fresh_fault_logs():
    """Each test reads only the fault logs of the layers it built, and the test process
    prints no final summaries for them at exit."""
    from safe_layers import reporting
    reporting.clear_fault_logs()
    yield
    reporting.clear_fault_logs()


@pytest.fixture
def caffe():
    return _import_caffe()


@pytest.fixture
def make_net(caffe, tmp_path):
    """make_net(prototxt_text, phase='TRAIN', weights=None) -> caffe.Net"""
    counter = [0]

    def build(text, phase="TRAIN", weights=None):
        counter[0] += 1
        path = tmp_path / ("net%d.prototxt" % counter[0])
        path.write_text(textwrap.dedent(text))
        phase_value = getattr(caffe, phase)
        if weights is not None:
            return caffe.Net(str(path), str(weights), phase_value)
        return caffe.Net(str(path), phase_value)

    return build


@pytest.fixture
def write_solver(tmp_path):
    """write_solver(net_text, **solver_fields) -> path of a solver file for that net."""
    counter = [0]

    def write(net_text, **fields):
        counter[0] += 1
        net_path = tmp_path / ("train%d.prototxt" % counter[0])
        net_path.write_text(textwrap.dedent(net_text))
        solver_path = tmp_path / ("solver%d.prototxt" % counter[0])
        solver_path.write_text(solver_text(net_path, **fields))
        return solver_path

    return write


@pytest.fixture
def make_solver(caffe, write_solver):
    """make_solver(net_text, **solver_fields) -> caffe.SGDSolver (seeded, CPU)."""
    return lambda net_text, **fields: caffe.SGDSolver(str(write_solver(net_text, **fields)))


def solver_text(net_path, **fields):
    values = {"base_lr": 0.01, "lr_policy": '"fixed"', "max_iter": 100, "display": 0,
              "random_seed": 1, "solver_mode": "CPU", "snapshot_after_train": "false"}
    values.update(fields)
    lines = ['net: "%s"' % net_path] + ["%s: %s" % kv for kv in values.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def caffe_bin(caffe):
    """Run the real `caffe` binary of this environment; returns CompletedProcess."""
    binary = Path(sys.executable).parent / "caffe"
    if not binary.exists():
        message = "no caffe binary at %s; run `make setup`" % binary
        if IN_CI:
            pytest.fail("CI=true: " + message, pytrace=False)
        pytest.skip(message)

    def run(*args, cwd=None, timeout=300):
        env = dict(os.environ)
        env["GLOG_minloglevel"] = "0"
        return subprocess.run([str(binary), *map(str, args)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def caffe_train(caffe_bin, write_solver, tmp_path):
    """caffe_train(net_text, **solver_fields): `caffe train` on that net in tmp_path."""
    return lambda net_text, **fields: caffe_bin("train", "-solver", write_solver(net_text, **fields),
                                                cwd=tmp_path)


def _cupy_device():
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
        return cupy
    except Exception:  # noqa: BLE001 - any failure means "no usable GPU"
        return None


def array_modules():
    """pytest params: numpy always, cupy marked gpu (skipped where no GPU is usable)."""
    import numpy
    cupy = _cupy_device()
    return [pytest.param(numpy, id="numpy"),
            pytest.param(cupy, id="cupy",
                         marks=[pytest.mark.gpu,
                                pytest.mark.skipif(cupy is None, reason="no CuPy/GPU here")])]


def numeric_gradient(net, blob, loss="loss", eps=1e-2):
    """Central finite differences of ``net``'s output ``loss`` w.r.t. the data of ``blob``
    (a float64 array shaped like the blob). The net runs float32, so callers compare with
    a tolerance fitted to ``eps``."""
    import numpy as np
    data = net.blobs[blob].data
    grad = np.zeros(data.shape, np.float64)
    for index in np.ndindex(*data.shape):
        original = float(data[index])
        data[index] = original + eps
        plus = float(net.forward()[loss].sum())
        data[index] = original - eps
        minus = float(net.forward()[loss].sum())
        data[index] = original
        grad[index] = (plus - minus) / (2 * eps)
    net.forward()
    return grad


# Linear regression that SGD with base_lr 0.1 makes diverge: inputs of std 10 put the
# curvature near 100, so every step multiplies the error by about |1 - 0.1 * 100| = 9.
# LAYER is where a test puts the layer that should keep it finite (on the fc output "y").
DIVERGING_NET = """
name: "diverging"
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 16 dim: 10 } shape { dim: 16 dim: 1 }
    data_filler { type: "gaussian" std: 10 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "y"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.1 } } }
LAYER
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""
