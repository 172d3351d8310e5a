"""Finiteness checks and repairs: pure functions over NumPy or CuPy arrays.

The common case is "everything is finite", so :func:`all_finite` is a one-pass
reduction that returns one host scalar; the exact counts (:func:`count_faults`) run only
when that fast check fails.
"""

import math

import numpy

from safe_layers.kernels import xp as _xp
from safe_layers.kernels.xp import array_module

FLOAT32_MAX = float(numpy.finfo(numpy.float32).max)

# max |x| in one fused pass, NaN if any element is NaN: fmax would drop NaN, this keeps
# it, so one number answers "any NaN, any Inf, anything above the threshold".
MAX_ABS_NAN = _xp.declare(_xp.Reduction(
    name="safe_layers_max_abs_nan", in_ctype="T", out_ctype="T", map_expr="fabs(in0)",
    reduce_expr="(a != a || a > b) ? a : b", post_map_expr="out0 = a", identity="0"))


def _device_max_abs(x):
    """max |x| over a CuPy array (a 0-d device array: no host synchronisation)."""
    return _xp.kernel(MAX_ABS_NAN)(x.ravel())


def all_finite(x, max_abs=None):
    """True when every element is finite (and, with ``max_abs``, ``|x| <= max_abs``).

    One pass and one host scalar in the common case. On the host that pass is the dot
    product ``x . x`` (BLAS: vectorized and multi-threaded, ~1.6x the speed of ``x.sum()``
    here): a sum of squares is finite whenever every element is, and NaN/Inf whenever one
    is not, since NaN and Inf survive squaring and adding. Squares of finite values above
    ~1.8e19 overflow it; then the plain sum (which overflows only past 3.4e38) decides,
    and callers confirm any failed check with :func:`count_faults`, which is exact.
    With ``max_abs``, ``x . x <= max_abs**2`` proves every ``|x| <= max_abs``; when it
    does not, ``max`` and ``min`` (which propagate NaN) decide.
    """
    if x.size == 0:
        return True
    xp = array_module(x)
    if xp is not numpy:
        peak = float(_device_max_abs(x))
        return peak <= (FLOAT32_MAX if max_abs is None else max_abs)
    flat = x.reshape(-1)
    with numpy.errstate(over="ignore", invalid="ignore"):  # overflow is expected, see above
        energy = float(numpy.dot(flat, flat))
        if max_abs is None:
            return math.isfinite(energy) or bool(numpy.isfinite(flat.sum()))
    if energy <= max_abs * max_abs:
        return True
    # NaN fails both comparisons.
    return bool(flat.max() <= max_abs and flat.min() >= -max_abs)


def count_faults(x, max_abs=None):
    """Exact counts of NaN, +Inf, -Inf and finite ``|x| > max_abs`` elements."""
    xp = array_module(x)
    nan = int(xp.count_nonzero(xp.isnan(x)))
    posinf = int(xp.count_nonzero(xp.isposinf(x)))
    neginf = int(xp.count_nonzero(xp.isneginf(x)))
    over = 0
    if max_abs is not None:
        over = int(xp.count_nonzero(xp.isfinite(x) & (xp.abs(x) > max_abs)))
    return {"nan": nan, "posinf": posinf, "neginf": neginf, "over": over}


def fault_mask(x, max_abs=None):
    """Boolean mask of the elements :func:`count_faults` counts."""
    xp = array_module(x)
    bad = ~xp.isfinite(x)
    if max_abs is not None:
        bad |= xp.abs(x) > max_abs
    return bad


def first_fault(x, max_abs=None):
    """(N-d index, value) of the first faulty element in C order, or (None, None)."""
    xp = array_module(x)
    bad = fault_mask(x, max_abs).ravel()
    flat = int(xp.argmax(bad))
    if not bool(bad[flat]):
        return None, None
    index = tuple(int(i) for i in numpy.unravel_index(flat, x.shape))
    return index, float(x.ravel()[flat])


def finite_stats(x):
    """min, max and mean |x| of the finite elements (None each when there are none)."""
    xp = array_module(x)
    finite = x[xp.isfinite(x)]
    if finite.size == 0:
        return None, None, None
    return (float(finite.min()), float(finite.max()),
            float(xp.abs(finite).mean(dtype=xp.float64)))


def clamp_(x, nan_value=0.0, bound=FLOAT32_MAX, max_abs=None):
    """Repair ``x`` in place: NaN -> nan_value, +-Inf -> +-bound, and with ``max_abs``
    every finite ``|x| > max_abs`` -> +-bound. Returns ``x``."""
    xp = array_module(x)
    xp.nan_to_num(x, copy=False, nan=nan_value, posinf=bound, neginf=-bound)
    if max_abs is not None:
        over = xp.abs(x) > max_abs
        x[over] = xp.copysign(xp.asarray(bound, dtype=x.dtype), x[over])
    return x
