"""The array module of an array: numpy for host arrays, cupy for device arrays."""

import numpy


def array_module(x):
    """numpy or cupy, whichever owns ``x``; CuPy is imported only when a non-NumPy array
    is seen, so CPU users never need it."""
    if isinstance(x, (numpy.ndarray, numpy.generic)):
        return numpy
    import cupy
    return cupy.get_array_module(x)


def to_numpy(x):
    """``x`` as a NumPy array: itself on the host, a copy from the device otherwise."""
    if isinstance(x, numpy.ndarray):
        return x
    return x.get()
