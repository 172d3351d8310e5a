"""``--csv PREFIX``: the ``PREFIX.train`` and ``PREFIX.test`` tables of Caffe's
``tools/extra/parse_log.py``, byte for byte where parse_log.py reads the log, and from
the logs it cannot read (glog 0.6's ``I20261207`` dates, ``nan`` / ``-nan`` / ``inf``
outputs, logs without glog's prefix).

A row per iteration that printed outputs: ``NumIters,Seconds,LearningRate`` then each
output by name, in the order the log prints them (parse_log.py:107-117). The rules
ported from parse_log.py (BVLC Caffe, tools/extra):

* NumIters is the last ``Iteration N`` the log gave, as a float (parse_log.py:46);
* Seconds: since the first line holding ``Solving`` (extract_seconds.py:31-41) to the
  row's first output line (parse_log.py:65, 107-111);
* LearningRate: the last ``lr = R`` before the row (parse_log.py:67-69), NaN before the
  first, and the first row takes the second's (parse_log.py:128-138);
* a row is complete when it has as many columns as the first row (parse_log.py:119-123);
* numbers are written as Python writes a float (``100.0``, ``0.01``, ``nan``), with the
  csv module's excel dialect (``\\r\\n`` line ends), as parse_log.py:157-173 does.

Where parse_log.py loses data, this keeps it, and says so: a table of one row (parse_log
writes a row only when the next one starts), a line without glog's prefix (Seconds NaN,
where parse_log skips the line), an output value that is not a plain number, an output
name a later row adds (a new column: parse_log's DictWriter raises).
"""

import csv
import io
import os

from safe_layers.core import atomic
from safe_layers.core.errors import InputError
from safe_layers.tools.diagnose.timeline import is_start

NAN = float("nan")


class ParseLogTables:
    """The train and test tables of a whole log, fed its events in order (every run of
    it, as parse_log.py reads them). Memory grows with the rows: only built for --csv."""

    def __init__(self, clock):
        self.clock = clock
        self.start = None
        self.iteration = None
        self.learning_rate = NAN
        self.rows = {"TRAIN": [], "TEST": []}
        self.open_row = {"TRAIN": None, "TEST": None}

    def feed(self, event):
        kind = event.kind
        if self.start is None and event.stamp is not None and is_start(event):
            self.start = self.clock.time(event.stamp)
        if kind in ("loss", "lr", "testing", "multistep"):
            self.iteration = float(event.iteration)
        if kind == "lr":
            self.learning_rate = event.value
        elif kind == "output" and self.iteration is not None:
            self._output(event)

    def _seconds(self, event):
        when = self.clock.time(event.stamp)
        if when is None:
            return NAN
        if self.start is None:
            # No `Solving` line (a pycaffe run's log): count from the first output line.
            self.start = when
        return (when - self.start).total_seconds()

    def _output(self, event):
        """parse_line_for_net_output (parse_log.py:86-125) for one output line."""
        rows = self.rows[event.phase]
        row = self.open_row[event.phase]
        if row is None or row["NumIters"] != self.iteration:
            if row is not None:
                rows.append(row)
            row = {"NumIters": self.iteration, "Seconds": self._seconds(event),
                   "LearningRate": self.learning_rate}
        row[event.name] = event.value
        if rows and len(row) == len(rows[0]):
            rows.append(row)
            row = None
        self.open_row[event.phase] = row

    def tables(self):
        """{"train": rows, "test": rows}: parse_log.py's lists, plus the open row of a
        table that has no other (parse_log.py would write no table at all)."""
        out = {}
        for phase, rows in self.rows.items():
            rows = list(rows)
            if not rows and self.open_row[phase] is not None:
                rows.append(self.open_row[phase])
            if len(rows) > 1:
                rows[0] = dict(rows[0], LearningRate=rows[1]["LearningRate"])
            out[phase.lower()] = rows
        return out


def csv_text(rows):
    """``rows`` as parse_log.py's write_csv writes them (parse_log.py:157-173): a header
    of the first row's columns (columns a later row adds after them), excel dialect."""
    columns = list(rows[0])
    for row in rows[1:]:
        columns += [name for name in row if name not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, dialect=csv.excel)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def output_paths(prefix, logs):
    """{log: (train path, test path)}: ``PREFIX.train`` / ``PREFIX.test`` for one log; for
    a folder (an existing one, or a name ending in '/'), parse_log.py's names in it,
    ``DIR/<log file name>.train`` (parse_log.py:149-154)."""
    if os.path.isdir(prefix) or prefix.endswith(os.sep):
        paths = {}
        for log in logs:
            base = os.path.join(prefix, os.path.basename(log) if log != "-" else "stdin")
            if base in paths.values():
                raise InputError("--csv %s: two logs named %s: give each its own --csv"
                                 % (prefix, os.path.basename(log)))
            paths[log] = base
    elif len(logs) > 1:
        raise InputError("--csv %s: with several logs, --csv takes a folder (DIR/: one "
                         "DIR/<log>.train and .test per log, as parse_log.py names them)" % prefix)
    else:
        paths = {logs[0]: prefix}
    inputs = {os.path.realpath(log) for log in logs if log != "-"}
    out = {}
    for log, base in paths.items():
        pair = (base + ".train", base + ".test")
        for path in pair:
            if os.path.realpath(path) in inputs:
                raise InputError("--csv %s would overwrite the log %s" % (prefix, path))
        out[log] = pair
    return out


def write_tables(tables, paths):
    """Write the tables to ``paths`` (train, test) through core.atomic; a table without
    rows is not written, as parse_log.py's write_csv does (parse_log.py:161-164).
    Returns the lines to print: what was written and what was not."""
    said = []
    for name, path in zip(("train", "test"), paths):
        rows = tables[name]
        if not rows:
            said.append("csv: no %s outputs in the log: %s not written" % (name, path))
            continue
        try:
            atomic.replace_file(path, csv_text(rows).encode("utf-8"))
        except OSError as exc:
            raise InputError("cannot write %s: %s" % (path, exc.strerror or exc)) from None
        said.append("csv: %s (%d rows)" % (path, len(rows)))
    return said
