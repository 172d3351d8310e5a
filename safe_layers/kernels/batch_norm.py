"""Batch normalization with Caffe's BatchNorm semantics, computed so it cannot blow up.

Pure functions over NumPy or CuPy arrays. ``x`` is viewed as (N, C, S): S = 1 for an
N x C blob, H*W for N x C x H x W. Caffe's statistics blobs are the accumulated mean M,
the accumulated variance V and the scale factor s; the running estimates are M/s, V/s
(``batch_norm_layer.cpp``).

Accuracy without float64 arrays. The moments are *shifted two-pass* sums: a first pass
gives an estimate ``k`` of each channel's mean, float32 ``d = x - k`` is then exact where it
matters (Sterbenz: x and k within a factor 2 of each other, which is the case where the
float32 difference of a large mean would otherwise cancel), and the sums of ``d`` and ``d*d``
are taken in float32 along each row and in float64 across rows. So the mean is
exact to ~1e-7 of the channel's standard deviation whatever its magnitude (a channel at
1e4 + noise of 0.05 keeps its variance), the variance to ~1e-6 relative, never below 0. Elementwise
work stays in float32 in buffers the caller reuses (:class:`Workspace`): no float64 copy of
a blob, no per-call allocation of blob-sized arrays. Where a per-channel correction is below
TOLERANCE (2^-20 of the standard deviation) the pass that would apply it is left out.
"""

import numpy

from safe_layers.kernels import xp as _xp
from safe_layers.kernels.xp import array_module, host_scalar

# The largest float32: statistics beyond it would be stored as Inf for good.
FLOAT32_MAX = 3.4028234663852886e+38


class Workspace:
    """Blob-sized float32 buffers one layer reuses from call to call (reallocated only when
    the shape, dtype or array module changes)."""

    def __init__(self):
        self._buffers = {}

    def get(self, name, like):
        buffer = self._buffers.get(name)
        if (buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype
                or array_module(buffer) is not array_module(like)):
            buffer = array_module(like).empty(like.shape, like.dtype)
            self._buffers[name] = buffer
        return buffer

    def release(self):
        self._buffers = {}


def as_channels(x):
    """``x`` viewed as (N, C, S)."""
    return x.reshape(x.shape[0], x.shape[1], -1)


def channel_sum(a3):
    """Per-channel sum of (N, C, S) ``a3``: float32 along S (einsum's vectorised loop: 3-4x
    ``sum(axis=2)`` on the short rows of late ResNet stages), float64 across N."""
    xp = array_module(a3)
    return xp.einsum("ncs->nc", a3).astype(xp.float64).sum(axis=0)


def channel_dot(a3, b3):
    """Per-channel sum of ``a3 * b3`` (both (N, C, S)) in float64 across N, float32 along S
    (einsum, no product array written; ~1e-6 relative for S = 112 * 112)."""
    xp = array_module(a3)
    return xp.einsum("ncs,ncs->nc", a3, b3).astype(xp.float64).sum(axis=0)


# Per-channel sum of squares with double products: no float32 square can overflow. CuPy's
# einsum has no float64 accumulator for float32 input (NumPy's: einsum(..., dtype=float64)).
SUM_SQUARES_WIDE = _xp.declare(_xp.Reduction(
    name="safe_layers_sum_squares_wide", in_ctype="T", out_ctype="float64",
    map_expr="(double)in0 * (double)in0", reduce_expr="a + b", post_map_expr="out0 = a",
    identity="0", reduce_type="double"))


def channel_sum_squares_wide(a3):
    """Per-channel sum of ``a3 * a3`` ((N, C, S) float32) with float64 products and sums:
    finite for any finite input, at the cost of float64 arithmetic."""
    xp = array_module(a3)
    if xp is numpy:
        return numpy.einsum("ncs,ncs->c", a3, a3, dtype=numpy.float64)
    return _xp.kernel(SUM_SQUARES_WIDE)(a3, axis=(0, 2))


