"""Datum records of an LMDB or LevelDB, checked one by one in the order Caffe's ``Data``
layer reads them (key order): their values, their shapes, their labels (SL901-SL907)."""

import os
import sys

from safe_layers.readers import datasets
from safe_layers.tools import rule_table
from safe_layers.tools.findings import Finding
from safe_layers.tools.scan.label_stats import LABEL_OUTSIDE, label_problem

NON_FINITE = rule_table.rule(
    "scan", "SL901", "error", "non-finite float_data",
    doc="""
    The Data layer copies a Datum's float_data into the batch unchecked
    (data_transformer.cpp:107-122, mean subtraction and scale included): one NaN or Inf in
    one record reaches the first layer's output and, in the backward pass, that layer's own
    weight gradient, so the next update writes NaN into its weights and every iteration
    after is lost. scan names the record (key, position), the counts of nan, +inf and -inf
    and the first element's [c, h, w]; a NaNGuard with action: clamp on the data layer's
    tops keeps such a record out while the set is rebuilt.
    """)
SIZE_MISMATCH = rule_table.rule(
    "scan", "SL902", "error", "data/float_data size not channels x height x width",
    doc="""
    DataTransformer::Transform reads channels x height x width values from a record's data
    (or float_data) by index, without comparing that count with the values the record holds
    (data_transformer.cpp:95-111): a short record is read past its end (memory after the
    string: garbage, or a crash) and a long one is silently truncated. A record with no
    values at all is reported too. scan compares the count with the declared shape.
    """)
SHAPE_CHANGE = rule_table.rule(
    "scan", "SL903", "error", "a shape other than the first record's",
    doc="""
    The Data layer shapes its top from the first record at setup and each batch from the
    batch's first record (data_layer.cpp:34-41, 101-110); DataTransformer::Transform then
    CHECKs that every other record of the batch has that shape (data_transformer.cpp:
    167-178), so a record of another size aborts training whenever it is not first in its
    batch, and the net was set up for the first record's size anyway. Shapes of encoded
    records are those of the decoded image (when Pillow is installed).
    """)
UNDECODABLE = rule_table.rule(
    "scan", "SL905", "error", "an encoded image that does not decode",
    doc="""
    An encoded Datum (convert_imageset --encoded) holds a JPEG or PNG that the Data layer
    decodes with OpenCV for every batch (data_transformer.cpp:134-146). When cv::imdecode
    fails, Caffe logs `Could not decode datum` (io.cpp:184-187) and transforms an empty
    image, which fails a shape CHECK mid-training. scan decodes each image with Pillow;
    without Pillow, an info finding counts the encoded records it could not check.
    """)
NOT_A_DATUM = rule_table.rule(
    "scan", "SL906", "error", "a value that is not a Datum",
    doc="""
    The Data layer parses each value with Datum::ParseFromString and ignores its result
    (data_layer.cpp:99): a value that is no Datum (another tool's record, a truncated
    write) leaves an empty or partly filled Datum, whose zero shape fails a CHECK in
    DataTransformer (data_transformer.cpp:56) or whose stale fields are read as this
    record. scan reports the record and why it does not parse.
    """)
EMPTY_DATABASE = rule_table.rule(
    "scan", "SL907", "error", "a database with no record",
    doc="""
    The Data layer reads its first record at setup to shape its top (data_layer.cpp:34):
    on an empty LMDB the cursor is not valid (db_lmdb.hpp:40-46) and the value it parses is
    none, and at every batch DataLayer::Next rewinds to a first record that does not exist
    (data_layer.cpp:70-77). Training fails at setup or feeds garbage; scan reports the
    empty database instead.
    """)


def scan_database(report, limit):
    """Check every record (the first ``limit``) of an LMDB/LevelDB into ``report``."""
    target = report.target
    path = target.path
    can_decode = datasets.image_library() is not None
    with datasets.open_database(path, target.backend) as db:
        total = db.count if limit is None or db.count is None else min(limit, db.count)
        records = progress(db.records(limit=limit), total, os.path.basename(path.rstrip("/")))
        for record in records:
            report.records += 1
            _check_record(report, record, can_decode)
        if limit is not None and report.records >= limit and (db.count is None or db.count > limit):
            report.truncated_at = limit
    if report.records == 0:
        report.rules.add(Finding(path, 0, 0, EMPTY_DATABASE, "error", "the database holds no record: "
                                 "Caffe's Data layer waits for data or fails on it",
                                 "fill it, or point the data layer's source at the set meant"))
    if report.encoded_unchecked:
        report.extra.append(Finding(path, 0, 0, UNDECODABLE, "info",
                                    "%d encoded records not decoded: no image library (Pillow) is "
                                    "installed" % report.encoded_unchecked,
                                    "pip install Pillow to check them",
                                    data={"count": report.encoded_unchecked}))


