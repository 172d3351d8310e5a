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


def six_digits(value, none="none"):
    """``%.6g``: what a person reads in a report line (``nan``, ``inf``, ``-inf`` as
    Python writes them; ``none`` for None)."""
    return none if value is None else "%.6g" % value


def caffe_text(value):
    """A float as Caffe's ``LOG(INFO) << value`` prints it: 6 significant digits, and
    ``-nan`` when a NaN's sign bit is set (glibc's printf; Python would say ``nan``)."""
    value = float(value)
    if math.isnan(value):
        return "-nan" if math.copysign(1.0, value) < 0 else "nan"
    return "%g" % value


def shortest(value):
    """A Python float as the shortest text that reads back as the same float (``0.5``,
    ``1e-05``, ``3`` for 3.0)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def shortest_float32(value):
    """A data value as the shortest text that reads back as the same float32 (``none``
    for None): a blob's value, not the double it was widened to."""
    if value is None:
        return "none"
    import numpy  # here, not above: the command line reads this module before any array
    text = str(numpy.float32(value))
    return text[:-2] if text.endswith(".0") else text


def exact_short(value):
    """``%g`` where it reads back exactly, else the shortest exact text: a bound the user
    gave written as given (``1000``, ``1234567.0``, never ``1.23457e+06``)."""
    short = "%g" % value
    return short if float(short) == value else repr(float(value))
