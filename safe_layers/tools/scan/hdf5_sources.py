"""HDF5 sources as ``HDF5Data`` reads them: the list of files, one dataset per top, rows
converted to float32 (SL920-SL926)."""

import math
import os

from safe_layers.core.errors import InputError
from safe_layers.readers import datasets, prototxt
from safe_layers.tools import rule_table
from safe_layers.tools.findings import Finding
from safe_layers.tools.scan.label_stats import LABEL_OUTSIDE, label_problem

FILE_MISSING = rule_table.rule(
    "scan", "SL920", "error", "HDF5: a listed file that does not exist",
    doc="""
    HDF5Data reads its source as a list of file names split at white space
    (hdf5_data_layer.cpp:83-88) and opens them one at a time as it reaches them
    (hdf5_data_layer.cpp:30-33, `Failed opening HDF5 file`): a missing file aborts the run
    when its turn comes, possibly hours in, and a path with a space becomes two names.
    Relative names are opened from the working directory, not from the list's folder.
    """)
NO_DATASET = rule_table.rule(
    "scan", "SL921", "error", "HDF5: a top with no dataset of its name",
    doc="""
    HDF5Data loads one dataset per top, named exactly as the top
    (hdf5_data_layer.cpp:41-46), and CHECKs that it exists (hdf5.cpp:15-16, `Failed to
    find HDF5 dataset`): a top named 'data' over a file holding 'images' aborts when that
    file is loaded. scan lists the datasets the file has.
    """)
NOT_NUMERIC = rule_table.rule(
    "scan", "SL922", "error", "HDF5: a dataset neither float nor integer",
    doc="""
    hdf5_load_nd_dataset accepts only the H5T_FLOAT and H5T_INTEGER classes and aborts on
    any other (strings, compounds, enums...: hdf5.cpp:31-58, `Unsupported datatype class`).
    Store the dataset as float32, which is also what the layer converts it to.
    """)
NON_FINITE = rule_table.rule(
    "scan", "SL923", "error", "HDF5: non-finite values",
    doc="""
    HDF5Data copies rows into its tops unchecked (hdf5_data_layer.cpp:170-175), converted
    to float32 by H5LTread_dataset_float (hdf5.cpp:92-94): a NaN or Inf, or a finite
    float64 above float32's range (it becomes inf), reaches the first layer and, in the
    backward pass, its weight gradient, so the next update writes NaN into the weights.
    scan names the rows, the counts of nan, +inf and -inf and the float32 overflows.
    """)
ROWS_DIFFER = rule_table.rule(
    "scan", "SL924", "error", "HDF5: tops differing in dimension 0 (or a scalar dataset)",
    doc="""
    HDF5Data CHECKs that each dataset has at least one axis and that every top's dataset
    of a file has as many rows as the first top's (hdf5_data_layer.cpp:52-56): a label
    set one row short of the data aborts when that file is loaded.
    """)
ROW_SHAPE = rule_table.rule(
    "scan", "SL925", "error", "HDF5: rows shaped unlike the first file's",
    doc="""
    HDF5Data shapes its tops from the first file at setup (hdf5_data_layer.cpp:112-126)
    and later copies count / num values per row from whichever file is loaded
    (hdf5_data_layer.cpp:170-175): a later file whose rows hold another shape is not
    refused but read with the first file's row size, each row shifted into the next (or
    past the end of the data), with no error.
    """)
EMPTY_LIST = rule_table.rule(
    "scan", "SL926", "error", "HDF5: a list that names no file",
    doc="""
    HDF5Data aborts at setup when its source list names no file
    (hdf5_data_layer.cpp:96-97, `Must have at least 1 HDF5 filename listed`).
    """)
NO_ROWS = rule_table.rule(
    "scan", "SL927", "error", "HDF5: a file whose datasets hold no row",
    doc="""
    HDF5Data loads a file of 0 rows without a word (hdf5_data_layer.cpp:51-60 checks the
    axes and that the tops agree, not that there is a row) and then reads past its end:
    Forward_cpu copies row ``data_permutation_[current_row_]`` of an empty permutation
    (hdf5_data_layer.cpp:173), and Next() moves on to the next file only when the row
    count is reached exactly (hdf5_data_layer.cpp:141), which from 0 it never is. The
    batches are whatever memory lies there, or the process crashes.
    """)


