"""The array module of an array, the one way a device value reaches the host, and the one
factory of the package's CUDA kernels.

Host reads. On a GPU, turning a device value into a host value (``float(x)``,
``bool(x)``, ``int(x)``, ``x.get()``) waits for every kernel queued before it: the
stream drains. Every such read in safe_layers goes through :func:`to_numpy` (or
:func:`host_scalar`, built on it), which counts it in :data:`HOST_READS`, on NumPy too:
the count is what the same code would cost on a GPU, so tests prove on a CPU how many
synchronisations an iteration makes. Code that runs only for NumPy arrays (the NumPy twin
of a device kernel) may look at its own host data freely; it never runs on a GPU.

Kernels are declared once, as data (:class:`Reduction`, :class:`Elementwise`,
:class:`Raw`), at import time of the module that uses them; the CuPy kernel object is
made on first use and memoized (CuPy itself compiles it once per device and dtype).
Declaring them as data also lets ``ci/gpu_compile_check.py`` compile every one of them
with NVRTC on a machine without a GPU (:data:`KERNELS` lists them).
"""

import collections
import contextlib
import functools
import sys
from typing import NamedTuple

import numpy


def array_module(x):
    """numpy or cupy, whichever owns ``x``; CuPy is imported only when a non-NumPy array
    is seen, so CPU users never need it."""
    if isinstance(x, (numpy.ndarray, numpy.generic)):
        return numpy
    import cupy
    return cupy.get_array_module(x)


class HostReads:
    """How many values were read on the host through :func:`to_numpy` (on a GPU, each one
    a synchronisation of the stream). ``sites`` counts them by caller while
    :meth:`recording` is active (for a test's failure message)."""

    def __init__(self):
        self.count = 0
        self.sites = collections.Counter()
        self._recording = 0

    def add(self):
        self.count += 1
        if self._recording:
            frame = sys._getframe(2)
            while frame is not None and frame.f_code.co_filename == __file__:
                frame = frame.f_back  # host_scalar -> to_numpy: name the caller of either
            if frame is not None:
                self.sites["%s:%d %s" % (frame.f_code.co_filename.rsplit("/", 2)[-1],
                                         frame.f_lineno, frame.f_code.co_name)] += 1

    @contextlib.contextmanager
    def recording(self):
        """Count the reads inside the block; yields a Counter-like snapshot object whose
        ``count`` and ``sites`` are those of the block once it ends."""
        start, sites = self.count, collections.Counter(self.sites)
        self._recording += 1
        block = _RecordedReads()
        try:
            yield block
        finally:
            self._recording -= 1
            block.count = self.count - start
            block.sites = self.sites - sites


class _RecordedReads:
    count = 0
    sites = collections.Counter()


#: Every host read of the process (see the module docstring).
HOST_READS = HostReads()


def to_numpy(x):
    """``x`` as a NumPy array (or NumPy scalar): itself on the host, a copy from the device
    otherwise. Counted in :data:`HOST_READS` either way (see the module docstring)."""
    HOST_READS.add()
    if isinstance(x, (numpy.ndarray, numpy.generic, bool, int, float)):
        return x
    return x.get()


def host_scalar(x):
    """The one value of ``x`` (a 0-d or one-element array) as a Python scalar: one host read."""
    value = to_numpy(x)
    return value.item() if isinstance(value, (numpy.ndarray, numpy.generic)) else value


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
    """A ``cupy.ElementwiseKernel``. ``scalars`` names the parameters passed as Python
    scalars (the compile check must know, since a typed parameter may be either)."""

    name: str
    in_params: str
    out_params: str
    operation: str
    preamble: str = ""
    scalars: tuple = ()


class Raw(NamedTuple):
    """A ``cupy.RawModule`` of our own CUDA source, for what CuPy's generated kernels cannot
    do in one pass; ``functions`` are its ``extern "C"`` kernels (``kernel(spec)`` returns
    the module: ``.get_function(name)``)."""

    name: str
    code: str
    functions: tuple
    options: tuple = ("--std=c++17",)


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
    if isinstance(spec, Raw):
        return cupy.RawModule(code=spec.code, options=spec.options)
    return cupy.ElementwiseKernel(spec.in_params, spec.out_params, spec.operation, spec.name,
                                  preamble=spec.preamble)
