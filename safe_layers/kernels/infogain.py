"""Infogain loss: pure functions over NumPy or CuPy arrays.

Shapes follow Caffe's InfogainLoss with the class axis moved to the middle:
``x`` is (outer, K, inner), labels are (outer, inner), H is (K, K) with rows indexed by
the true label. The math runs in float64: a stable log-softmax replaces Caffe's
``log(max(p, 1e-20))`` for logits, so the loss and its gradient stay exact for any
finite logits.
"""

import numpy

from safe_layers.kernels.xp import array_module, host_scalar, to_numpy

# Caffe's kLOG_THRESHOLD (loss_layer.hpp): the floor of log() for probability input.
LOG_THRESHOLD = 1e-20

NORMALIZATIONS = ("VALID", "BATCH_SIZE", "FULL", "NONE")


class InfogainMatrixError(ValueError):
    """An infogain matrix H that the loss cannot use."""


def check_infogain_matrix(h, num_classes, rows=False):
    """H as a (K, K) float64 array (each row divided by its sum with ``rows``); raises
    InfogainMatrixError unless it is K*K values, all finite and non-negative (and with
    ``rows``, no row summing to 0). One host read decides (on a GPU: one synchronisation
    per call when H comes from a bottom); the error's details take a few more."""
    xp = array_module(h)
    k = num_classes
    if h.size != k * k:
        raise InfogainMatrixError("H has %d values (shape %s); K = %d classes need K*K = %d"
                                  % (h.size, tuple(h.shape), k, k * k))
    h = h.reshape(k, k).astype(xp.float64)
    bad = ~xp.isfinite(h)
    negative = h < 0
    sums = h.sum(axis=1)
    zero = sums <= 0
    counts = xp.stack([bad.sum(), negative.sum(), zero.sum() if rows else xp.zeros((), numpy.int64)])
    n_bad, n_negative, n_zero = (int(c) for c in to_numpy(counts))
    if n_bad:
        r, c = (int(i) for i in to_numpy(xp.argwhere(bad)[0]))
        raise InfogainMatrixError("H[%d, %d] = %r is not finite (%d non-finite entries)"
                                  % (r, c, host_scalar(h[r, c]), n_bad))
    if n_negative:
        r, c = (int(i) for i in to_numpy(xp.argwhere(negative)[0]))
        raise InfogainMatrixError("H[%d, %d] = %r is negative (%d negative entries); a negative "
                                  "entry rewards p -> 0 and drives the logits to overflow"
                                  % (r, c, host_scalar(h[r, c]), n_negative))
    if n_zero:
        raise _zero_row(int(to_numpy(xp.argwhere(zero)[0][0])))
    return h / sums[:, None] if rows else h


def _zero_row(row):
    return InfogainMatrixError("row %d of H sums to 0 and cannot be normalized (that class "
                               "would never learn)" % row)


def normalize_rows(h):
    """Each row of H divided by its sum (rows become distributions); a zero row is an error."""
    xp = array_module(h)
    sums = h.sum(axis=1)
    zero = sums <= 0
    if host_scalar(zero.any()):
        raise _zero_row(int(to_numpy(xp.argwhere(zero)[0][0])))
    return h / sums[:, None]


def checked_labels(labels, num_classes, ignore_label=None):
    """(y, valid, bad), no host read: integer labels (truncated like Caffe's cast; 0 where
    not valid, and 0 where bad, so that gathers with them stay in bounds), the mask of
    positions that count, and the mask of labels that are neither in [0, K) nor
    ignore_label (Caffe reads out of bounds there; :func:`bad_label_error` says which)."""
    xp = array_module(labels)
    finite = xp.isfinite(labels)
    y = xp.where(finite, labels, 0).astype(xp.int64)  # C cast truncates toward zero
    if ignore_label is None:
        valid = xp.ones_like(labels, dtype=bool)
    else:
        valid = (y != ignore_label) | ~finite  # a NaN label is never "ignored"
    bad = valid & ((y < 0) | (y >= num_classes) | ~finite)
    return xp.where(valid & ~bad, y, 0), valid, bad


def bad_label_facts(labels, bad):
    """[count, flat position of the first, its value] of the bad labels, as one float64
    array of the labels' module (no host read)."""
    xp = array_module(labels)
    first = xp.argmax(bad.reshape(-1))
    return xp.stack([bad.sum().astype(xp.float64), first.astype(xp.float64),
                     xp.take(labels.reshape(-1), first).astype(xp.float64)])


def bad_label_error(facts, shape, num_classes, ignore_label):
    """The ValueError naming the first bad label, from host :func:`bad_label_facts`
    (labels of ``shape`` (outer, inner)), or None when there is none."""
    count, first, value = (float(v) for v in facts)
    if not count:
        return None
    position = tuple(int(i) for i in numpy.unravel_index(int(first), shape))
    return ValueError("label %r at position %s (outer, inner) is outside [0, %d) and is not "
                      "ignore_label (%s); %d such labels in this batch"
                      % (value, position, num_classes, ignore_label, int(count)))


def label_positions(labels, num_classes, ignore_label=None):
    """(y, valid) of :func:`checked_labels`; raises the ValueError of
    :func:`bad_label_error` at once (one host read)."""
    y, valid, bad = checked_labels(labels, num_classes, ignore_label)
    error = bad_label_error(to_numpy(bad_label_facts(labels, bad)), labels.shape, num_classes,
                            ignore_label)
    if error is not None:
        raise error
    return y, valid


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
    """Caffe's LossLayer normalizer, never below 1 (an all-ignored batch gives loss 0).
    ``num_valid`` may be an array (a count on the device): the normalizer then is one too,
    so that nothing is read on the host."""
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
    if isinstance(count, (int, float)):
        return max(1.0, float(count))
    xp = array_module(count)
    return xp.maximum(xp.asarray(count, dtype=xp.float64), 1.0)


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
