"""Infogain loss: pure functions over NumPy or CuPy arrays.

Shapes follow Caffe's InfogainLoss with the class axis moved to the middle:
``x`` is (outer, K, inner), labels are (outer, inner), H is (K, K) with rows indexed by
the true label. The math runs in float64: a stable log-softmax replaces Caffe's
``log(max(p, 1e-20))`` for logits, so the loss and its gradient stay exact for any
finite logits.
"""

from safe_layers.kernels.xp import array_module

# Caffe's kLOG_THRESHOLD (loss_layer.hpp): the floor of log() for probability input.
LOG_THRESHOLD = 1e-20

NORMALIZATIONS = ("VALID", "BATCH_SIZE", "FULL", "NONE")


class InfogainMatrixError(ValueError):
    """An infogain matrix H that the loss cannot use."""


def check_infogain_matrix(h, num_classes):
    """H as a (K, K) float64 array; raises InfogainMatrixError unless it is K*K values,
    all finite and non-negative."""
    xp = array_module(h)
    k = num_classes
    if h.size != k * k:
        raise InfogainMatrixError("H has %d values (shape %s); K = %d classes need K*K = %d"
                                  % (h.size, tuple(h.shape), k, k * k))
    h = h.reshape(k, k).astype(xp.float64)
    bad = ~xp.isfinite(h)
    if bool(bad.any()):
        r, c = (int(i) for i in xp.argwhere(bad)[0])
        raise InfogainMatrixError("H[%d, %d] = %r is not finite (%d non-finite entries)"
                                  % (r, c, float(h[r, c]), int(bad.sum())))
    negative = h < 0
    if bool(negative.any()):
        r, c = (int(i) for i in xp.argwhere(negative)[0])
        raise InfogainMatrixError("H[%d, %d] = %r is negative (%d negative entries); a negative "
                                  "entry rewards p -> 0 and drives the logits to overflow"
                                  % (r, c, float(h[r, c]), int(negative.sum())))
    return h


def normalize_rows(h):
    """Each row of H divided by its sum (rows become distributions); a zero row is an error."""
    xp = array_module(h)
    sums = h.sum(axis=1)
    zero = sums <= 0
    if bool(zero.any()):
        raise InfogainMatrixError("row %d of H sums to 0 and cannot be normalized (that class "
                                  "would never learn)" % int(xp.argwhere(zero)[0][0]))
    return h / sums[:, None]


def label_positions(labels, num_classes, ignore_label=None):
    """(y, valid): integer labels (truncated like Caffe's cast; 0 where not valid) and
    the mask of positions that count. Raises ValueError naming the first label that is
    neither in [0, K) nor ignore_label (Caffe reads out of bounds there)."""
    xp = array_module(labels)
    finite = xp.isfinite(labels)
    y = xp.where(finite, labels, 0).astype(xp.int64)  # C cast truncates toward zero
    if ignore_label is None:
        valid = xp.ones(labels.shape, dtype=bool)
    else:
        valid = (y != ignore_label) | ~finite  # a NaN label is never "ignored"
    bad = valid & ((y < 0) | (y >= num_classes) | ~finite)
    if bool(bad.any()):
        position = tuple(int(i) for i in xp.argwhere(bad)[0])
        raise ValueError("label %r at position %s (outer, inner) is outside [0, %d) and is not "
                         "ignore_label (%s); %d such labels in this batch"
                         % (float(labels[position]), position, num_classes, ignore_label, int(bad.sum())))
    return xp.where(valid, y, 0), valid


def batch_frequency_weights(y, valid, num_classes):
    """Per-position weights n_valid / (classes_present * count[y]): every class present in
    the batch carries the same total weight. A class absent from the batch gets weight
    0 and is never divided by, so the weights stay finite; they sum to n_valid."""
    xp = array_module(y)
    counts = xp.bincount(y[valid].ravel(), minlength=num_classes).astype(xp.float64)
    present = xp.maximum((counts > 0).sum(), 1)
    per_class = xp.where(counts > 0, valid.sum() / (present * xp.maximum(counts, 1)), 0.0)
    return per_class[y] * valid


def normalizer(mode, outer, inner, num_valid):
    """Caffe's LossLayer normalizer, never below 1 (an all-ignored batch gives loss 0)."""
    if mode == "VALID":
        count = num_valid
    elif mode == "BATCH_SIZE":
        count = outer
    elif mode == "FULL":
        count = outer * inner
    elif mode == "NONE":
        count = 1
    else:
        raise ValueError("normalization %r; allowed: %s" % (mode, ", ".join(NORMALIZATIONS)))
    return max(1.0, float(count))


def log_softmax(x, axis=1):
    """(p, log p) of softmax over ``axis``, in float64, stable for any finite x."""
    xp = array_module(x)
    z = x.astype(xp.float64)
    z = z - z.max(axis=axis, keepdims=True)
    log_p = z - xp.log(xp.exp(z).sum(axis=axis, keepdims=True))
    return xp.exp(log_p), log_p


def _rows(h, y):
    """H[y] with the class axis in the middle: (outer, K, inner)."""
    xp = array_module(h)
    return xp.moveaxis(h[y], -1, 1)


def infogain_loss(log_p, y, weights, h):
    """sum over positions of weight * -sum_l H[y, l] * log p[l] (not yet normalized)."""
    per_position = -(_rows(h, y) * log_p).sum(axis=1)
    return (per_position * weights).sum()


def probability_log(p):
    """log(max(p, 1e-20)): the pre-2017 InfogainLoss on probabilities, as Caffe did it."""
    xp = array_module(p)
    return xp.log(xp.maximum(p.astype(xp.float64), LOG_THRESHOLD))


def infogain_grad_logits(p, y, weights, h, scale):
    """d loss / d logits = (p * S[y] - H[y, :]) * weight * scale, S[y] = sum_l H[y, l]."""
    row_sums = h.sum(axis=1)[y]
    return (p * row_sums[:, None, :] - _rows(h, y)) * (weights * scale)[:, None, :]


def infogain_grad_probabilities(p, y, weights, h, scale):
    """d loss / d p = -H[y, :] / max(p, 1e-20) * weight * scale (Caffe before 2017)."""
    xp = array_module(p)
    return -_rows(h, y) / xp.maximum(p.astype(xp.float64), LOG_THRESHOLD) * (weights * scale)[:, None, :]
