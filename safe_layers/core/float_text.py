"""Numbers as text: what JSON cannot hold, and numbers as Caffe prints them."""

import math


def jsonable(value):
    """``value`` with every float that JSON cannot hold (NaN, +-Inf) written as a string
    ('nan', 'inf', '-inf'), recursively through dicts, lists and tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
