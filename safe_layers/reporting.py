"""Fault reports shared by every layer: what went non-finite, where and when.

* :func:`inspect` turns a faulty array into a :class:`FaultReport` (exact counts, first
  bad element, statistics of the finite values).
* :class:`FaultLog` prints reports in a glog-like format so they read naturally inside
  Caffe's log, rate-limited: the first few in full, then a periodic summary, and a
  final summary when the process exits.
* :func:`write_flight_record` saves the offending arrays and the report (``.npz`` +
  ``.json``) so the batch can be replayed.
"""

import atexit
import datetime
import json
import os
import sys
import threading

import numpy

from safe_layers import context, host
from safe_layers.kernels import finite
from safe_layers.kernels.xp import to_numpy

PHASES = {0: "TRAIN", 1: "TEST"}


def phase_name(phase):
    """'TRAIN' or 'TEST' for a layer's ``self.phase``."""
    return PHASES.get(phase, str(phase))


def iteration(phase, call, iter_size=1):
    """The solver iteration of a layer's ``call``-th forward (or backward) in TRAIN.

    The solver runs forward+backward ``iter_size`` times per iteration; a TEST net has
    no iterations of its own, so this is None there. :mod:`safe_layers.context` knows
    the true iteration (a watched solver's ``iter``, or the iteration `caffe train
    -snapshot` resumed at) where the call count alone would be wrong.
    """
    if phase_name(phase) != "TRAIN":
        return None
    return context.train_iteration(call, iter_size)


def describe_layer(layer_type, layer, follows=None):
    """'NaNGuard conv1_guard (after conv1)': how every report line names its layer."""
    return "%s %s" % (layer_type, layer) + (" (after %s)" % follows if follows else "")


class FaultReport:
    """One fault: a blob with NaN/Inf (or values above a threshold) seen by a layer.

    Attributes (all plain Python values, see :meth:`as_dict`):
        layer_type, layer (the ``name`` param), follows (the layer it guards, or None),
        phase ('TRAIN'/'TEST'), pass_ ('forward data' / 'backward diff'), call (how many
        times this pass ran in this layer, counting from 1), iteration (the solver
        iteration that call belongs to, in TRAIN; None in TEST),
        blob_index, shape, nan, posinf, neginf, over, max_abs, first_index,
        first_value, finite_min, finite_max, finite_mean_abs, action.
    """

    FIELDS = ("layer_type", "layer", "follows", "phase", "pass_", "call", "iteration", "blob_index",
              "shape", "nan", "posinf", "neginf", "over", "max_abs", "first_index",
              "first_value", "finite_min", "finite_max", "finite_mean_abs", "action")

    def __init__(self, **values):
        missing = set(self.FIELDS) - set(values)
        if missing:
            raise TypeError("FaultReport needs %s" % ", ".join(sorted(missing)))
        for key in self.FIELDS:
            setattr(self, key, values[key])

    @property
    def where(self):
        return describe_layer(self.layer_type, self.layer, self.follows)

    def counts_text(self):
        text = "nan=%d +inf=%d -inf=%d" % (self.nan, self.posinf, self.neginf)
        if self.max_abs is not None:
            text += " over|%g|=%d" % (self.max_abs, self.over)
        return text

    def line(self):
        """The one-line form for logs."""
        first = ("first bad at %s = %s" % (list(self.first_index), _num(self.first_value))
                 if self.first_index is not None else "no bad element")
        stats = ("finite min=%s max=%s mean|x|=%s"
                 % (_num(self.finite_min), _num(self.finite_max), _num(self.finite_mean_abs))
                 if self.finite_min is not None else "no finite values")
        when = "call %d" % self.call
        if self.iteration is not None:
            when = "iteration %d (call %d)" % (self.iteration, self.call)
        return ("%s: non-finite %s in %s, %s, bottom[%d] shape %s: %s; %s; %s; action=%s"
                % (self.where, self.pass_, self.phase, when, self.blob_index,
                   "x".join(str(d) for d in self.shape), self.counts_text(), first, stats,
                   self.action))

    def as_dict(self):
        out = {key: getattr(self, key) for key in self.FIELDS}
        out["pass"] = out.pop("pass_")
        out["shape"] = list(self.shape)
        out["first_index"] = list(self.first_index) if self.first_index is not None else None
        return out

    def to_json(self):
        # NaN/Inf are not JSON; they appear as strings so any parser reads the record.
        return json.dumps({k: _jsonable(v) for k, v in self.as_dict().items()}, sort_keys=True)

    def __repr__(self):
        return "FaultReport(%s)" % self.line()


