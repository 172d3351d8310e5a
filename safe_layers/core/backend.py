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
variable ``SAFE_LAYERS_MODE`` (``cpu`` or ``gpu``), and, inside the ``caffe`` binary, its
command line: ``-gpu``, or else ``solver_mode: GPU`` in the solver ``caffe train
-solver`` names (Caffe itself switches to the GPU on either).

A device pointer is touched only where CuPy sees a usable CUDA device: with a GPU build
of Caffe and no device, reading ``Blob._gpu_data_ptr`` is a ``LOG(FATAL)`` that kills
the process. Where there is none, Caffe cannot be running on a GPU either, so the
layers take the host arrays, and say so once.

CuPy's memory pool keeps every freed temporary for reuse; Caffe's own ``cudaMalloc``
(a reshape to a bigger batch) cannot use that memory and aborts when the card is full.
So on first use the pool is bounded (``SAFE_LAYERS_GPU_POOL_MB``, default a tenth of
the card), unless the process already set a limit.

Layers call :func:`data` and :func:`diff` and never touch ``.data``/``.diff`` directly.

Checks at once or deferred (``safe_layers.core.deferred``): :func:`deferred_checks` says which
way a layer checks an array. Automatic (the default): deferred for device arrays (one
host read per pass instead of one per check), at once for NumPy arrays (on the host a
read costs nothing, and an abort stops at the layer that saw the fault).
:func:`set_checks` or ``SAFE_LAYERS_CHECKS`` (``immediate`` / ``deferred`` / ``auto``)
force one way, for tests and benchmarks.
"""

import functools
import os
import sys
import warnings

import numpy

from safe_layers.core import caffe_process

_MODES = ("cpu", "gpu")
_CHECKS = ("auto", "immediate", "deferred")
_explicit_mode = None
_explicit_checks = None
_warned_host_fallback = False
_pool_bounded = False
#: The share of the card's memory CuPy's pool may hold when SAFE_LAYERS_GPU_POOL_MB is unset.
POOL_FRACTION = 0.1


def _cupy():
    try:
        import cupy
    except ImportError:
        return None
    return cupy


@functools.lru_cache(maxsize=None)
def gpu_devices():
    """(number of CUDA devices CuPy can use, why none when 0). Asked once per process."""
    cupy = _cupy()
    if cupy is None:
        return 0, "CuPy is not importable"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - CUDARuntimeError and driver load failures alike
        return 0, "no usable CUDA device (%s)" % exc
    return (count, None) if count > 0 else (0, "no CUDA device")


def set_mode_gpu(device=None):
    """Switch Caffe and safe_layers to GPU mode (``caffe.set_mode_gpu()`` alone cannot
    be seen from Python).

    Raises RuntimeError, before Caffe is touched, for a CPU_ONLY Caffe and where CuPy
    sees no usable device (Caffe would abort the process at its first allocation).
    """
    import caffe
    global _explicit_mode
    # A CPU_ONLY Caffe answers set_mode_gpu() with LOG(FATAL), killing the interpreter;
    # such a build also lacks the device pointers, which is how we can tell beforehand.
    if not hasattr(caffe._caffe.Blob, "_gpu_data_ptr"):
        raise RuntimeError("this Caffe was built CPU_ONLY (no Blob._gpu_data_ptr): it cannot run "
                           "on a GPU; stay in CPU mode or build Caffe with CUDA (make setup CUDA=1)")
    count, reason = gpu_devices()
    if _cupy() is not None and count == 0:
        raise RuntimeError("safe_layers: %s; Caffe in GPU mode would abort the process at its first "
                           "device allocation: stay in CPU mode" % reason)
    if device is not None:
        if count and not 0 <= int(device) < count:
            raise ValueError("GPU device %d does not exist; this machine has %d (0..%d)"
                             % (int(device), count, count - 1))
        caffe.set_device(int(device))
    caffe.set_mode_gpu()
    _explicit_mode = "gpu"


def set_mode_cpu():
    """Switch Caffe and safe_layers to CPU mode."""
    import caffe
    global _explicit_mode
    caffe.set_mode_cpu()
    _explicit_mode = "cpu"


@functools.lru_cache(maxsize=None)
def _solver_mode(path):
    """'gpu' or 'cpu': the solver_mode of the solver file at ``path``."""
    try:
        from caffe.proto import caffe_pb2
        from google.protobuf import text_format
        with open(path) as f:
            solver = text_format.Parse(f.read(), caffe_pb2.SolverParameter())
    except Exception as exc:  # noqa: BLE001 - any failure: the mode is unknown
        raise RuntimeError("safe_layers: cannot read solver_mode from %s, the solver caffe's -solver "
                           "names (%s: %s); set SAFE_LAYERS_MODE=cpu or gpu to say which mode Caffe "
                           "runs in" % (path, type(exc).__name__, exc)) from exc
    # caffe.cpp asks has_solver_mode(): the proto's default (GPU) alone switches nothing.
    explicit_gpu = solver.HasField("solver_mode") and solver.solver_mode == caffe_pb2.SolverParameter.GPU
    return "gpu" if explicit_gpu else "cpu"


def _caffe_cli_mode():
    """The mode the caffe binary's command line puts Caffe in, or None outside it.

    As caffe.cpp decides: -gpu wins; without it, ``solver_mode: GPU`` in the -solver file
    means GPU (on its device_id).
    """
    argv = caffe_process.caffe_cli_argv()
    if argv is None:
        return None
    if caffe_process.cli_flag(argv, "gpu"):
        return "gpu"
    solver = caffe_process.cli_flag(argv, "solver")
    return _solver_mode(solver) if solver else "cpu"


def mode():
    """'cpu' or 'gpu': the mode the layers should assume Caffe runs in."""
    if _explicit_mode is not None:
        return _explicit_mode
    env = os.environ.get("SAFE_LAYERS_MODE", "").strip().lower()
    if env:
        if env not in _MODES:
            raise ValueError("SAFE_LAYERS_MODE=%r; allowed: cpu, gpu" % env)
        return env
    return _caffe_cli_mode() or "cpu"


def set_checks(policy):
    """How layers check arrays: 'immediate', 'deferred', or 'auto' / None (deferred for
    device arrays, at once for host arrays; SAFE_LAYERS_CHECKS when set)."""
    global _explicit_checks
    if policy is not None and policy not in _CHECKS:
        raise ValueError("checks %r; allowed: %s" % (policy, ", ".join(_CHECKS)))
    _explicit_checks = policy


def checks():
    """The policy in force: 'auto', 'immediate' or 'deferred' (:func:`set_checks`, else the
    environment variable SAFE_LAYERS_CHECKS, else 'auto')."""
    if _explicit_checks is not None:
        return _explicit_checks
    env = os.environ.get("SAFE_LAYERS_CHECKS", "").strip().lower()
    if env and env not in _CHECKS:
        raise ValueError("SAFE_LAYERS_CHECKS=%r; allowed: %s" % (env, ", ".join(_CHECKS)))
    return env or "auto"


def deferred_checks(array):
    """Whether a layer's checks of ``array`` are deferred (read once per pass, see
    ``safe_layers.core.deferred``) rather than answered at once."""
    policy = checks()
    if policy == "auto":
        return not isinstance(array, numpy.ndarray)
    return policy == "deferred"


def _bound_memory_pool(cupy):
    global _pool_bounded
    _pool_bounded = True
    pool = cupy.get_default_memory_pool()
    if pool.get_limit():
        return  # the process chose its own bound
    megabytes = os.environ.get("SAFE_LAYERS_GPU_POOL_MB", "").strip()
    if megabytes:
        try:
            size = int(float(megabytes) * 2**20)
        except ValueError:
            raise ValueError("SAFE_LAYERS_GPU_POOL_MB=%r; allowed: a number of megabytes > 0"
                             % megabytes) from None
        if size <= 0:
            raise ValueError("SAFE_LAYERS_GPU_POOL_MB=%r; allowed: a number of megabytes > 0"
                             % megabytes)
        pool.set_limit(size=size)
    else:
        pool.set_limit(fraction=POOL_FRACTION)


def _device_array(blob, ptr_attr):
    """A CuPy array over the blob's device memory, or None where that is not possible."""
    cupy = _cupy()
    if cupy is None or not hasattr(type(blob), ptr_attr) or gpu_devices()[0] == 0:
        return None
    if not _pool_bounded:
        _bound_memory_pool(cupy)
    ptr = getattr(blob, ptr_attr)
    shape = tuple(blob.shape)
    nbytes = int(numpy.prod(shape, dtype=numpy.int64)) * 4
    # device_id: without it CuPy asks the driver for the pointer's attributes on every
    # wrap. owner=blob keeps the Caffe blob (and so its SyncedMemory) alive as long as
    # the array.
    memory = cupy.cuda.UnownedMemory(ptr, nbytes, owner=blob,
                                     device_id=cupy.cuda.runtime.getDevice())
    return cupy.ndarray(shape, dtype=cupy.float32, memptr=cupy.cuda.MemoryPointer(memory, 0))


def _fallback_reason(blob):
    if _cupy() is None:
        return "CuPy is not importable"
    if not hasattr(type(blob), "_gpu_data_ptr"):
        return "this Caffe build exposes no Blob._gpu_data_ptr/_gpu_diff_ptr"
    return gpu_devices()[1]


def _host_array(blob, which):
    global _warned_host_fallback
    if mode() == "gpu" and not _warned_host_fallback:
        _warned_host_fallback = True
        reason = _fallback_reason(blob)
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


def address(array):
    """The address an array (NumPy or CuPy) starts at."""
    return (array.__array_interface__["data"][0] if isinstance(array, numpy.ndarray)
            else array.data.ptr)


def same_memory(a, b):
    """Whether two arrays start at the same address (an in-place layer's top and bottom)."""
    return address(a) == address(b)