def scan_hdf5(report, limit, label_name):
    """Check an HDF5Data source (list file or one .h5 file) into ``report``."""
    target = report.target
    path = target.path
    with open(path, "rb") as f:
        single = f.read(8) == b"\x89HDF\r\n\x1a\n"
    if single:
        entries, list_path = [(0, path)], None
    else:
        entries, list_path = datasets.hdf5_list(path), path
        if not entries:
            report.extra.append(Finding(path, 1, 1, EMPTY_LIST, "error",
                                        "the HDF5 list names no file (HDF5Data aborts: "
                                        "'Must have at least 1 HDF5 filename listed')",
                                        "list the .h5 files, one per line"))
            return
    tops = target.tops
    first_shapes = {}
    rows_left = limit
    for line, name in entries:
        if rows_left is not None and rows_left <= 0:
            report.truncated_at = limit
            break
        if list_path is not None:
            file_path, note = prototxt.resolve_reference(name, list_path)
            if note == "does not exist":
                hint = (" (HDF5Data splits the list at white space: a path with a space in it "
                        "becomes two)" if _line_has_several_tokens(entries, line) else "")
                report.rules.add(Finding(list_path, line, 1, FILE_MISSING, "error",
                                         "listed file %r does not exist%s" % (name, hint),
                                         "fix the path (relative paths are opened from the working "
                                         "directory, %s)" % os.getcwd(), data={"file": name}))
                continue
        else:
            file_path = name
        tops, rows = _scan_file(report, file_path, tops, first_shapes, rows_left, label_name)
        if rows_left is not None:
            rows = min(rows, rows_left)
            rows_left -= rows
        report.records += rows


def _line_has_several_tokens(entries, line):
    return sum(1 for number, _ in entries if number == line) > 1


def _scan_file(report, file_path, tops, first_shapes, rows_left, label_name):
    """One .h5 file of the source, each top's dataset checked and its values scanned:
    (the tops, from the first file when none were given; the file's rows)."""
    with datasets.HDF5File(file_path) as h5:
        if tops is None:
            tops = h5.names()
            if not tops:
                raise InputError("%s: no datasets in the file" % file_path)
        dim0 = {}
        for top in tops:
            found = _readable_dataset(h5, top, file_path, report)
            if found is None:
                continue
            kind, shape = found
            dim0[top] = shape[0]
            if top in first_shapes and first_shapes[top][1:] != shape[1:]:
                report.rules.add(Finding(file_path, 0, 0, ROW_SHAPE, "error",
                                         "dataset '%s' has rows of shape %s, the first file's "
                                         "has %s (HDF5Data shapes its top from the first file "
                                         "and would misread these rows)"
                                         % (top, list(shape[1:]), list(first_shapes[top][1:])),
                                         "store every file's '%s' with rows of one shape" % top,
                                         data={"top": top, "shape": list(shape)}))
                continue
            first_shapes.setdefault(top, shape)
            if report.shape is None:
                report.shape = shape[1:]
            _scan_hdf5_values(h5, top, file_path, report, rows_left, kind,
                              top == label_name, report.target)
        if dim0 and not any(dim0.values()):
            report.rules.add(Finding(file_path, 0, 0, NO_ROWS, "error",
                                     "its datasets hold no row (%s): HDF5Data would read past "
                                     "their end" % ", ".join("%s=0" % top for top in dim0),
                                     "remove the file from the list, or fill it",
                                     data={"rows": dim0}))
        if len(set(dim0.values())) > 1:
            report.rules.add(Finding(file_path, 0, 0, ROWS_DIFFER, "error",
                                     "the tops' datasets differ in dimension 0: %s (HDF5Data "
                                     "requires the same number of rows)"
                                     % ", ".join("%s=%d" % kv for kv in dim0.items()),
                                     "store the same number of rows in every dataset",
                                     data={"rows": dim0}))
        return tops, (max(dim0.values()) if dim0 else 0)


