"""What a watch says: every report and event kept, counted and printed (in full for the
first few of each kind, then one summary line now and then), handed to the listener; the
first fault recorded; and :class:`NonFiniteError`, where the watch stops training.

Where two watches of one process run side by side, their lines name the watch
(``WATCH [tag] ...``, :func:`safe_layers.reporting.watch_lines.tagged`); a watch alone
writes its lines as ever.
"""

import collections
import itertools
import sys

from safe_layers import reporting
from safe_layers.anomaly import record as records
from safe_layers.reporting import watch_lines


class NonFiniteError(FloatingPointError):
    """Raised where the watch stops training; ``report`` is the SolverFault or
    ProducerFault that says why. Raised before the update, so the weights are those
    of before the faulty iteration (except for a 'weights' fault, which is about them)."""

    def __init__(self, report):
        super().__init__(report.line())
        self.report = report


# The Reports of this process's watches that are not closed, oldest first. A watch that
# is never closed stays here for good (its hooks live in the nets, out of the collector's
# reach): which watches run side by side is told by when each last ran (``seen``).
_live = []
_clock = itertools.count(1)
_numbers = itertools.count(1)


class Reports:
    """The reports of one watch: ``faults`` and ``events`` (oldest first), ``counts``
    (per kind), ``record_path`` (the record of the first fault, once written).

    Printed to ``stream`` (stderr when None): each kind in full ``log_first`` times, then
    one summary line every ``log_every``; a stop, a rollback and an lr change always.
    ``listener`` (read at each report, so it may be set later) gets every one. An event
    with ``details['warning']`` is always printed, as a warning.

    ``tag_of`` (callable -> a name or None) names the watch's lines while another watch of
    this process runs beside it; ``kind`` ('solver' or 'net') names an unnamed one."""

    def __init__(self, options, stream, listener, iteration, probe, tag_of=None, kind="solver"):
        self.options = options
        self.stream = stream
        self.listener = listener
        self.iteration = iteration  # callable -> the iteration a record is written for
        self.probe = probe          # the watched net's probe: the batch and net of a record
        self.faults, self.events = [], []
        self.counts = collections.Counter()
        self.recorded = False
        self.record_path = None
        self.tag_of, self.kind = tag_of, kind
        self.tag = None
        self.number = next(_numbers)
        self.opened = self.seen = next(_clock)

    # -- watches side by side ---------------------------------------------------------
    def open(self):
        """Count this watch among the process's live ones (once it is built)."""
        _live.append(self)

    def close(self):
        if self in _live:
            _live.remove(self)

    def running(self):
        """The watch's nets run now."""
        self.seen = next(_clock)

    def shared(self):
        """Whether another live watch has started or run since this one started: their
        lines would mix in one log."""
        return any(other is not self and other.seen >= self.opened for other in _live)

    def name(self):
        """This watch's tag: its net's name, else 'solver#N' ('net#N'), N counting the
        watches of the process; '#N' also parts two watches of one net."""
        if self.tag is None:
            base = self.tag_of() if self.tag_of else None
            base = watch_lines.tag_text(base) if base else None
            taken = {other.tag for other in _live if other is not self}
            if base is None or base in taken:
                base = "%s#%d" % (base or self.kind, self.number)
            self.tag = base
        return self.tag

    def fault(self, fault, severity):
        """Keep and print ``fault`` (severity 'E' or 'W'); record it if it is the first."""
        self.faults.append(fault)
        key = fault.kind
        self.counts[key] += 1
        count = self.counts[key]
        o = self.options
        if count <= o.log_first or severity == "E" and fault.action == "stop":
            self.write(severity, fault.line())
        elif (count - o.log_first) % o.log_every == 0:
            self.write(severity, watch_lines.repeat_line(count, key, fault))
        if self.listener:
            self.listener(fault)
        if not self.recorded and o.record_dir and fault.kind != "growth":
            self._record(fault)

    def event(self, event):
        """Keep and print ``event`` (a skip, rollback, checkpoint, clip, lr change)."""
        self.events.append(event)
        self.counts[event.kind] += 1
        count = self.counts[event.kind]
        o = self.options
        warning = event.details.get("warning")
        if warning or event.kind in ("rollback", "lr") or count <= o.log_first or \
                (count - o.log_first) % o.log_every == 0:
            self.write("W" if warning or event.kind in ("skip", "rollback", "lr") else "I",
                       event.line())
        if self.listener:
            self.listener(event)

    def stop(self, fault):
        """Keep, print and record ``fault``, and raise :class:`NonFiniteError` with it."""
        self.faults.append(fault)
        self.counts[fault.kind] += 1
        self.write("E", fault.line())
        if self.listener:
            self.listener(fault)
        if not self.recorded and self.options.record_dir:
            self._record(fault)
        raise NonFiniteError(fault)

    def _record(self, fault):
        self.recorded = True
        record_dir = self.options.record_dir
        try:
            path = records.write_record(record_dir, self.iteration(), fault,
                                        self.probe.input_arrays(), self.probe.net)
        except Exception as exc:  # noqa: BLE001 - a record never kills a run
            self.write("W", watch_lines.record_failed_line(record_dir, exc))
            return
        self.record_path = path
        self.write("I", watch_lines.record_line(path))

    def write(self, severity, text):
        if len(_live) > 1 and self.shared():
            text = watch_lines.tagged(text, self.name())
        stream = self.stream or sys.stderr
        try:
            stream.write(reporting.glog_prefix(severity) + text + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed stream never hides the exception that follows
