"""Finiteness checks and repairs: pure functions over NumPy or CuPy arrays.

Two ways to check an array, for the two ways a layer can ask (``safe_layers.core.deferred``):

* at once: :func:`all_finite` is a one-pass reduction answered on the host (one host
  read); only when it fails does :func:`fault_stats` say exactly what is wrong;
* deferred: :func:`fault_stats` writes everything a fault report says about the array
  (counts of NaN, +Inf, -Inf and values over ``max_abs``, the first faulty element and
  its value, min / max / sum |x| of the finite values) into a row of a float64 array
  without reading anything on the host. On a GPU that is one pass over the array (our
  own CUDA kernel, :data:`FAULT_STATS`), so the statistics are taken from the data as it
  arrived even when a later in-place layer overwrites it before the row is read. The
  repairs that go with it (:func:`clamp_flagged_`, :func:`zero_flagged_`) read the row's
  flag on the device: nothing is decided on the host.
"""

import functools
import math

import numpy

from safe_layers.kernels import xp as _xp
from safe_layers.kernels.xp import array_module

FLOAT32_MAX = float(numpy.finfo(numpy.float32).max)

# The columns of a fault-statistics row (float64). FIRST is -1 when no element is at
# fault; FINITE_MIN / FINITE_MAX are +Inf / -Inf when no element is finite.
NAN, POSINF, NEGINF, OVER, FIRST, FIRST_VALUE, FINITE_MIN, FINITE_MAX, SUM_ABS, FINITE = range(10)
#: Columns a layer may fill with its own facts (read back with the row).
EXTRA = 10
#: Width of a row.
ROW = 16

# max |x| in one fused pass, NaN if any element is NaN: fmax would drop NaN, this keeps
# it, so one number answers "any NaN, any Inf, anything above the threshold".
MAX_ABS_NAN = _xp.declare(_xp.Reduction(
    name="safe_layers_max_abs_nan", in_ctype="T", out_ctype="T", map_expr="fabs(in0)",
    reduce_expr="(a != a || a > b) ? a : b", post_map_expr="out0 = a", identity="0"))