def _readable_dataset(h5, top, file_path, report):
    """(kind, shape) of the dataset named ``top``, or None when HDF5Data cannot load it
    (no such dataset, neither float nor integer, a scalar): reported."""
    if not h5.has(top):
        report.rules.add(Finding(file_path, 0, 0, NO_DATASET, "error",
                                 "no dataset named '%s' (the top's name): it has %s"
                                 % (top, ", ".join(h5.names()) or "none"),
                                 "name the top after a dataset, or add the dataset",
                                 data={"top": top}))
        return None
    kind = h5.kind(top)
    if kind not in ("float", "integer"):
        report.rules.add(Finding(file_path, 0, 0, NOT_NUMERIC, "error",
                                 "dataset '%s' is of type %s; HDF5Data reads only float "
                                 "and integer datasets" % (top, kind),
                                 "store it as float32", data={"top": top}))
        return None
    shape = h5.shape(top)
    if not shape:
        report.rules.add(Finding(file_path, 0, 0, ROWS_DIFFER, "error",
                                 "dataset '%s' is a scalar; HDF5Data needs at least one "
                                 "axis" % top, "store it with a row axis", data={"top": top}))
        return None
    return kind, shape


def _scan_hdf5_values(h5, top, file_path, report, rows_left, kind, is_label, target):
    """One dataset's rows (the first ``rows_left``): non-finite values as HDF5Data's float32
    sees them and, for the label dataset, its labels."""
    import numpy  # deferred: `safe-layers --help` does not need it
    bad_rows, counts, overflow = [], {"nan": 0, "posinf": 0, "neginf": 0}, 0
    for start, block in h5.rows(top):
        if rows_left is not None and start >= rows_left:
            break
        if rows_left is not None:
            block = block[:rows_left - start]
        with numpy.errstate(over="ignore"):  # overflow to inf is what HDF5Data does too
            values = numpy.asarray(block, numpy.float32)
        if kind == "float":
            bad = ~numpy.isfinite(values)
            if bad.any():
                per_row = bad.reshape(len(values), -1).any(axis=1)
                bad_rows.extend(int(start + r) for r in numpy.flatnonzero(per_row))
                counts["nan"] += int(numpy.isnan(values).sum())
                counts["posinf"] += int(numpy.isposinf(values).sum())
                counts["neginf"] += int(numpy.isneginf(values).sum())
                original = numpy.asarray(block)
                overflow += int((bad & numpy.isfinite(original)).sum())
        if is_label:
            flat = values.reshape(len(values), -1)
            if flat.shape[1] == 1:
                for offset, value in enumerate(flat[:, 0].tolist()):
                    if not math.isfinite(value) or value != int(value):
                        report.labels.non_integer += 1
                        continue
                    label = int(value)
                    if label == target.ignore_label:
                        continue
                    problem = label_problem(label, target)
                    if problem:
                        report.rules.add(Finding(
                            file_path, 0, 0, LABEL_OUTSIDE, "error",
                            "dataset '%s' row %d: %s" % (top, start + offset, problem),
                            "relabel the row, or set the loss's ignore_label to it",
                            data={"top": top, "row": start + offset, "label": label}))
                        continue
                    report.labels.add(label)
    if bad_rows:
        shown = bad_rows[:20]
        more = " and %d more" % (len(bad_rows) - len(shown)) if len(bad_rows) > len(shown) else ""
        why = (" (%d finite float64 values overflow float32, as HDF5Data converts them)" % overflow
               if overflow else "")
        report.rules.add(Finding(
            file_path, 0, 0, NON_FINITE, "error",
            "dataset '%s': non-finite values in %d rows: %s%s (nan=%d +inf=%d -inf=%d)%s"
            % (top, len(bad_rows), shown, more, counts["nan"], counts["posinf"], counts["neginf"], why),
            "rebuild these rows, or guard the data layer with a NaNGuard (action: clamp)",
            data=dict(counts, top=top, rows=bad_rows, overflow_float32=overflow)))
