"""Finite differences: the gradient a layer's backward must match, computed from forwards."""

import numpy as np


def numeric_gradient(net, blob, loss="loss", eps=1e-2):
    """Central finite differences of ``net``'s output ``loss`` w.r.t. the data of ``blob``
    (a float64 array shaped like the blob). The net runs float32, so callers compare with
    a tolerance fitted to ``eps``."""
    data = net.blobs[blob].data
    grad = np.zeros(data.shape, np.float64)
    for index in np.ndindex(*data.shape):
        original = float(data[index])
        data[index] = original + eps
        plus = float(net.forward()[loss].sum())
        data[index] = original - eps
        minus = float(net.forward()[loss].sum())
        data[index] = original
        grad[index] = (plus - minus) / (2 * eps)
    net.forward()
    return grad