def channel_sums(x):
    """Per-channel sums of ``x`` (N, C, ...), float64. Finite exactly when every element is
    (NaN and Inf survive a sum; +Inf with -Inf gives NaN), except when finite values
    overflow the float32 row sums: so they double as the layer's fast finiteness check."""
    return channel_sum(as_channels(x))


def _per_channel(v, dtype):
    return v.astype(dtype)[None, :, None]


# Outputs may be off by at most this much (in units of the channel's standard deviation)
# where that saves a pass over the blob: a few float32 ulps of a normalized value.
TOLERANCE = 2.0 ** -20


def _negligible(v):
    """Whether every per-channel correction ``v`` (in units of the standard deviation) is
    below TOLERANCE, so the pass over the blob that applies it can be left out. Asked on the
    host only for NumPy; a device array is always corrected (no synchronisation)."""
    return array_module(v) is numpy and float(numpy.abs(v).max()) < TOLERANCE


def batch_statistics(x, eps, centered, sums=None):
    """The moments of :func:`normalize_batch`, before anything is written over ``x`` (an
    in-place layer decides on them first): (mean, var, inv_std, offset), float64 per
    channel, with x - mean + offset written into ``centered``.

    Shifted two-pass moments (module docstring), float32 passes. The squares of x - mean
    are summed with float32 products unless one of them overflows (|x - mean| beyond
    ~1.8e19): then again with float64 products (:func:`channel_sum_squares_wide`), so the
    variance of a finite batch is always finite. NumPy decides that on the host; a device
    array always takes the float64 products (deciding would be a host read).
    """
    xp = array_module(x)
    x3, d3 = as_channels(x), as_channels(centered)
    count = x3.shape[0] * x3.shape[2]
    sums = channel_sum(x3) if sums is None else sums
    shift = (sums / count).astype(x.dtype)
    with numpy.errstate(over="ignore", invalid="ignore"):  # a non-finite x: the caller reports it
        xp.subtract(x3, shift[None, :, None], out=d3)  # d = x - k, exact where k ~ x (inf - inf: NaN)
        delta = channel_sum(d3) / count  # mean = k + delta
        if xp is numpy:
            squares = channel_dot(d3, d3)
            if not numpy.isfinite(squares).all():
                squares = channel_sum_squares_wide(d3)
        else:
            squares = channel_sum_squares_wide(d3)
        var = xp.maximum(squares / count - delta * delta, 0.0)
    inv_std = 1.0 / xp.sqrt(var + eps)
    offset = delta
    if not _negligible(delta * inv_std):
        d3 -= _per_channel(delta, x.dtype)
        offset = xp.zeros_like(delta)
    return shift.astype(xp.float64) + delta, var, inv_std, offset


def write_normalized(centered, inv_std, out):
    """y = centered * inv_std per channel, into ``out`` (the second half of
    :func:`normalize_batch`)."""
    xp = array_module(centered)
    xp.multiply(as_channels(centered), _per_channel(inv_std, centered.dtype), out=as_channels(out))
    return out


def normalize_batch(x, eps, centered, out, sums=None):
    """Normalize ``x`` (N, C, ...) with its own per-channel statistics: y = (x - mean) /
    sqrt(var + eps) into ``out`` (may be x). ``sums``: :func:`channel_sums` of x if the
    caller has them. Writes x - mean + offset into ``centered`` (a float32 buffer shaped like
    x, kept for :func:`backward_batch_stats`). Returns (mean, var, inv_std, offset), float64
    per channel; offset is 0 except where offset * inv_std is below TOLERANCE (then y carries
    it too, and a pass over the blob is saved). :func:`batch_statistics`, then
    :func:`write_normalized`: four or five passes.
    """
    moments = batch_statistics(x, eps, centered, sums)
    write_normalized(centered, moments[2], out)
    return moments


