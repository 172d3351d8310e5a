"""A faulty array's FaultReport: made at once (inspect) or when its deferred check is read."""

import numpy

from safe_layers.kernels import finite
from safe_layers.kernels.xp import array_module, to_numpy
from safe_layers.reporting.report_lines import FaultReport, as_float32


def inspect(array, max_abs=None, always=False, **context):
    """A FaultReport for ``array``, or None when it holds no fault after all (unless
    ``always``: a fault the counts do not show, told by a ``detail`` in ``context``).

    ``context`` supplies the FaultReport fields that describe where the array came from
    (layer_type, layer, follows, phase, pass_, call, iteration, blob, blob_index, action).
    The statistics are rounded to float32 like the data, so a report reads back from its
    line exactly. One host read (a row of ``finite.fault_stats``).
    """
    row = finite.fault_stats(array, finite.empty_rows(array_module(array), 1)[0], max_abs,
                             always=True)
    return report_from_row(to_numpy(row), tuple(array.shape), max_abs, always, **context)


def report_from_row(row, shape, max_abs=None, always=False, **context):
    """The FaultReport a host row of ``finite.fault_stats`` describes (for an array of
    ``shape``), or None when nothing is at fault (unless ``always``). ``context``: as for
    :func:`inspect`."""
    counts = {"nan": int(row[finite.NAN]), "posinf": int(row[finite.POSINF]),
              "neginf": int(row[finite.NEGINF]), "over": int(row[finite.OVER])}
    if not any(counts.values()) and not always:
        return None  # the fast check's overflowing-sum false alarm
    first_index = first_value = None
    if row[finite.FIRST] >= 0:
        first_index = tuple(int(i) for i in numpy.unravel_index(int(row[finite.FIRST]), shape))
        first_value = float(row[finite.FIRST_VALUE])
    fmin = fmax = fmean = None
    if row[finite.FINITE]:
        fmin, fmax = float(row[finite.FINITE_MIN]), float(row[finite.FINITE_MAX])
        fmean = float(row[finite.SUM_ABS] / row[finite.FINITE])
    return FaultReport(shape=tuple(int(d) for d in shape), max_abs=max_abs,
                       first_index=first_index, first_value=as_float32(first_value),
                       finite_min=as_float32(fmin), finite_max=as_float32(fmax),
                       finite_mean_abs=as_float32(fmean), **counts, **context)


class PendingFault:
    """A deferred check's entry on its board (``safe_layers.core.deferred``): when the board is
    read, its row becomes the FaultReport the check at once would have made, handled by
    the layer's log (printed, counted, escalated, raised for abort). ``detail(row)``, if
    given, says what the counts do not (and makes a row with zero counts a fault when it
    returns text); ``skip(row)``, if given and true, drops the row (a fault another
    report has explained)."""

    def __init__(self, log, shape, max_abs, context, detail=None, skip=None):
        self.log = log
        self.shape = shape
        self.max_abs = max_abs
        self.context = context
        self.detail = detail
        self.skip = skip

    def resolve(self, row):
        if self.skip is not None and self.skip(row):
            return None
        detail = self.detail(row) if self.detail is not None else None
        report = report_from_row(row, self.shape, self.max_abs, always=detail is not None,
                                 **self.context)
        if report is None:
            return None
        if detail is not None:
            report.detail = detail
        self.log.handle(report)  # raises for abort
        return report
