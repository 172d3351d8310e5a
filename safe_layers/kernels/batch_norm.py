"""Batch normalization with Caffe's BatchNorm semantics, computed so it cannot blow up.

Pure functions over NumPy or CuPy arrays. ``x`` is viewed as (N, C, S): S = 1 for an
N x C blob, H*W for N x C x H x W. Caffe's statistics blobs are the accumulated mean M,
the accumulated variance V and the scale factor s; the running estimates are M/s, V/s
(``batch_norm_layer.cpp``). Moments are accumulated in float64 by two passes, so a
channel at 1e4 + small noise keeps its variance, and a variance is never below 0.
"""

from safe_layers.kernels.xp import array_module


def as_channels(x):
    """``x`` viewed as (N, C, S)."""
    return x.reshape(x.shape[0], x.shape[1], -1)


def batch_moments(x):
    """Per-channel mean and biased variance of ``x`` (N, C, ...) in float64, variance >= 0."""
    xp = array_module(x)
    x3 = as_channels(x).astype(xp.float64)
    mean = x3.mean(axis=(0, 2))
    centered = x3 - mean[None, :, None]
    var = (centered * centered).mean(axis=(0, 2))
    return mean, xp.maximum(var, 0.0)


def update_running_stats(acc_mean, acc_var, scale_factor, mean, var, count, fraction):
    """Caffe's moving-average update, in place on the three statistics arrays:
    s <- f*s + 1, M <- f*M + mean, V <- f*V + c*var with c = m/(m-1) (1 when m = 1)."""
    correction = count / (count - 1.0) if count > 1 else 1.0
    scale_factor *= fraction
    scale_factor += 1.0
    acc_mean *= fraction
    acc_mean += mean.astype(acc_mean.dtype)
    acc_var *= fraction
    acc_var += (correction * var).astype(acc_var.dtype)


def running_stats(acc_mean, acc_var, scale_factor):
    """(mean, var) = (M/s, V/s) in float64, or None when they cannot be trusted: s is 0
    (untrained, or a renamed layer that got no weights; Caffe then outputs x/sqrt(eps),
    ~316x), or s, M or V is not finite. A variance below 0 is clamped to 0."""
    xp = array_module(acc_mean)
    s = scale_factor.astype(xp.float64).reshape(-1)[0]
    divisor = xp.where(s != 0, s, 1.0)  # s == 0 is rejected below; no 0/0 on the way
    mean = acc_mean.astype(xp.float64) / divisor
    var = acc_var.astype(xp.float64) / divisor
    # One host read for the whole decision (on GPU: one synchronisation per forward).
    usable = (s != 0) & xp.isfinite(s) & xp.isfinite(mean).all() & xp.isfinite(var).all()
    if not bool(usable):
        return None
    return mean, xp.maximum(var, 0.0)


def normalize(x, mean, var, eps):
    """(y, inv_std): y = (x - mean) / sqrt(var + eps) per channel, in float64."""
    xp = array_module(x)
    inv_std = 1.0 / xp.sqrt(var + eps)
    y = (as_channels(x).astype(xp.float64) - mean[None, :, None]) * inv_std[None, :, None]
    return y.reshape(x.shape), inv_std


def backward_batch_stats(dy, y, inv_std):
    """dx when the batch's own statistics normalized it:
    (dy - mean(dy) - y * mean(dy * y)) * inv_std, means per channel over N and S."""
    xp = array_module(dy)
    dy3 = as_channels(dy).astype(xp.float64)
    y3 = as_channels(y)
    mean_dy = dy3.mean(axis=(0, 2), keepdims=True)
    mean_dy_y = (dy3 * y3).mean(axis=(0, 2), keepdims=True)
    dx = (dy3 - mean_dy - y3 * mean_dy_y) * inv_std[None, :, None]
    return dx.reshape(dy.shape)


def backward_global_stats(dy, inv_std):
    """dx when fixed (running) statistics normalized it: dy * inv_std."""
    xp = array_module(dy)
    return (as_channels(dy).astype(xp.float64) * inv_std[None, :, None]).reshape(dy.shape)
