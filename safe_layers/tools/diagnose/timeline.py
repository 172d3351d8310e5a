"""When each line of a log was written, and the test outputs over iterations: what
``--format json`` and ``--plot`` show beside the training curves, in bounded memory.

Times are glog's: ``I1207 02:44:09.595819`` (glog < 0.6: no year) or
``I20261207 02:44:09.595819`` (glog 0.6). A 4-digit date takes its year as Caffe's
``tools/extra/extract_seconds.py`` does (the log file's ctime, extract_seconds.py:22-28)
and moves to the next year when the month goes back (parse_log.py:59-62).
"""

import datetime
import os

from safe_layers.tools.diagnose.series import Series, finite


def log_year(path):
    """The year a 4-digit glog date belongs to: the year of the file's ctime (standard
    input: this year)."""
    if path == "-":
        return datetime.datetime.now().year
    try:
        return datetime.datetime.fromtimestamp(os.path.getctime(path)).year
    except (OSError, ValueError, TypeError):
        return datetime.datetime.now().year


class LogClock:
    """glog stamps to datetimes, the year carried across a 4-digit log's new year."""

    def __init__(self, year):
        self.year = year
        self.last_month = None

    def time(self, stamp):
        """The datetime of ``stamp`` (an event's (date, time) texts), None without one or
        for a date that is no date."""
        if stamp is None:
            return None
        date, clock = stamp
        try:
            if len(date) == 8:
                year, month, day = int(date[:4]), int(date[4:6]), int(date[6:])
            else:
                month, day = int(date[:2]), int(date[2:])
                if self.last_month is not None and month < self.last_month:
                    self.year += 1
                self.last_month = month
                year = self.year
            hours, minutes, seconds = clock[:8].split(":")
            return datetime.datetime(year, month, day, int(hours), int(minutes), int(seconds),
                                     int(clock[9:]))
        except ValueError:
            return None


def is_start(event):
    """The line parse_log.py counts Seconds from: the first holding 'Solving'
    (extract_seconds.py:38), BVLC's `Solving NAME` or NVCaffe 0.17.4's `[0] Solving NAME
    Learning Rate Policy: P`."""
    return event.kind == "solving" or (event.kind == "policy" and "Solving" in (event.text or ""))


class Timeline:
    """One run's seconds since its start (at each ``Iteration N, loss`` line) and test
    outputs per name, each a bounded :class:`Series`; the test passes where an accuracy
    was printed beside a non-finite loss."""

    def __init__(self, clock):
        self.clock = clock
        self.start = None            # datetime the run started (its `Solving` line, else its first stamp)
        self.started_by_solving = False
        self.seconds = Series()      # (iteration, seconds since start)
        self.tests = {}              # "name" or "name (#k)" -> Series of (iteration, value)
        self.test_weights = {}       # name -> loss weight (None: not a loss)
        self.false_accuracies = []   # (iteration, name, value), the first FALSE_ACCURACIES_KEPT
        self.test_iteration = None
        self.test_net = 0
        self._pass = None            # the open test pass: {"bad_loss": bool, "accuracies": [...]}

    FALSE_ACCURACIES_KEPT = 2048
    MAX_TEST_OUTPUTS = 64

    def feed(self, event):
        when = self.clock.time(event.stamp) if event.stamp is not None else None
        if is_start(event) and not self.started_by_solving and when is not None:
            self.start, self.started_by_solving = when, True
        elif self.start is None and when is not None:
            self.start = when
        kind = event.kind
        if kind == "loss":
            self._close_pass()
            if when is not None and self.start is not None:
                self.seconds.add(event.iteration, (when - self.start).total_seconds())
        elif kind == "testing":
            self._close_pass()
            self.test_iteration, self.test_net = event.iteration, event.net
            self._pass = {"bad_loss": False, "accuracies": []}
        elif kind == "output" and event.phase == "TEST" and self.test_iteration is not None:
            self._test_output(event)

    def _test_output(self, event):
        name = event.name if not self.test_net else "%s (#%d)" % (event.name, self.test_net)
        series = self.tests.get(name)
        if series is None:
            if len(self.tests) >= self.MAX_TEST_OUTPUTS:
                return
            series = self.tests[name] = Series()
            self.test_weights[name] = event.weight
        series.add(self.test_iteration, event.value)
        if self._pass is None:
            return
        if event.weight:
            self._pass["bad_loss"] |= not finite(event.value)
        elif "acc" in event.name.lower():
            self._pass["accuracies"].append((self.test_iteration, name, event.value))

    def _close_pass(self):
        """A test pass with a non-finite loss: its accuracies are not accuracies
        (AccuracyLayer::Forward_cpu, accuracy_layer.cpp:57: a NaN score beats no other)."""
        block, self._pass = self._pass, None
        if block and block["bad_loss"] and len(self.false_accuracies) < self.FALSE_ACCURACIES_KEPT:
            self.false_accuracies.extend(block["accuracies"])

    def finish(self):
        self._close_pass()

    def as_json(self):
        return {"start_time": self.start.isoformat() if self.start is not None else None,
                "seconds": self.seconds.points,
                "test_outputs": {name: s.points for name, s in self.tests.items()}}
