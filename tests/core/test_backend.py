"""The blob->array backend on real Caffe blobs."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from safe_layers.core import backend, caffe_process
from support.devices import cupy_device, gpu_build

NET = """
name: "backend"
force_backward: true
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "double" type: "Power" bottom: "x" top: "y" power_param { scale: 2 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "x" top: "l" }
"""


def test_cpu_data_is_a_zero_copy_view(make_net):
    net = make_net(NET)
    blob = net.blobs["x"]
    array = backend.data(blob)
    assert isinstance(array, np.ndarray) and array.dtype == np.float32
    array[...] = np.arange(6, dtype=np.float32).reshape(2, 3)
    # The write is visible through pycaffe and to the C++ layers that run next.
    np.testing.assert_array_equal(blob.data, array)
    net.forward()
    np.testing.assert_array_equal(net.blobs["y"].data, 2 * np.arange(6).reshape(2, 3))
    assert backend.same_memory(array, blob.data)


def test_cpu_diff_is_a_zero_copy_view(make_net):
    net = make_net(NET)
    net.blobs["x"].data[...] = 1.0
    net.forward()
    net.backward()
    grad = backend.diff(net.blobs["x"])
    assert backend.same_memory(grad, net.blobs["x"].diff)
    grad[0, 0] = 123.0
    assert net.blobs["x"].diff[0, 0] == 123.0


def test_mode_defaults_to_cpu_and_reads_environment(monkeypatch):
    monkeypatch.delenv("SAFE_LAYERS_MODE", raising=False)
    monkeypatch.setattr(backend, "_explicit_mode", None)
    assert backend.mode() == "cpu"
    monkeypatch.setenv("SAFE_LAYERS_MODE", "GPU")
    assert backend.mode() == "gpu"
    monkeypatch.setenv("SAFE_LAYERS_MODE", "tpu")
    with pytest.raises(ValueError, match="SAFE_LAYERS_MODE='tpu'; allowed: cpu, gpu"):
        backend.mode()


def _fresh_mode(monkeypatch, env=None):
    monkeypatch.setattr(backend, "_explicit_mode", None)
    monkeypatch.setattr(backend, "_warned_host_fallback", False)
    if env is None:
        monkeypatch.delenv("SAFE_LAYERS_MODE", raising=False)
    else:
        monkeypatch.setenv("SAFE_LAYERS_MODE", env)


def test_gpu_mode_without_a_usable_gpu_falls_back_once_with_a_warning(make_net, monkeypatch, capsys):
    """GPU mode asked for, but nothing to run on: a CPU_ONLY Caffe (no device pointers),
    or a CUDA Caffe without a device, where reading a device pointer is a LOG(FATAL)."""
    net = make_net(NET)
    if gpu_build(caffe_module()) and backend.gpu_devices()[0] > 0:
        pytest.skip("a usable GPU is here: the fallback is not taken")
    _fresh_mode(monkeypatch, "gpu")
    with pytest.warns(RuntimeWarning, match="two host<->device copies"):
        array = backend.data(net.blobs["x"])
    assert isinstance(array, np.ndarray) and backend.same_memory(array, net.blobs["x"].data)
    err = capsys.readouterr().err
    assert "falling back to NumPy" in err
    if importlib.util.find_spec("cupy") is None:  # a CPU set-up (CuPy comes with CUDA=1)
        assert "CuPy is not importable" in err
    elif gpu_build(caffe_module()):
        assert "no usable CUDA device" in err
    else:
        assert "exposes no Blob._gpu_data_ptr" in err
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.diff(net.blobs["x"])  # warned once already: no second warning


def caffe_module():
    import caffe
    return caffe


GUARDED = NET.replace(
    'layer { name: "loss"',
    'layer { name: "g" type: "Python" bottom: "y" top: "y" python_param { module: "safe_layers" '
    'layer: "NaNGuard" param_str: "{name: g, action: clamp}" } }\nlayer { name: "loss"')


def test_gpu_mode_without_a_device_never_touches_a_device_pointer(tmp_path):
    """A whole forward/backward with a guard in GPU mode where no GPU is usable, in a
    child process: with a CUDA build a single device-pointer read would abort it (134)."""
    script = tmp_path / "run.py"
    (tmp_path / "net.prototxt").write_text(GUARDED.replace("force_backward: true", "force_backward: true"))
    script.write_text(textwrap.dedent("""
        import os, sys, warnings
        import caffe
        from safe_layers.core import backend
        if hasattr(caffe._caffe.Blob, "_gpu_data_ptr") and backend.gpu_devices()[0] > 0:
            sys.exit(77)
        caffe.set_mode_cpu()
        net = caffe.Net("net.prototxt", caffe.TRAIN)
        net.blobs["x"].data[...] = float("nan")
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            net.forward()
            net.backward()
        assert (net.blobs["y"].data == 0).all(), net.blobs["y"].data  # clamped on the host
        print("ok", backend.mode())
    """))
    env = dict(os.environ, SAFE_LAYERS_MODE="gpu", GLOG_minloglevel="2")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    if result.returncode == 77:
        pytest.skip("a usable GPU is here")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok gpu"
    assert "falling back to NumPy" in result.stderr


def test_set_mode_gpu_without_a_usable_gpu_raises_instead_of_aborting(caffe, monkeypatch):
    if gpu_build(caffe) and backend.gpu_devices()[0] > 0:
        pytest.skip("a usable GPU is here")
    _fresh_mode(monkeypatch)
    expected = ("no usable CUDA device|no CUDA device" if gpu_build(caffe)
                else "this Caffe was built CPU_ONLY")
    with pytest.raises(RuntimeError, match=expected):
        backend.set_mode_gpu()
    assert backend.mode() == "cpu"
    backend.set_mode_cpu()
    assert backend.mode() == "cpu"


def test_gpu_devices_answers_without_a_driver_and_is_asked_once():
    count, reason = backend.gpu_devices()
    assert count >= 0 and (count > 0) == (reason is None)
    assert backend.gpu_devices() is backend.gpu_devices()


SOLVER = """net: "net.prototxt"
base_lr: 0.01
lr_policy: "fixed"
max_iter: 1
"""


@pytest.mark.parametrize("argv, solver_mode, expected", [
    (["caffe", "train", "-solver", "{solver}"], "GPU", "gpu"),
    (["caffe", "train", "--solver={solver}"], "GPU", "gpu"),
    (["caffe", "train", "-solver", "{solver}"], "CPU", "cpu"),
    (["caffe", "train", "-solver", "{solver}"], None, "cpu"),     # Caffe's default: CPU
    (["caffe", "train", "-solver", "{solver}", "-gpu", "0"], "CPU", "gpu"),
    (["caffe", "test", "-model", "m.prototxt", "-gpu=all"], None, "gpu"),
    (["caffe", "test", "-model", "m.prototxt"], None, "cpu"),
])
def test_mode_under_the_caffe_binary_follows_its_command_line_and_solver(
        caffe, tmp_path, monkeypatch, argv, solver_mode, expected):
    solver = tmp_path / "solver.prototxt"
    solver.write_text(SOLVER + ("solver_mode: %s\n" % solver_mode if solver_mode else ""))
    _fresh_mode(monkeypatch)
    backend._solver_mode.cache_clear()
    monkeypatch.setattr(caffe_process, "caffe_cli_argv", lambda: tuple(a.format(solver=solver) for a in argv))
    assert backend.mode() == expected


def test_an_unreadable_solver_on_the_caffe_command_line_fails_loudly(caffe, tmp_path, monkeypatch):
    solver = tmp_path / "solver.prototxt"
    solver.write_text(SOLVER + "solver_mode: TPU\n")
    _fresh_mode(monkeypatch)
    backend._solver_mode.cache_clear()
    monkeypatch.setattr(caffe_process, "caffe_cli_argv", lambda: ("caffe", "train", "-solver", str(solver)))
    with pytest.raises(RuntimeError, match="cannot read solver_mode from %s, the solver caffe's -solver "
                       "names .*set SAFE_LAYERS_MODE=cpu or gpu" % solver):
        backend.mode()
    backend._solver_mode.cache_clear()


def test_memory_pool_bound_reads_its_variable(monkeypatch):
    class Pool:
        limit = 0
        calls = []

        def get_limit(self):
            return self.limit

        def set_limit(self, **kwargs):
            self.calls.append(kwargs)

    class FakeCupy:
        pool = Pool()

        def get_default_memory_pool(self):
            return self.pool

    fake = FakeCupy()
    monkeypatch.delenv("SAFE_LAYERS_GPU_POOL_MB", raising=False)
    backend._bound_memory_pool(fake)
    monkeypatch.setenv("SAFE_LAYERS_GPU_POOL_MB", "512")
    backend._bound_memory_pool(fake)
    assert Pool.calls == [{"fraction": backend.POOL_FRACTION}, {"size": 512 * 2**20}]
    monkeypatch.setenv("SAFE_LAYERS_GPU_POOL_MB", "lots")
    with pytest.raises(ValueError, match="SAFE_LAYERS_GPU_POOL_MB='lots'; allowed: a number of megabytes > 0"):
        backend._bound_memory_pool(fake)
    Pool.limit = 123  # the process set its own bound: left alone
    backend._bound_memory_pool(fake)
    assert len(Pool.calls) == 2


# ---- on a GPU, with a CUDA build of Caffe: real blobs on the device -------------------

def _gpu_caffe():
    """pycaffe in GPU mode on device 0, or a skip saying what is missing."""
    import caffe
    if not gpu_build(caffe):
        pytest.skip("this Caffe is CPU_ONLY (make setup CUDA=1 builds one with CUDA)")
    if cupy_device() is None:
        pytest.skip("no CuPy/GPU here: %s" % backend.gpu_devices()[1])
    backend.set_mode_gpu(0)
    return caffe


@pytest.mark.gpu
def test_gpu_mode_wraps_a_real_blob_without_copy(make_net):
    caffe = _gpu_caffe()
    import cupy
    try:
        net = make_net(NET)
        blob = net.blobs["x"]
        data = backend.data(blob)
        assert isinstance(data, cupy.ndarray) and data.shape == (2, 3) and data.dtype == cupy.float32
        assert data.data.ptr == blob._gpu_data_ptr
        assert data.data.mem.device_id == cupy.cuda.runtime.getDevice()
        data[...] = cupy.arange(6, dtype=cupy.float32).reshape(2, 3)
        net.forward()  # Caffe's Power layer reads the device memory we wrote
        np.testing.assert_array_equal(net.blobs["y"].data, 2 * np.arange(6).reshape(2, 3))
        net.backward()
        diff = backend.diff(blob)
        assert diff.data.ptr == blob._gpu_diff_ptr
        diff += 1
        np.testing.assert_array_equal(blob.diff, cupy.asnumpy(diff))
    finally:
        backend.set_mode_cpu()
        caffe.set_mode_cpu()


@pytest.mark.gpu
def test_caffe_reshape_to_a_bigger_batch_after_our_layers_ran(tmp_path):
    """Our layers' temporaries stay in CuPy's pool; Caffe's own cudaMalloc must still
    find memory for a bigger batch (a child process: a failed cudaMalloc is LOG(FATAL))."""
    _gpu_caffe()
    backend.set_mode_cpu()
    (tmp_path / "net.prototxt").write_text(GUARDED)
    (tmp_path / "run.py").write_text(textwrap.dedent("""
        import cupy, caffe
        from safe_layers.core import backend
        backend.set_mode_gpu(0)
        net = caffe.Net("net.prototxt", caffe.TRAIN)
        pool = cupy.get_default_memory_pool()
        net.blobs["x"].reshape(2, 3); net.forward(); net.backward()  # bounds the pool
        limit = pool.get_limit()
        free, total = cupy.cuda.runtime.memGetInfo()
        assert 0 < limit < free, (limit, free)
        # Temporaries up to 90 % of the bound, freed: the pool keeps them.
        blocks = [cupy.empty(int(limit * 0.9) // 16 // 8, cupy.float64) for _ in range(16)]
        del blocks
        assert pool.total_bytes() <= limit
        # Caffe needs most of what the pool does not hold: x, y (data and diff) and the
        # loss's difference blob, about 80 bytes per row of 3 floats.
        n = int((free - limit) * 0.7) // 80
        net.blobs["x"].reshape(n, 3)
        net.reshape(); net.forward(); net.backward()
        print("ok", n, pool.get_limit(), pool.total_bytes())
    """))
    env = dict(os.environ, GLOG_minloglevel="2")
    result = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok ")
