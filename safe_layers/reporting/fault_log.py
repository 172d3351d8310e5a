"""One layer's log of its faults (FaultLog): printed rate-limited, counted, escalated to abort.

:class:`FaultLog` prints reports in glog's line shape, so they sort and read with Caffe's
own lines: the first few in full, then a periodic summary, and a final summary when the
layer's net is released or the process exits. It escalates a repairing action to ``abort``
after ``escalate_after`` consecutive faulty calls, counts repairs, and owns the layer's
flight recorder. :func:`iteration` turns a layer's call count into the solver iteration
every report names.
"""

import contextlib
import sys
import threading

from safe_layers.core import deferred, solver_iteration
from safe_layers.kernels import finite
from safe_layers.reporting.array_faults import PendingFault, inspect
from safe_layers.reporting.glog import glog_prefix
from safe_layers.reporting.live_layers import LIVE
from safe_layers.reporting.report_lines import FaultSummary, RecordFailure, Subject


PHASES = {0: "TRAIN", 1: "TEST"}

# The actions that change the data and let training go on: they can hide a dead net, so
# they are the ones escalated to abort (see FaultLog.resolve_action).
REPAIRS = ("clamp", "zero")


def phase_name(phase):
    """'TRAIN' or 'TEST' for a layer's ``self.phase``."""
    return PHASES.get(phase, str(phase))


def iteration(phase, call, iter_size=1):
    """The solver iteration of a layer's ``call``-th forward (or backward) in TRAIN.

    Every layer computes the iteration in its reports through this one function.
    The solver runs forward+backward ``iter_size`` times per iteration; a TEST net has
    no iterations of its own, so this is None there. :mod:`safe_layers.core.solver_iteration` knows
    the true iteration (a watched solver's ``iter``, or the iteration `caffe train
    -snapshot` resumed at) where the call count alone would be wrong.
    """
    if phase_name(phase) != "TRAIN":
        return None
    return solver_iteration.train_iteration(call, iter_size)


# ---- the log of one layer ------------------------------------------------------------------------

class _Replays(threading.local):
    depth = 0  # replays (safe_layers.anomaly.replay_fault) running on this thread


_replays = _Replays()


@contextlib.contextmanager
def replaying():
    """While a watch runs an iteration again to name its producer: our layers act as they
    did when it ran (a repair repairs again, so the replay computes what the iteration
    computed) but count, print and record nothing and raise no abort: the iteration's
    reports were made when it ran, and a second would double every count."""
    _replays.depth += 1
    try:
        yield
    finally:
        _replays.depth -= 1


def is_replaying():
    return _replays.depth > 0


class FaultAbort(FloatingPointError):
    """A layer stopped training on a fault; ``.report`` is its :class:`FaultReport`."""

    def __init__(self, report):
        super().__init__(report.line())
        self.report = report