def _num(value):
    return "%.6g" % value if value is not None else "none"


def _jsonable(value):
    if isinstance(value, float) and not numpy.isfinite(value):
        return repr(value)
    return value


def inspect(array, max_abs=None, **context):
    """A FaultReport for ``array``, or None when it holds no fault after all.

    ``context`` supplies the FaultReport fields that describe where the array came from
    (layer_type, layer, follows, phase, pass_, call, blob_index, action).
    """
    counts = finite.count_faults(array, max_abs)
    if not any(counts.values()):
        return None  # the fast check's overflowing-sum false alarm
    first_index, first_value = finite.first_fault(array, max_abs)
    fmin, fmax, fmean = finite.finite_stats(array)
    return FaultReport(shape=tuple(int(d) for d in array.shape), max_abs=max_abs,
                       first_index=first_index, first_value=first_value, finite_min=fmin,
                       finite_max=fmax, finite_mean_abs=fmean, **counts, **context)


def glog_prefix(severity, now=None):
    """'W20261125 03:10:23.123456  4242 safe_layers] ': the shape of the lines glog 0.6
    (the one Caffe links here) writes, so our lines sort and read with Caffe's."""
    now = now or datetime.datetime.now()
    return "%s%s %s %5d safe_layers] " % (severity, now.strftime("%Y%m%d"),
                                           now.strftime("%H:%M:%S.%f"), os.getpid())


class FaultLog:
    """Rate-limited reporting for one layer instance.

    The first ``full`` faults are printed in full; after that one summary line every
    ``every`` faults; at process exit a final summary if any fault was seen. The reports
    are kept too: ``first``, ``last`` (FaultReports) and ``count``; :func:`fault_logs`
    finds the log of a layer by its name.
    """

    def __init__(self, layer_type, layer, follows=None, phase=None, full=5, every=100,
                 iter_size=1, stream=None):
        self.layer_type = layer_type
        self.layer = layer
        self.follows = follows
        self.phase = phase_name(phase) if phase is not None else None
        self.iter_size = iter_size
        self.where = describe_layer(layer_type, layer, follows)
        self.full = full
        self.every = every
        self.stream = stream
        self.count = 0
        self.totals = {"nan": 0, "posinf": 0, "neginf": 0, "over": 0}
        self.first = None
        self.last = None
        self._lock = threading.Lock()
        _live_logs.append(self)
        at_exit(self.final_summary)

    def _write(self, severity, text):
        stream = self.stream or sys.stderr
        stream.write(glog_prefix(severity) + text + "\n")
        stream.flush()

    @classmethod
    def for_layer(cls, layer_type, params, phase, every=100):
        """The log of a layer whose params include name, follows and reporting_fields()."""
        return cls(layer_type, params.name, params.follows, phase, full=params.log_first,
                   every=every, iter_size=params.iter_size)

    def check(self, array, pass_, call, action, blob_index=0, max_abs=None):
        """The fast check of ``array``; on a fault, its exact FaultReport (not yet recorded).

        ``call`` counts this pass in this layer from 1; the report turns it into the
        solver iteration (TRAIN) using the layer's ``iter_size``.
        """
        if finite.all_finite(array, max_abs):
            return None
        return inspect(array, max_abs, layer_type=self.layer_type, layer=self.layer,
                       follows=self.follows, phase=self.phase, pass_=pass_, call=call,
                       iteration=iteration(self.phase, call, self.iter_size),
                       blob_index=blob_index, action=action)

    def handle(self, report, action):
        """Abort for action 'abort' or 'error' (see :meth:`abort`), else record."""
        if action in ("abort", "error"):
            self.abort(report)
        self.record(report)

    def abort(self, report):
        """Print the full report, then raise FloatingPointError carrying it.

        Under `caffe train` the raise kills the process without a Python traceback
        unless Caffe was built WITH_PYTHON_LAYER, so the printed report must come first.
        """
        self.shout("ABORT " + report.line())
        self.shout("ABORT report: " + report.to_json())
        raise FloatingPointError(report.line())

    def record(self, report, severity="W"):
        """Count ``report`` and print it when the rate limit allows."""
        with self._lock:
            self.count += 1
            for key in self.totals:
                self.totals[key] += getattr(report, key)
            self.first = self.first or report
            self.last = report
            count = self.count
        if count <= self.full:
            suffix = " (further faults summarised every %d)" % self.every if count == self.full else ""
            self._write(severity, report.line() + suffix)
        elif (count - self.full) % self.every == 0:
            self._write(severity, self.summary())

    def shout(self, text):
        """Print unconditionally, as an error (an abort's full report)."""
        self._write("E", text)

    def warn(self, text):
        """Print unconditionally, as a warning."""
        self._write("W", text)

    def note(self, text):
        """Print unconditionally, as information (periodic statistics)."""
        self._write("I", text)

    def summary(self):
        t = self.totals
        text = ("%s: %d faults so far (nan=%d +inf=%d -inf=%d over=%d in total); first at %s call %d, "
                "latest at %s call %d"
                % (self.where, self.count, t["nan"], t["posinf"], t["neginf"], t["over"],
                   self.first.pass_, self.first.call, self.last.pass_, self.last.call))
        return text

    def final_summary(self):
        if self.count:
            self._write("W", "final summary: " + self.summary())