def normalize_batch_wide(x, eps, centered, out):
    """:func:`normalize_batch` computed in float64 arrays (a reference: its float64 squares
    make normalize_batch exact for such batches too)."""
    xp = array_module(x)
    x64 = as_channels(x).astype(xp.float64)
    mean = x64.mean(axis=(0, 2))
    x64 -= mean[None, :, None]
    var = (x64 * x64).mean(axis=(0, 2))
    inv_std = 1.0 / xp.sqrt(var + eps)
    as_channels(centered)[...] = x64
    x64 *= inv_std[None, :, None]
    as_channels(out)[...] = x64
    return mean, var, inv_std, xp.zeros_like(mean)


def batch_moments(x):
    """Per-channel mean and biased variance of ``x`` (N, C, ...), float64 per channel,
    variance >= 0 (the moments :func:`normalize_batch` uses)."""
    xp = array_module(x)
    mean, var, _, _ = normalize_batch(x, 1.0, xp.empty(x.shape, x.dtype), xp.empty(x.shape, x.dtype))
    return mean, var


def normalize_global(x, mean, var, eps, out):
    """y = (x - mean) / sqrt(var + eps) per channel with given float64 ``mean``/``var``,
    into ``out`` (may be x). The mean is subtracted as its float32 part, then (where it
    matters) the rest, so a large mean cancels exactly. Returns inv_std (float64 per channel)."""
    xp = array_module(x)
    x3, y3 = as_channels(x), as_channels(out)
    high = mean.astype(x.dtype)
    low = mean - high.astype(xp.float64)
    inv_std = 1.0 / xp.sqrt(var + eps)
    xp.subtract(x3, high[None, :, None], out=y3)
    y3 *= _per_channel(inv_std, x.dtype)
    if not _negligible(low * inv_std):
        y3 -= _per_channel(low * inv_std, x.dtype)
    return inv_std


def normalize(x, mean, var, eps):
    """(y, inv_std): y = (x - mean) / sqrt(var + eps) per channel, as a new float32 array."""
    xp = array_module(x)
    out = xp.empty(x.shape, x.dtype)
    return out, normalize_global(x, mean, var, eps, out)


def update_running_stats(acc_mean, acc_var, scale_factor, mean, var, count, fraction):
    """Caffe's moving-average update, in place on the three statistics arrays:
    s <- f*s + 1, M <- f*M + mean, V <- f*V + c*var with c = m/(m-1) (1 when m = 1).

    Computed in float64 and stored only if float32 can hold all of it. Returns None when
    stored, else (name, channel, value) of the first statistic that would not be finite
    in float32 ('mean' / 'variance'), and the statistics are left as they were."""
    xp = array_module(acc_mean)
    correction = count / (count - 1.0) if count > 1 else 1.0
    new_mean = acc_mean.astype(xp.float64) * fraction + mean
    new_var = acc_var.astype(xp.float64) * fraction + correction * var
    # One host read for the decision (on GPU: one synchronisation per training forward;
    # update_running_stats_where decides on the device instead).
    if host_scalar((xp.abs(new_mean) <= FLOAT32_MAX).all() & (xp.abs(new_var) <= FLOAT32_MAX).all()):
        acc_mean[...] = new_mean
        acc_var[...] = new_var
        scale_factor *= fraction
        scale_factor += 1.0
        return None
    for name, values in (("mean", new_mean), ("variance", new_var)):
        bad = ~(xp.abs(values) <= FLOAT32_MAX)
        if host_scalar(bad.any()):
            channel = int(host_scalar(xp.argmax(bad)))
            return name, channel, host_scalar(values[channel])
    return None  # unreachable: the check above failed for one of the two


#: update_running_stats_where's facts: [kept out (1) or stored (0), 0 mean / 1 variance,
#: channel, value] of the first statistic float32 cannot hold.
OVERFLOW_NAMES = ("mean", "variance")


