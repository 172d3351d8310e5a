"""Which devices this run has: a usable CuPy, a CUDA build of pycaffe."""

import pytest


def cupy_device():
    """cupy where it sees at least one usable CUDA device, else None."""
    try:
        import cupy
        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:  # noqa: BLE001 - any failure means "no usable GPU"
        return None


def gpu_build(caffe):
    """Whether this pycaffe was built with CUDA (it has the device pointers)."""
    return hasattr(caffe._caffe.Blob, "_gpu_data_ptr")


def array_modules():
    """pytest params: numpy always, cupy marked gpu (skipped where no GPU is usable)."""
    import numpy
    cupy = cupy_device()
    return [pytest.param(numpy, id="numpy"),
            pytest.param(cupy, id="cupy",
                         marks=[pytest.mark.gpu,
                                pytest.mark.skipif(cupy is None, reason="no CuPy/GPU here")])]
