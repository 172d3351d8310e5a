"""Blob -> array: the one place that turns a Caffe blob's data or diff into an array.

* CPU mode: the NumPy view pycaffe gives (``blob.data`` / ``blob.diff``), zero-copy.
* GPU mode, CuPy importable and a Caffe built with GPU support (it exposes
  ``Blob._gpu_data_ptr`` / ``_gpu_diff_ptr``, BVLC PR #5904): a zero-copy CuPy array
  over the blob's own device memory, so a layer's math runs on the GPU with no host
  round trip.
* GPU mode without those: NumPy views, with a one-time warning that each Python layer
  then costs two host<->device copies of every blob it touches.

pycaffe cannot tell Python which mode Caffe runs in, so the mode comes from, in order:
:func:`set_mode_gpu` / :func:`set_mode_cpu` (which also switch Caffe), the environment
variable ``SAFE_LAYERS_MODE`` (``cpu`` or ``gpu``), and the ``-gpu`` flag of the
``caffe`` command line when the layer runs inside the ``caffe`` binary.

Layers call :func:`data` and :func:`diff` and never touch ``.data``/``.diff`` directly.
"""

import os
import sys
import warnings

import numpy

from safe_layers import host

_MODES = ("cpu", "gpu")
_explicit_mode = None
_warned_host_fallback = False


def set_mode_gpu(device=None):
    """Switch Caffe and safe_layers to GPU mode (``caffe.set_mode_gpu()`` alone cannot
    be seen from Python)."""
    import caffe
    global _explicit_mode
    # A CPU_ONLY Caffe answers set_mode_gpu() with LOG(FATAL), killing the interpreter;
    # such a build also lacks the device pointers, which is how we can tell beforehand.
    if not hasattr(caffe._caffe.Blob, "_gpu_data_ptr"):
        raise RuntimeError("this Caffe was built CPU_ONLY (no Blob._gpu_data_ptr): it cannot run "
                           "on a GPU; stay in CPU mode or build Caffe with CUDA")
    if device is not None:
        caffe.set_device(int(device))
    caffe.set_mode_gpu()
    _explicit_mode = "gpu"


def set_mode_cpu():
    """Switch Caffe and safe_layers to CPU mode."""
    import caffe
    global _explicit_mode
    caffe.set_mode_cpu()
    _explicit_mode = "cpu"


def _caffe_cli_asks_gpu():
    argv = host.caffe_cli_argv() or []
    for i, arg in enumerate(argv):
        if arg in ("-gpu", "--gpu") and i + 1 < len(argv):
            return True
        if arg.startswith(("-gpu=", "--gpu=")) and arg.split("=", 1)[1]:
            return True
    return False


def mode():
    """'cpu' or 'gpu': the mode the layers should assume Caffe runs in."""
    if _explicit_mode is not None:
        return _explicit_mode
    env = os.environ.get("SAFE_LAYERS_MODE", "").strip().lower()
    if env:
        if env not in _MODES:
            raise ValueError("SAFE_LAYERS_MODE=%r; allowed: cpu, gpu" % env)
        return env
    return "gpu" if _caffe_cli_asks_gpu() else "cpu"


def _cupy():
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def _device_array(blob, ptr_attr):
    """A CuPy array over the blob's device memory, or None where that is not possible."""
    cupy = _cupy()
    if cupy is None or not hasattr(type(blob), ptr_attr):
        return None
    ptr = getattr(blob, ptr_attr)
    shape = tuple(blob.shape)
    nbytes = int(numpy.prod(shape, dtype=numpy.int64)) * 4
    # owner=blob keeps the Caffe blob (and so its SyncedMemory) alive as long as the array.
    memory = cupy.cuda.UnownedMemory(ptr, nbytes, owner=blob)
    return cupy.ndarray(shape, dtype=cupy.float32, memptr=cupy.cuda.MemoryPointer(memory, 0))


def _host_array(blob, which):
    global _warned_host_fallback
    if mode() == "gpu" and not _warned_host_fallback:
        _warned_host_fallback = True
        reason = ("CuPy is not importable" if _cupy() is None
                  else "this Caffe build exposes no Blob._gpu_data_ptr/_gpu_diff_ptr")
        warnings.warn("safe_layers: GPU mode but %s; Python layers fall back to NumPy, which "
                      "costs two host<->device copies of every blob each layer touches"
                      % reason, RuntimeWarning, stacklevel=4)
        print("W safe_layers backend: GPU mode but %s; falling back to NumPy "
              "(two host<->device copies per blob per Python layer)" % reason, file=sys.stderr)
    return blob.data if which == "data" else blob.diff


def _blob_array(blob, which):
    if mode() == "gpu":
        array = _device_array(blob, "_gpu_%s_ptr" % which)
        if array is not None:
            return array
    return _host_array(blob, which)


def data(blob):
    """The blob's data as a zero-copy array (NumPy on CPU, CuPy on GPU where possible)."""
    return _blob_array(blob, "data")


def diff(blob):
    """The blob's diff as a zero-copy array (NumPy on CPU, CuPy on GPU where possible)."""
    return _blob_array(blob, "diff")


def same_memory(a, b):
    """Whether two arrays start at the same address (an in-place layer's top and bottom)."""
    def address(x):
        return x.__array_interface__["data"][0] if isinstance(x, numpy.ndarray) else x.data.ptr
    return address(a) == address(b)