class FaultLog:
    """Rate-limited reporting for one layer instance.

    The first ``full`` faults are printed in full; after that one summary line every
    ``every`` faults; a final summary when the layer's net is released or the process
    exits, if any fault was seen. The reports are kept too: ``first``, ``last``
    (FaultReports), ``count``, ``repaired``; :func:`fault_logs` finds the logs of live layers.

    ``escalate_after`` (0: never) turns a repairing action into ``abort`` once that many
    consecutive calls of one pass were faulty: a repair that keeps being needed means
    the net is dead, and going on would only hide it.
    """

    def __init__(self, layer_type, layer, follows=None, phase="TRAIN", full=5, every=100,
                 iter_size=1, escalate_after=0, stream=None):
        self.layer_type = layer_type
        self.layer = layer
        self.follows = follows
        self.phase = phase_name(phase)
        self.iter_size = iter_size
        self.full = full
        self.every = every
        self.escalate_after = escalate_after
        self.stream = stream
        self.recorder = None
        self.net = None  # the number of the net this layer was built in (LiveLayers.register)
        self.board = deferred.Board()  # its net's board once registered (for_layer)
        self._calls = None  # (board, {pass kind: its call context}), made once
        self._final_hooks = []
        self._lock = threading.Lock()
        self.clear()

    @property
    def subject(self):
        return Subject(self.layer_type, self.layer, self.follows, self.phase)

    @property
    def where(self):
        return self.subject.text()

    def clear(self):
        """Forget every fault so far (counts, reports, streaks)."""
        self.count = 0
        self.repaired = 0
        self.totals = {"nan": 0, "posinf": 0, "neginf": 0, "over": 0}
        self.first = None
        self.last = None
        self.final_printed = False
        self._streaks = {}

    @classmethod
    def for_layer(cls, owner, layer_type, params, every=100):
        """The log of the Caffe layer ``owner`` (its params include name, follows and
        reporting_fields()), registered so that :func:`fault_logs` finds it and its final
        summary is printed. Unnamed layers get distinct names (``#1``, ``#2``, ...)."""
        phase = phase_name(owner.phase)
        name = LIVE.name_for(layer_type, params.name, phase)
        log = cls(layer_type, name, params.follows, phase, full=params.log_first, every=every,
                  iter_size=params.iter_size, escalate_after=getattr(params, "escalate_after", 0))
        LIVE.register(owner, log)
        log.board = deferred.BOARDS.for_net(log.net)
        return log

    def on_final(self, hook):
        """Call ``hook()`` after this log's final summary (a layer's own statistics)."""
        self._final_hooks.append(hook)

    def _write(self, severity, text):
        if _replays.depth:
            return  # said when the iteration ran (a once-only warning included)
        stream = self.stream or sys.stderr
        stream.write(glog_prefix(severity) + text + "\n")
        stream.flush()

    def check(self, array, pass_, call, action, blob_index=0, max_abs=None, blob="bottom",
              fast=None):
        """The fast check of ``array``; on a fault, its exact FaultReport (not yet recorded).

        ``call`` counts this pass in this layer from 1; the report turns it into the
        solver iteration (TRAIN) with :func:`iteration`. ``fast``: the fast check's answer
        when the caller has it already (a layer whose own sums tell it), else None.
        """
        LIVE.mark_running()
        if fast if fast is not None else finite.all_finite(array, max_abs):
            return None
        return inspect(array, max_abs, **self.context(pass_, call, action, blob_index, blob))

    def running(self, kind):
        """Around the layer's forward (``kind`` 'forward') or backward: its net's board
        follows the passes and reads its deferred checks where a pass ends
        (``safe_layers.core.deferred``); a read may raise an earlier layer's abort."""
        calls = self._calls
        if calls is None or calls[0] is not self.board:
            calls = self._calls = (self.board, {k: self.board.call(self, k) for k in deferred.PASSES})
        return calls[1][kind]

    def defer(self, array, pass_, call, action, blob_index=0, max_abs=None, blob="bottom",
              always=False, detail=None, skip=None):
        """The check of :meth:`check`, deferred: the fault statistics of ``array`` go into
        a row of the board on the array's device, no host read; the report (if any) is
        made and handled when the board is read. Returns the row, for repairs that depend
        on it (``finite.clamp_flagged_``) and for the layer's own columns (from
        ``finite.EXTRA``). ``detail`` / ``skip``: see PendingFault; with ``always`` or a
        ``detail`` the statistics of a clean array are kept too."""
        LIVE.mark_running()
        entry = PendingFault(self, tuple(array.shape), max_abs,
                             self.context(pass_, call, action, blob_index, blob), detail, skip)
        row = self.board.add(entry, self, pass_.split()[0], array)
        return finite.fault_stats(array, row, max_abs, always=always or detail is not None)

    def context(self, pass_, call, action, blob_index=0, blob="bottom"):
        """The FaultReport fields that say where and when (for :func:`inspect`)."""
        return dict(layer_type=self.layer_type, layer=self.layer, follows=self.follows,
                    phase=self.phase, pass_=pass_, call=call,
                    iteration=iteration(self.phase, call, self.iter_size), blob=blob,
                    blob_index=blob_index, action=action)

    def resolve_action(self, report):
        """The action to take on ``report``: its own, or 'abort' when a repair has been
        needed for ``escalate_after`` consecutive calls of this pass (then the report says so)."""
        with self._lock:
            last_call, streak = self._streaks.get(report.pass_, (None, 0))
            if report.call != last_call:  # several blobs of one call are one faulty call
                streak = streak + 1 if last_call is not None and report.call == last_call + 1 else 1
                self._streaks[report.pass_] = (report.call, streak)
        if report.action in REPAIRS and self.escalate_after and streak >= self.escalate_after:
            report.escalated_from, report.escalated_after = report.action, streak
            report.action = "abort"
        return report.action

    def report(self, report, arrays=None):
        """Count and print ``report`` first, then write the flight record (if the layer has
        one and ``arrays`` are given). An 'abort' prints the full report and its JSON; the
        caller then raises :meth:`abort_error`. A failure to record never raises."""
        if report.action == "abort":
            self._count(report)
            self.shout("ABORT " + report.line())
            self.shout("ABORT report: " + report.to_json())
            if report.escalated_from:
                self.error("%s was needed on %d calls in a row: the net is dead (or the fault is "
                           "built into it and repairing it is meant: then say escalate_after: 0)"
                           % (report.escalated_from, report.escalated_after))
        else:
            self.record(report)
        if self.recorder is not None and arrays is not None:
            self.recorder.record(report, arrays)

    def handle(self, report, arrays=None):
        """:meth:`resolve_action`, :meth:`report`, and raise for 'abort'/'error'. Returns the
        action to carry out (a repair, or 'warn')."""
        if _replays.depth:
            return "warn" if report.action in ("abort", "error") else report.action
        action = self.resolve_action(report)
        if action == "error":
            report.action = action = "abort"
        self.report(report, arrays)
        if action == "abort":
            raise self.abort_error(report)
        return action

    def abort_error(self, report):
        """The exception an abort raises: FloatingPointError carrying ``.report``.

        Under `caffe train` the raise kills the process (a Python traceback only where
        Caffe was built WITH_PYTHON_LAYER), so the printed report must come first."""
        return FaultAbort(report)

    def _count(self, report):
        with self._lock:
            self.count += 1
            if report.action in REPAIRS:
                self.repaired += 1
            for key in self.totals:
                self.totals[key] += getattr(report, key)
            self.first = self.first or report
            self.last = report
            return self.count

    def record(self, report, severity="W"):
        """Count ``report`` and print it when the rate limit allows."""
        count = self._count(report)
        if count <= self.full:
            suffix = " (further faults summarised every %d)" % self.every if count == self.full else ""
            self._write(severity, report.line() + suffix)
        elif (count - self.full) % self.every == 0:
            self._write(severity, self.summary())

    def record_failure(self, directory, action, error):
        """Say once that a flight record could not be written (the fault stands as reported)."""
        self.warn_text(RecordFailure(subject=self.subject, directory=directory, action=action,
                                     error=error).text())

    def shout(self, text):
        """Print unconditionally, as an error (an abort's full report)."""
        self._write("E", text)

    def warn_text(self, text):
        self._write("W", text)

    def warn(self, message):
        """Print ``SUBJECT: message`` unconditionally, as a warning."""
        self._write("W", "%s: %s" % (self.where, message))

    def error(self, message):
        """Print ``SUBJECT: message`` as an error (before a raise that the `caffe` binary may
        not show) and return the message with its subject, for the exception."""
        text = "%s: %s" % (self.where, message)
        self._write("E", text)
        return text

    def note(self, text):
        """Print unconditionally, as information (periodic statistics)."""
        self._write("I", text)

    def fault_summary(self):
        """The :class:`FaultSummary` of the faults so far (None before the first)."""
        if not self.count:
            return None
        t = self.totals
        return FaultSummary(subject=self.subject, count=self.count, repaired=self.repaired,
                            nan=t["nan"], posinf=t["posinf"], neginf=t["neginf"], over=t["over"],
                            first_pass=self.first.pass_, first_when=self.first.when,
                            latest_pass=self.last.pass_, latest_when=self.last.when)

    def summary(self):
        return self.fault_summary().text()

    def final_summary(self):
        """Print the final summary (once) if there were faults, then the layer's own."""
        if self.final_printed:
            return
        self.final_printed = True
        if self.count:
            self._write("W", "final summary: " + self.summary())
        for hook in self._final_hooks:
            hook()