# Everything a fault report says about an array, in one pass over it. CuPy's generated
# reductions cannot carry it: their CUB path (the fast one for a whole array) holds at
# most 32 bytes per partial result, and these statistics need 64. Pass 1: each block of
# a grid-stride loop reduces its share to one partial; pass 2: one block combines the
# partials and writes the row (columns as above). Over max_abs means |x| > (T)max_abs,
# compared in the array's own type, as NumPy compares a float32 array with a Python float.
_FAULT_STATS_CODE = r"""
#define SL_BLOCK 256
#define SL_NONE 0x7fffffffffffffffLL

struct sl_stats {
    long long nan, posinf, neginf, over, first;
    double lo, hi, sum_abs;
};

__device__ __forceinline__ void sl_identity(sl_stats& s) {
    s.nan = 0; s.posinf = 0; s.neginf = 0; s.over = 0; s.first = SL_NONE;
    s.lo = __longlong_as_double(0x7ff0000000000000LL);   /* +Inf */
    s.hi = __longlong_as_double(0xfff0000000000000LL);   /* -Inf */
    s.sum_abs = 0.0;
}

__device__ __forceinline__ void sl_combine(sl_stats& a, const sl_stats& b) {
    a.nan += b.nan; a.posinf += b.posinf; a.neginf += b.neginf; a.over += b.over;
    a.first = b.first < a.first ? b.first : a.first;
    a.lo = fmin(a.lo, b.lo); a.hi = fmax(a.hi, b.hi); a.sum_abs += b.sum_abs;
}

template <typename T>
__device__ __forceinline__ void sl_add(sl_stats& s, T v, long long i, T limit) {
    if (isnan(v)) {
        s.nan++;
    } else if (isinf(v)) {
        if (v > 0) s.posinf++; else s.neginf++;
    } else {
        T a = fabs(v);
        s.lo = fmin(s.lo, (double)v);
        s.hi = fmax(s.hi, (double)v);
        s.sum_abs += (double)a;
        if (!(a > limit)) return;
        s.over++;
    }
    if (i < s.first) s.first = i;
}

__device__ __forceinline__ void sl_block_reduce(sl_stats* shared) {
    for (int half = SL_BLOCK / 2; half > 0; half >>= 1) {
        __syncthreads();
        if (threadIdx.x < half) sl_combine(shared[threadIdx.x], shared[threadIdx.x + half]);
    }
    __syncthreads();
}

template <typename T>
__device__ void sl_partial(const T* x, long long n, double max_abs, sl_stats* partial) {
    __shared__ sl_stats shared[SL_BLOCK];
    sl_stats s;
    sl_identity(s);
    const T limit = (T)max_abs;
    const long long stride = (long long)gridDim.x * SL_BLOCK;
    for (long long i = (long long)blockIdx.x * SL_BLOCK + threadIdx.x; i < n; i += stride) {
        sl_add<T>(s, x[i], i, limit);
    }
    shared[threadIdx.x] = s;
    sl_block_reduce(shared);
    if (threadIdx.x == 0) partial[blockIdx.x] = shared[0];
}

template <typename T>
__device__ void sl_finish(const sl_stats* partial, int blocks, const T* x, long long n,
                          double* row) {
    __shared__ sl_stats shared[SL_BLOCK];
    sl_stats s;
    sl_identity(s);
    for (int b = threadIdx.x; b < blocks; b += SL_BLOCK) sl_combine(s, partial[b]);
    shared[threadIdx.x] = s;
    sl_block_reduce(shared);
    if (threadIdx.x == 0) {
        const sl_stats t = shared[0];
        const bool any = t.first != SL_NONE;
        row[0] = (double)t.nan; row[1] = (double)t.posinf; row[2] = (double)t.neginf;
        row[3] = (double)t.over;
        row[4] = any ? (double)t.first : -1.0;
        row[5] = any ? (double)x[t.first] : 0.0;
        row[6] = t.lo; row[7] = t.hi; row[8] = t.sum_abs;
        row[9] = (double)(n - t.nan - t.posinf - t.neginf);
    }
}

extern "C" __global__ void safe_layers_fault_stats_partial_float(
        const float* x, long long n, double max_abs, sl_stats* partial) {
    sl_partial<float>(x, n, max_abs, partial);
}
extern "C" __global__ void safe_layers_fault_stats_partial_double(
        const double* x, long long n, double max_abs, sl_stats* partial) {
    sl_partial<double>(x, n, max_abs, partial);
}
extern "C" __global__ void safe_layers_fault_stats_finish_float(
        const sl_stats* partial, int blocks, const float* x, long long n, double* row) {
    sl_finish<float>(partial, blocks, x, n, row);
}
extern "C" __global__ void safe_layers_fault_stats_finish_double(
        const sl_stats* partial, int blocks, const double* x, long long n, double* row) {
    sl_finish<double>(partial, blocks, x, n, row);
}
"""

FAULT_STATS = _xp.declare(_xp.Raw(
    name="safe_layers_fault_stats", code=_FAULT_STATS_CODE,
    functions=("safe_layers_fault_stats_partial_float", "safe_layers_fault_stats_partial_double",
               "safe_layers_fault_stats_finish_float", "safe_layers_fault_stats_finish_double")))
_BLOCK = 256          # SL_BLOCK
_PARTIAL_BYTES = 64   # sizeof(sl_stats)
_MAX_BLOCKS = 1024    # enough to fill any current GPU; each thread then loops
_ITEMS_PER_THREAD = 4  # below this many elements per thread, fewer blocks