def progress(iterable, total, description):
    """tqdm on a terminal; the iterable itself otherwise (logs, pipes, CI)."""
    if not sys.stderr.isatty():
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=description, unit="rec", file=sys.stderr,
                leave=False, dynamic_ncols=True)


def _check_record(report, record, can_decode):
    """One record: does it parse, hold its declared values, keep the first record's
    shape, and carry a class label of the net (kept for the label statistics)?"""
    target = report.target
    path = target.path

    def found(rule, message, fix, **data):
        key = record.key_text
        report.rules.add(Finding(path, 0, 0, rule, "error", "record %s (position %d): %s"
                                 % (key, record.position, message), fix,
                                 data=dict(data, key=key, position=record.position)))

    try:
        datum = datasets.parse_datum(record.value)
    except datasets.DatumError as exc:
        found(NOT_A_DATUM, str(exc), "rebuild the database with Caffe's convert tools or "
              "caffe.io.array_to_datum-equivalent code")
        return
    if datum.encoded:
        shape = _decoded_shape(report, datum, can_decode, found)
    else:
        shape = _checked_values_shape(datum, found)
    if shape is not None:
        if report.shape is None:
            report.shape = tuple(int(d) for d in shape)
        elif tuple(shape) != report.shape:
            found(SHAPE_CHANGE, "shape %s differs from the first record's %s (Caffe shapes "
                                "each batch from its first record: a record of another shape "
                                "in that batch fails a CHECK, and the net was set up for the "
                                "first record's)"
                  % ("x".join(map(str, shape)), "x".join(map(str, report.shape))),
                  "resize this record to %s or rebuild the set at one size"
                  % "x".join(map(str, report.shape)),
                  shape=list(shape), first_shape=list(report.shape))
    label = int(datum.label)
    if label == target.ignore_label:
        return
    problem = label_problem(label, target)
    if problem:
        found(LABEL_OUTSIDE, problem, "relabel this record, or set the loss's ignore_label to it "
              "if it means 'no label'", label=label)
        return  # not a class: kept out of the label statistics
    report.labels.add(label)


def _decoded_shape(report, datum, can_decode, found):
    """The shape of an encoded record's image (its declared shape when nothing can decode
    it; None when it does not decode)."""
    shape = datasets.datum_shape(datum)
    report.encoded += 1
    if not can_decode:
        report.encoded_unchecked += 1
        return shape
    try:
        return datasets.decode_image(datum).shape
    except datasets.DatumError as exc:
        found(UNDECODABLE, str(exc), "re-encode or drop this image")
        return None


def _checked_values_shape(datum, found):
    """The declared shape of a raw record whose values fit it (None when they do not),
    its float_data checked for NaN and Inf."""
    import numpy  # deferred: `safe-layers --help` does not need it
    shape = datasets.datum_shape(datum)
    expected = shape[0] * shape[1] * shape[2]
    if len(datum.data):
        count, field = len(datum.data), "data"
    else:
        count, field = len(datum.float_data), "float_data"
    if count == 0:
        found(SIZE_MISMATCH, "no values: data and float_data are both empty "
                             "(declared %dx%dx%d)" % shape,
              "drop the record or fill it", declared=list(shape), values=0)
        return None
    if count != expected:
        found(SIZE_MISMATCH, "%s holds %d values, channels x height x width = %dx%dx%d = %d"
              % (field, count, shape[0], shape[1], shape[2], expected),
              "fix channels/height/width or the data of this record",
              field=field, values=count, declared=list(shape))
        return None
    if field == "float_data":
        values = numpy.fromiter(datum.float_data, numpy.float32, count)
        bad = ~numpy.isfinite(values)
        if bad.any():
            nan = int(numpy.isnan(values).sum())
            posinf = int(numpy.isposinf(values).sum())
            neginf = int(numpy.isneginf(values).sum())
            first = int(numpy.flatnonzero(bad)[0])
            index = [int(i) for i in numpy.unravel_index(first, shape)]
            found(NON_FINITE, "float_data holds nan=%d +inf=%d -inf=%d of %d values; first "
                              "at [c, h, w] = %s" % (nan, posinf, neginf, count, index),
                  "rebuild this record from its source, or guard the data layer with "
                  "a NaNGuard (action: clamp)",
                  nan=nan, posinf=posinf, neginf=neginf, first_index=index)
    return shape