_live_logs = []


def fault_logs(layer=None, phase=None):
    """The FaultLogs of every layer built in this process (oldest first), optionally only
    those of the layer named ``layer`` and/or in ``phase`` ('TRAIN'/'TEST').

    pycaffe's ``net.layers[i]`` does not return the Python layer object, so this is how
    a pycaffe user (or a test) reads a layer's reports.
    """
    return [log for log in _live_logs
            if (layer is None or log.layer == layer) and (phase is None or log.phase == phase)]


def at_exit(summary):
    """Call ``summary()`` when the process exits (also inside the `caffe` binary)."""
    _exit_hooks.append(summary)


_exit_hooks = []


def clear_fault_logs():
    """Forget every FaultLog so far and the exit summaries registered with them: for
    long pycaffe sessions that build and drop many nets."""
    del _live_logs[:]
    del _exit_hooks[:]


def _final_summaries():
    for summary in _exit_hooks:
        try:
            summary()
        except Exception:  # noqa: BLE001 - never mask the real exit status
            pass


def _register_final_summaries():
    if host.caffe_cli_argv() is None:
        atexit.register(_final_summaries)
        return
    # The caffe binary never finalizes its embedded interpreter, so Python's atexit
    # hooks do not run there; a C-level exit hook does, while the interpreter is alive.
    import ctypes
    global _c_exit_hook
    _c_exit_hook = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p)(
        lambda status, arg: _final_summaries())
    ctypes.CDLL("libc.so.6").on_exit(_c_exit_hook, None)


_c_exit_hook = None
_register_final_summaries()


def write_flight_record(directory, stem, arrays, report, max_bytes):
    """Save ``arrays`` (name -> array) and ``report`` as ``stem.npz`` + ``stem.json``.

    Arrays are taken in order until ``max_bytes`` would be exceeded; the ones left out
    are listed in the JSON. Returns the paths written.
    """
    os.makedirs(directory, exist_ok=True)
    kept, skipped, used = {}, [], 0
    for name, array in arrays.items():
        host = to_numpy(array)
        if used + host.nbytes > max_bytes:
            skipped.append({"name": name, "shape": list(host.shape), "bytes": int(host.nbytes)})
            continue
        kept[name] = numpy.array(host, copy=True)
        used += host.nbytes
    npz_path = os.path.join(directory, stem + ".npz")
    json_path = os.path.join(directory, stem + ".json")
    numpy.savez_compressed(npz_path, **kept)
    record = {"report": json.loads(report.to_json()), "arrays": sorted(kept),
              "skipped_over_size_cap": skipped, "max_bytes": max_bytes}
    with open(json_path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    return npz_path, json_path
