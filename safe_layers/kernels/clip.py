"""Gradient clipping: pure functions over NumPy or CuPy arrays, in place.

Composed like PyTorch's clip_grad: compute the norm, then apply a scale. On GPU nothing
here reads a device value on the host: the scale is ``min(1, max_norm / (norm + tiny))``
applied by multiplication, never an ``if norm > max_norm`` branch.
"""

from safe_layers.kernels.xp import array_module

# Keeps max_norm / norm finite for an all-zero gradient (the scale then clamps to 1).
TINY = 1e-6


def zero_nonfinite_(g):
    """Set NaN and +-Inf elements of ``g`` to 0, in place. Returns ``g``."""
    xp = array_module(g)
    xp.nan_to_num(g, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return g


def clip_by_value_(g, clip):
    """Clip every element of ``g`` to ``[-clip, clip]`` in place (NaN stays NaN)."""
    xp = array_module(g)
    xp.clip(g, -clip, clip, out=g)
    return g


def l2_norms(g, per_sample=False, finite_only=False):
    """L2 norm of ``g`` (shape ``()``) or of each sample along axis 0 (shape ``(N,)``).

    Accumulated in float64, so a float32 gradient whose squares overflow float32 still
    has a finite norm. With ``finite_only``, NaN/Inf elements are left out of the sum.
    """
    xp = array_module(g)
    rows = g.reshape(g.shape[0] if (per_sample and g.ndim) else 1, -1).astype(xp.float64)
    if finite_only:
        rows = xp.where(xp.isfinite(rows), rows, 0.0)  # a masked assignment would read on the host
    norms = xp.sqrt(xp.einsum("ij,ij->i", rows, rows))
    return norms if per_sample else norms.reshape(())


def clip_scale(norms, max_norm):
    """``min(1, max_norm / (norm + TINY))``, elementwise, as an array (no host sync)."""
    xp = array_module(norms)
    return xp.minimum(1.0, max_norm / (norms + TINY))


def clip_by_norm_(g, max_norm, per_sample=False, finite_only=False):
    """Rescale ``g`` in place so its L2 norm (or each sample's) is at most ``max_norm``.

    Returns the norms before clipping (a device array on GPU).
    """
    norms = l2_norms(g, per_sample, finite_only)
    scale = clip_scale(norms, max_norm).astype(g.dtype)
    if per_sample and g.ndim:
        g *= scale.reshape((-1,) + (1,) * (g.ndim - 1))
    else:
        g *= scale
    return norms


def clip_finite_by_value_(g, clip):
    """Clip the finite elements of ``g`` to ``[-clip, clip]`` in place; NaN and +-Inf pass
    through unchanged. Returns whether any finite element was clipped (a 0-d array)."""
    xp = array_module(g)
    finite = xp.isfinite(g)
    clipped = (finite & (xp.abs(g) > clip)).any()
    xp.copyto(g, xp.clip(g, -clip, clip), where=finite)
    return clipped
