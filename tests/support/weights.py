"""A net's weights, copied and compared bit for bit (what skip and rollback must keep)."""

import numpy as np


def weights(net):
    """{layer: [copy of each param blob's data]}."""
    return {name: [blob.data.copy() for blob in blobs] for name, blobs in net.params.items()}


def bit_equal(a, b):
    return a.keys() == b.keys() and all(x.tobytes() == y.tobytes()
                                        for name in a for x, y in zip(a[name], b[name]))


def assert_bit_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert x.tobytes() == y.tobytes(), name


def all_finite(net):
    return all(np.isfinite(blob.data).all() for blobs in net.params.values() for blob in blobs)