def update_running_stats_where(acc_mean, acc_var, scale_factor, mean, var, count, fraction,
                               accept):
    """:func:`update_running_stats` decided on the device: the statistics are updated
    where ``accept`` (a 0-d bool array: the batch is finite) and float32 holds every new
    value, else left as they were. Returns the facts of a finite batch kept out for
    overflow, as a float64 array of 4 (see OVERFLOW_NAMES), without a host read."""
    xp = array_module(acc_mean)
    correction = count / (count - 1.0) if count > 1 else 1.0
    both = xp.stack([acc_mean.astype(xp.float64) * fraction + mean,
                     acc_var.astype(xp.float64) * fraction + correction * var])
    bad = ~(xp.abs(both) <= FLOAT32_MAX)
    first = xp.argmax(bad.reshape(-1))
    fits = ~xp.take(bad.reshape(-1), first)  # take: indexing by a 0-d array is a host read in NumPy
    store = accept & fits
    xp.copyto(acc_mean, both[0], where=store, casting="same_kind")
    xp.copyto(acc_var, both[1], where=store, casting="same_kind")
    xp.copyto(scale_factor, scale_factor * fraction + 1.0, where=store, casting="same_kind")
    channels = acc_mean.shape[0]
    return xp.stack([(accept & ~fits).astype(xp.float64), (first // channels).astype(xp.float64),
                     (first % channels).astype(xp.float64), xp.take(both.reshape(-1), first)])


def running_stats(acc_mean, acc_var, scale_factor):
    """(mean, var) = (M/s, V/s) in float64, or None when they cannot be trusted: s is 0
    (untrained, or a renamed layer that got no weights; Caffe then outputs x/sqrt(eps),
    ~316x), or s, M or V is not finite. A variance below 0 is clamped to 0."""
    xp = array_module(acc_mean)
    s = scale_factor.astype(xp.float64).reshape(-1)[0]
    divisor = xp.where(s != 0, s, 1.0)  # s == 0 is rejected below; no 0/0 on the way
    mean = acc_mean.astype(xp.float64) / divisor
    var = acc_var.astype(xp.float64) / divisor
    # One host read for the whole decision (on GPU: one synchronisation per forward): it
    # decides what runs (the stored statistics, or the batch's own).
    usable = (s != 0) & xp.isfinite(s) & xp.isfinite(mean).all() & xp.isfinite(var).all()
    if not host_scalar(usable):
        return None
    return mean, xp.maximum(var, 0.0)


def backward_batch_stats(dy, centered, offset, inv_std, out, work):
    """dx when the batch's own statistics normalized it, into ``out`` (may be dy):
    (dy - mean(dy) - y * mean(dy * y)) * inv_std with y = (centered - offset) * inv_std,
    means per channel over N and S. With g = mean(dy) and h = mean(dy * (centered - offset)):
    dx = inv_std * dy - inv_std**3 * h * centered + inv_std * (inv_std**2 * h * offset - g)
    (four passes, float32)."""
    xp = array_module(dy)
    dy3, d3, dx3 = as_channels(dy), as_channels(centered), as_channels(out)
    count = dy3.shape[0] * dy3.shape[2]
    g = channel_sum(dy3) / count
    h = channel_dot(dy3, d3) / count - offset * g
    slope = inv_std ** 3 * h
    scratch = as_channels(work.get("scratch", dy))
    xp.multiply(d3, _per_channel(-slope, dy.dtype), out=scratch)
    scratch += _per_channel(slope * offset - inv_std * g, dy.dtype)
    xp.multiply(dy3, _per_channel(inv_std, dy.dtype), out=dx3)
    dx3 += scratch
    return out


def backward_global_stats(dy, inv_std, out):
    """dx when fixed (running) statistics normalized it: dy * inv_std, into ``out``."""
    xp = array_module(dy)
    xp.multiply(as_channels(dy), _per_channel(inv_std, dy.dtype), out=as_channels(out))
    return out
