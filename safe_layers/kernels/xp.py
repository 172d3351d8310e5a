"""The array module of an array, and the one factory of the package's CUDA kernels.

Kernels are declared once, as data (:class:`Reduction`, :class:`Elementwise`), at import
time of the module that uses them; the CuPy kernel object is made on first use and
memoized (CuPy itself compiles it once per device and dtype). Declaring them as data
also lets ``ci/gpu_compile_check.py`` compile every one of them with NVRTC on a machine
without a GPU (:data:`KERNELS` lists them).
"""

import functools
from typing import NamedTuple

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


class Reduction(NamedTuple):
    """A ``cupy.ReductionKernel`` of one input ``in0`` and one output ``out0``.

    The names are fixed because CuPy's CUB path (contiguous input, the default for
    ReductionKernel) renames any other parameter names inside the expressions by plain
    text replacement (``map_expr.replace('x', 'in0')`` turns ``exp(x)`` into
    ``ein0p(in0)``). With ``in0``/``out0`` nothing is renamed, but then that path also
    skips the typedefs its template needs (``type_in0_raw``, ``type_out0_raw``), so the
    factory declares them in the preamble; ``make gpu-compile-check`` compiles both
    paths.
    """

    name: str
    in_ctype: str          # 'T' (any dtype) or a dtype name such as 'float32'
    out_ctype: str
    map_expr: str
    reduce_expr: str
    post_map_expr: str
    identity: str
    reduce_type: str = None
    preamble: str = ""

    @property
    def in_params(self):
        return "%s in0" % self.in_ctype

    @property
    def out_params(self):
        return "%s out0" % self.out_ctype

    def full_preamble(self):
        """The preamble CuPy gets: the CUB template's typedefs, then ``preamble``."""
        return ("typedef %s type_in0_raw;\ntypedef %s type_out0_raw;\n%s"
                % (_c_type(self.in_ctype), _c_type(self.out_ctype), self.preamble))


class Elementwise(NamedTuple):
    """A ``cupy.ElementwiseKernel``."""

    name: str
    in_params: str
    out_params: str
    operation: str
    preamble: str = ""


_C_TYPES = {"bool": "bool", "int8": "signed char", "uint8": "unsigned char", "int32": "int",
            "uint32": "unsigned int", "int64": "long long", "uint64": "unsigned long long",
            "float32": "float", "float64": "double"}



def _c_type(ctype):
    """A kernel parameter's C type: a type placeholder ('T') stays, a dtype name maps."""
    return ctype if len(ctype) == 1 else _C_TYPES[ctype]


#: Every kernel declared with :func:`declare`, by name.
KERNELS = {}


def declare(spec):
    """Register a kernel declaration (one name, one definition) and return it."""
    known = KERNELS.get(spec.name)
    if known is not None and known != spec:
        raise ValueError("two different CUDA kernels named %r" % spec.name)
    KERNELS[spec.name] = spec
    return spec


@functools.lru_cache(maxsize=None)
def kernel(spec):
    """The CuPy kernel object for a declaration (made once per process)."""
    import cupy
    if isinstance(spec, Reduction):
        return cupy.ReductionKernel(
            spec.in_params, spec.out_params, spec.map_expr, spec.reduce_expr,
            spec.post_map_expr, spec.identity, spec.name, reduce_type=spec.reduce_type,
            preamble=spec.full_preamble())
    return cupy.ElementwiseKernel(spec.in_params, spec.out_params, spec.operation, spec.name,
                                  preamble=spec.preamble)