# The repairs of the deferred path: each thread reads the row's four fault counts (one
# cached load) and touches x only when one of them is not zero, so a clean array costs a
# launch and no pass over its memory.
_FLAGGED = "row[0] + row[1] + row[2] + row[3] != 0"
CLAMP_FLAGGED = _xp.declare(_xp.Elementwise(
    name="safe_layers_clamp_flagged",
    in_params="raw float64 row, float64 nan_value, float64 bound, float64 max_abs",
    out_params="raw T x",
    operation="if (%s) { T v = x[i]; if (isnan(v)) x[i] = (T)nan_value; "
              "else if (isinf(v) || fabs(v) > (T)max_abs) x[i] = bound == 0 ? (T)0 : "
              "(v > 0 ? (T)bound : (T)-bound); }" % _FLAGGED,
    scalars=("nan_value", "bound", "max_abs")))
ZERO_FLAGGED = _xp.declare(_xp.Elementwise(
    name="safe_layers_zero_flagged", in_params="raw float64 row", out_params="raw T x",
    operation="if (%s) x[i] = (T)0;" % _FLAGGED))
# clamp_ on a device array: one fused pass (boolean-mask assignment would read the number
# of selected elements on the host).
CLAMP = _xp.declare(_xp.Elementwise(
    name="safe_layers_clamp", in_params="T in0, float64 nan_value, float64 bound, float64 max_abs",
    out_params="T out0",
    operation="out0 = isnan(in0) ? (T)nan_value : ((isinf(in0) || fabs(in0) > (T)max_abs) ? "
              "(bound == 0 ? (T)0 : (in0 > 0 ? (T)bound : (T)-bound)) : in0)",
    scalars=("nan_value", "bound", "max_abs")))


def _device_max_abs(x):
    """max |x| over a CuPy array (a 0-d device array: no host synchronisation)."""
    return _xp.kernel(MAX_ABS_NAN)(x.ravel())


def _host_all_finite(x, max_abs):
    """:func:`all_finite` of a NumPy array (the host decides: no device involved)."""
    flat = x.reshape(-1)
    with numpy.errstate(over="ignore", invalid="ignore"):  # overflow is expected, see all_finite
        energy = float(numpy.dot(flat, flat))
        if max_abs is None:
            return math.isfinite(energy) or bool(numpy.isfinite(flat.sum()))
    if energy <= max_abs * max_abs:
        return True
    # NaN fails both comparisons.
    return bool(flat.max() <= max_abs and flat.min() >= -max_abs)


def all_finite(x, max_abs=None):
    """True when every element is finite (and, with ``max_abs``, ``|x| <= max_abs``).

    One pass and one host read (:func:`~safe_layers.kernels.xp.host_scalar`) in the common
    case. On the host that pass is the dot product ``x . x`` (BLAS: vectorized and
    multi-threaded, ~1.6x the speed of ``x.sum()`` here): a sum of squares is finite
    whenever every element is, and NaN/Inf whenever one is not, since NaN and Inf survive
    squaring and adding. Squares of finite values above ~1.8e19 overflow it; then the
    plain sum (which overflows only past 3.4e38) decides, and callers confirm any failed
    check with :func:`fault_stats`, which is exact. With ``max_abs``,
    ``x . x <= max_abs**2`` proves every ``|x| <= max_abs``; when it does not, ``max``
    and ``min`` (which propagate NaN) decide.
    """
    if x.size == 0:
        return True
    if array_module(x) is not numpy:
        peak = _xp.host_scalar(_device_max_abs(x))
        return peak <= (FLOAT32_MAX if max_abs is None else max_abs)
    # The answer drives the caller's next step: a host read on a GPU, counted alike here.
    return _xp.host_scalar(_host_all_finite(x, max_abs))


def magnitude(x):
    """How large ``x`` is, from the same one pass and one host read as :func:`all_finite`:
    on the host the L2 norm ``sqrt(x . x)``, on a device ``max |x|``. Non-finite (NaN or
    Inf) when an element is, and on the host also when the squares overflow (finite
    elements past ~1.8e19: confirm with :func:`all_finite`). 0 exactly when every element
    is 0, and on the host also when every square underflows (all ``|x| < ~1e-22``): a zero
    on the host is confirmed with :func:`all_zero`."""
    if x.size == 0:
        return 0.0
    if array_module(x) is not numpy:
        return _xp.host_scalar(_device_max_abs(x))
    flat = x.reshape(-1)
    with numpy.errstate(over="ignore", invalid="ignore"):
        energy = _xp.host_scalar(numpy.dot(flat, flat))
    return math.sqrt(energy) if energy >= 0 else energy


