"""The blob->array backend on real Caffe blobs."""

import numpy as np
import pytest

from safe_layers import backend

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


def test_gpu_mode_without_device_pointers_falls_back_once_with_a_warning(make_net, monkeypatch, capsys):
    # This Caffe is CPU_ONLY: it has no Blob._gpu_data_ptr, which is the fallback case.
    net = make_net(NET)
    monkeypatch.setenv("SAFE_LAYERS_MODE", "gpu")
    monkeypatch.setattr(backend, "_explicit_mode", None)
    monkeypatch.setattr(backend, "_warned_host_fallback", False)
    with pytest.warns(RuntimeWarning, match="two host<->device copies"):
        array = backend.data(net.blobs["x"])
    assert isinstance(array, np.ndarray) and backend.same_memory(array, net.blobs["x"].data)
    assert "falling back to NumPy" in capsys.readouterr().err
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.diff(net.blobs["x"])  # warned once already: no second warning


def test_set_mode_gpu_on_a_cpu_only_caffe_raises_instead_of_aborting(caffe, monkeypatch):
    monkeypatch.setattr(backend, "_explicit_mode", None)
    with pytest.raises(RuntimeError, match="this Caffe was built CPU_ONLY"):
        backend.set_mode_gpu()
    assert backend.mode() == "cpu"
    backend.set_mode_cpu()
    assert backend.mode() == "cpu"


class _DeviceBlob:
    """A stand-in for a GPU build's Blob: CuPy memory behind `_gpu_data_ptr`/`_gpu_diff_ptr`.

    No Caffe with GPU support exists where CuPy runs, so this checks the pointer
    wrapping itself; the CPU tests above run against real Caffe blobs.
    """

    def __init__(self, cupy, shape):
        self.shape = shape
        self._data = cupy.zeros(shape, cupy.float32)
        self._diff = cupy.zeros(shape, cupy.float32)

    @property
    def _gpu_data_ptr(self):
        return self._data.data.ptr

    @property
    def _gpu_diff_ptr(self):
        return self._diff.data.ptr


@pytest.mark.gpu
def test_gpu_mode_wraps_device_memory_without_copy(monkeypatch):
    cupy = pytest.importorskip("cupy")
    blob = _DeviceBlob(cupy, (4, 5))
    monkeypatch.setattr(backend, "_explicit_mode", "gpu")
    data = backend.data(blob)
    assert isinstance(data, cupy.ndarray) and data.shape == (4, 5)
    assert data.data.ptr == blob._gpu_data_ptr
    data[1, 2] = 7.0
    assert float(blob._data[1, 2]) == 7.0
    diff = backend.diff(blob)
    diff += 1
    assert float(blob._diff.sum()) == 20.0
