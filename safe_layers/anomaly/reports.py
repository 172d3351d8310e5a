"""What a watch says: every report and event kept, counted and printed (in full for the
first few of each kind, then one summary line now and then), handed to the listener; the
first fault recorded; and :class:`NonFiniteError`, where the watch stops training."""

import collections
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


class Reports:
    """The reports of one watch: ``faults`` and ``events`` (oldest first), ``counts``
    (per kind), ``record_path`` (the record of the first fault, once written).

    Printed to ``stream`` (stderr when None): each kind in full ``log_first`` times, then
    one summary line every ``log_every``; a stop, a rollback and an lr change always.
    ``listener`` (read at each report, so it may be set later) gets every one."""

    def __init__(self, options, stream, listener, iteration, probe):
        self.options = options
        self.stream = stream
        self.listener = listener
        self.iteration = iteration  # callable -> the iteration a record is written for
        self.probe = probe          # the watched net's probe: the batch and net of a record
        self.faults, self.events = [], []
        self.counts = collections.Counter()
        self.recorded = False
        self.record_path = None

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
        if event.kind in ("rollback", "lr") or count <= o.log_first or \
                (count - o.log_first) % o.log_every == 0:
            self.write("W" if event.kind in ("skip", "rollback", "lr") else "I", event.line())
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
        stream = self.stream or sys.stderr
        try:
            stream.write(reporting.glog_prefix(severity) + text + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed stream never hides the exception that follows