def all_zero(x):
    """Every element exactly 0 (NumPy: the confirmation of a host :func:`magnitude` of 0)."""
    return not bool(x.any())


def empty_rows(xp, count):
    """``count`` fault-statistics rows (float64, ``ROW`` columns) of module ``xp``."""
    return xp.zeros((count, ROW), numpy.float64)


def fault_stats(x, row, max_abs=None, always=False):
    """Write the fault statistics of ``x`` into ``row`` (float64, at least ``EXTRA``
    columns, of x's array module) and return ``row``; no host read.

    On a device: two launches of :data:`FAULT_STATS` (one pass over x). The NumPy twin
    computes the same columns, but for a clean array (nothing at fault) it leaves the
    finite statistics unset unless ``always``: nobody reads them then, and on the host the
    question "anything at fault?" costs one BLAS pass where the statistics cost several.
    """
    if array_module(x) is numpy:
        return _host_fault_stats(x, row, max_abs, always)
    return _device_fault_stats(x, row, max_abs)


def _host_fault_stats(x, row, max_abs, always):
    flat = numpy.asarray(x).reshape(-1)  # a plain view: this twin may decide on the host
    row[:EXTRA] = (0, 0, 0, 0, -1, 0, numpy.inf, -numpy.inf, 0, flat.size)
    if flat.size == 0 or (not always and _host_all_finite(flat, max_abs)):
        return row
    finite = numpy.isfinite(flat)
    row[NAN] = numpy.count_nonzero(numpy.isnan(flat))
    row[POSINF] = numpy.count_nonzero(numpy.isposinf(flat))
    row[NEGINF] = numpy.count_nonzero(numpy.isneginf(flat))
    bad = ~finite
    if max_abs is not None:
        over = numpy.abs(flat) > max_abs  # a float32 array against a Python float: in float32
        row[OVER] = numpy.count_nonzero(finite & over)
        bad |= over
    first = int(numpy.argmax(bad))
    if bad[first]:
        row[FIRST], row[FIRST_VALUE] = first, flat[first]
    values = flat[finite]
    row[FINITE] = values.size
    if values.size:
        row[FINITE_MIN], row[FINITE_MAX] = values.min(), values.max()
        row[SUM_ABS] = numpy.abs(values).sum(dtype=numpy.float64)
    return row


@functools.lru_cache(maxsize=None)
def _fault_stats_functions(dtype_name):
    module = _xp.kernel(FAULT_STATS)
    suffix = "float" if dtype_name == "float32" else "double"
    return (module.get_function("safe_layers_fault_stats_partial_" + suffix),
            module.get_function("safe_layers_fault_stats_finish_" + suffix))


