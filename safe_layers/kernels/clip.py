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
    return group_l2_norms([g], per_sample, finite_only)


def _rows(g, per_sample):
    """``g`` as float64 rows: one per sample along axis 0, or one row."""
    xp = array_module(g)
    return g.reshape(g.shape[0] if (per_sample and g.ndim) else 1, -1).astype(xp.float64)


def sample_counts(grads, per_sample):
    """The number of rows each array of ``grads`` has for :func:`group_l2_norms`."""
    return [g.shape[0] if (per_sample and g.ndim) else 1 for g in grads]


def group_l2_norms(grads, per_sample=False, finite_only=False):
    """The L2 norm of the arrays ``grads`` taken together, as if concatenated (shape
    ``()``), or of each sample across all of them (shape ``(N,)``: every array holds the
    same N samples along axis 0). Float64, and ``finite_only``, as :func:`l2_norms`."""
    xp = array_module(grads[0])
    counts = sample_counts(grads, per_sample)
    if len(set(counts)) > 1:
        raise ValueError("per-sample norms of arrays with different numbers of samples: %s"
                         % ", ".join(str(n) for n in counts))
    squares = None
    for g in grads:
        rows = _rows(g, per_sample)
        if finite_only:
            rows = xp.where(xp.isfinite(rows), rows, 0.0)  # a masked assignment would read on the host
        part = xp.einsum("ij,ij->i", rows, rows)
        squares = part if squares is None else squares + part
    norms = xp.sqrt(squares)
    return norms if per_sample else norms.reshape(())


def clip_scale(norms, max_norm):
    """``min(1, max_norm / (norm + TINY))``, elementwise, as an array (no host sync)."""
    xp = array_module(norms)
    return xp.minimum(1.0, max_norm / (norms + TINY))


def clip_by_norm_(g, max_norm, per_sample=False, finite_only=False):
    """Rescale ``g`` in place so its L2 norm (or each sample's) is at most ``max_norm``.

    Returns the norms before clipping (a device array on GPU).
    """
    return clip_group_by_norm_([g], max_norm, per_sample, finite_only)


def clip_group_by_norm_(grads, max_norm, per_sample=False, finite_only=False):
    """Rescale the arrays ``grads`` in place by one factor, so that their L2 norm taken
    together (or each sample's, across all of them) is at most ``max_norm``: the
    direction of the whole gradient is kept. Returns the norms before clipping."""
    norms = group_l2_norms(grads, per_sample, finite_only)
    scale = clip_scale(norms, max_norm)
    for g in grads:
        factor = scale.astype(g.dtype)
        if per_sample and g.ndim:
            g *= factor.reshape((-1,) + (1,) * (g.ndim - 1))
        else:
            g *= factor
    return norms


def clip_finite_by_value_(g, clip):
    """Clip the finite elements of ``g`` to ``[-clip, clip]`` in place; NaN and +-Inf pass
    through unchanged. Returns whether any finite element was clipped (a 0-d array)."""
    xp = array_module(g)
    finite = xp.isfinite(g)
    clipped = (finite & (xp.abs(g) > clip)).any()
    xp.copyto(g, xp.clip(g, -clip, clip), where=finite)
    return clipped