def _device_fault_stats(x, row, max_abs):
    import cupy
    flat = x.reshape(-1)
    if flat.dtype not in (numpy.float32, numpy.float64) or not flat.flags.c_contiguous:
        flat = cupy.ascontiguousarray(flat, dtype=numpy.float64)
    n = flat.size
    blocks = max(1, min(_MAX_BLOCKS, -(-n // (_BLOCK * _ITEMS_PER_THREAD))))
    partial = cupy.empty(blocks * _PARTIAL_BYTES // 8, numpy.float64)
    first, finish = _fault_stats_functions(flat.dtype.name)
    limit = numpy.float64(numpy.inf if max_abs is None else max_abs)
    first((blocks,), (_BLOCK,), (flat, numpy.int64(n), limit, partial))
    finish((1,), (_BLOCK,), (partial, numpy.int32(blocks), flat, numpy.int64(n), row))
    return row


def row_faulty(row):
    """Whether a host row (NumPy) says something is at fault."""
    return bool(row[NAN] or row[POSINF] or row[NEGINF] or row[OVER])


def clamp_flagged_(x, row, nan_value=0.0, bound=FLOAT32_MAX, max_abs=None):
    """:func:`clamp_` of ``x`` in place where ``row`` (its :func:`fault_stats`, same array
    module) says something is at fault; decided on the device, without a host read."""
    if array_module(x) is numpy:
        if row_faulty(row):
            clamp_(x, nan_value, bound, max_abs)
        return x
    limit = numpy.inf if max_abs is None else max_abs
    _xp.kernel(CLAMP_FLAGGED)(row, float(nan_value), float(bound), float(limit), x.reshape(-1),
                              size=x.size)
    return x


def zero_flagged_(x, row):
    """Set ``x`` to 0 in place where ``row`` says something is at fault (no host read)."""
    if array_module(x) is numpy:
        if row_faulty(row):
            x.fill(0)
        return x
    _xp.kernel(ZERO_FLAGGED)(row, x.reshape(-1), size=x.size)
    return x


def count_faults(x, max_abs=None):
    """Exact counts of NaN, +Inf, -Inf and finite ``|x| > max_abs`` elements (host ints:
    one host read)."""
    xp = array_module(x)
    counts = [xp.count_nonzero(xp.isnan(x)), xp.count_nonzero(xp.isposinf(x)),
              xp.count_nonzero(xp.isneginf(x)),
              xp.count_nonzero(xp.isfinite(x) & (xp.abs(x) > max_abs)) if max_abs is not None else 0]
    nan, posinf, neginf, over = (int(v) for v in _xp.to_numpy(xp.stack([xp.asarray(c) for c in counts])))
    return {"nan": nan, "posinf": posinf, "neginf": neginf, "over": over}


def fault_mask(x, max_abs=None):
    """Boolean mask of the elements :func:`count_faults` counts."""
    xp = array_module(x)
    bad = ~xp.isfinite(x)
    if max_abs is not None:
        bad |= xp.abs(x) > max_abs
    return bad


def first_fault(x, max_abs=None):
    """(N-d index, value) of the first faulty element in C order, or (None, None): one
    host read."""
    xp = array_module(x)
    bad = fault_mask(x, max_abs).ravel()
    flat = xp.argmax(bad)
    hit, position, value = _xp.to_numpy(xp.stack([
        xp.take(bad, flat).astype(xp.float64), flat.astype(xp.float64),
        xp.take(x.ravel(), flat).astype(xp.float64)]))
    if not hit:
        return None, None
    return tuple(int(i) for i in numpy.unravel_index(int(position), x.shape)), float(value)


def finite_stats(x):
    """min, max and mean |x| of the finite elements (None each when there are none): one
    host read of a row of :func:`fault_stats`."""
    row = _xp.to_numpy(fault_stats(x, empty_rows(array_module(x), 1)[0], always=True))
    if not row[FINITE]:
        return None, None, None
    return float(row[FINITE_MIN]), float(row[FINITE_MAX]), float(row[SUM_ABS] / row[FINITE])


def clamp_(x, nan_value=0.0, bound=FLOAT32_MAX, max_abs=None):
    """Repair ``x`` in place: NaN -> nan_value, +-Inf -> +-bound, and with ``max_abs``
    every finite ``|x| > max_abs`` -> +-bound. Returns ``x``."""
    xp = array_module(x)
    if xp is not numpy:
        limit = numpy.inf if max_abs is None else max_abs
        _xp.kernel(CLAMP)(x, float(nan_value), float(bound), float(limit), x)
        return x
    xp.nan_to_num(x, copy=False, nan=nan_value, posinf=bound, neginf=-bound)
    if max_abs is not None:
        over = xp.abs(x) > max_abs
        x[over] = xp.copysign(xp.asarray(bound, dtype=x.dtype), x[over])
    return x
