"""Fault reports shared by every layer: what went wrong, where and when; written AND read here.

One format, one owner: every line our layers print is made by this module, and
:func:`parse_line` reads each of them back. Tools that read Caffe logs (``safe-layers
diagnose``) call the parser instead of copying its regular expressions.

Writing
-------
* :func:`inspect` turns a faulty array into a :class:`FaultReport` (exact counts, first bad
  element, statistics of the finite values).
* :class:`FaultLog` (one per layer) prints reports in glog's line shape, so they sort and
  read with Caffe's own lines; rate-limited: the first few in full, then a periodic
  summary, and a final summary when the layer's net is released or the process exits.
  It escalates a repairing action to ``abort`` after ``escalate_after`` consecutive faulty
  calls, counts repairs, and owns the layer's :class:`FlightRecorder`.
* :func:`fault_logs` / :func:`clear_fault_logs` find (or clear) the logs of live layers,
  by layer name, phase and net.

Line kinds (the message after the glog prefix ``W20261125 03:10:23.123456  4242 safe_layers] ``;
``SUBJECT`` is ``<LayerType> <name>[ (after <follows>)] in <PHASE>``, see :class:`Subject`):

==================  =============================================================================
``fault``           ``SUBJECT: non-finite forward data, iteration 3 (call 4), bottom[0] shape 2x3:
                    nan=1 +inf=0 -inf=1; first bad at [1, 1] = nan; finite min=0 max=1.3862944
                    mean|x|=0.5; action=clamp`` (``out-of-range`` when only values over
                    ``max_abs`` are at fault; an optional ``; <detail>`` before ``action``; an
                    optional `` (escalated from clamp after 10 consecutive faulty calls)`` after it
                    and `` (further faults summarised every 100)`` at the end)
``abort``           ``ABORT <fault line>``
``abort_report``    ``ABORT report: {json}`` (:meth:`FaultReport.to_json`)
``summary``         ``SUBJECT: 8 faults so far (8 repaired; nan=30 +inf=0 -inf=0 over=0 in total);
                    first at forward data iteration 0 (call 1), latest at forward data iteration 7
                    (call 8)``
``final_summary``   ``final summary: <summary>``
``statistics``      ``SUBJECT: backward call 4: clipped 2 of the last 3 calls (3 of 4 in all); L2 norm
                    over the last 3 calls min=0.1 median=2 max=3`` (GradientClip)
``final_statistics`` ``final summary: <statistics>``
``record_failure``  ``SUBJECT: flight record not written to 'dumps' (reported once; the fault's
                    action=abort goes ahead): PermissionError: ...``
``notice``          ``SUBJECT: <any other message>`` (warnings and errors of a layer)
``watch``           ``WATCH ...``: a watch's line (:mod:`safe_layers.reporting.watch_lines` owns its
                    format); ``ReportLine.watch`` is the dict its parser returns
``other``           a ``safe_layers]`` line without a subject (kept, never dropped)
==================  =============================================================================

Reading (API kept stable for the tools)
---------------------------------------
* ``parse_line(line) -> ReportLine | None``: one line of a log (with or without the glog
  prefix, 8- or 4-digit glog date); None when the line is not one of ours.
  :class:`ReportLine` has ``kind`` (above), ``severity`` ('I', 'W', 'E' or None), ``time``
  (the prefix's date and time text or None), ``pid``, ``subject`` (:class:`Subject` or
  None), ``message`` (the text after the subject), and per kind ``report``
  (:class:`FaultReport`: fault, abort, abort_report), ``summary`` (:class:`FaultSummary`),
  ``statistics`` (:class:`ClipStatistics`), ``failure`` (:class:`RecordFailure`), ``watch``
  (a dict, for WATCH lines).
* ``FaultReport.from_line(text)`` / ``FaultReport.from_json(text)``: a report back from its
  line (glog prefix and ``ABORT`` allowed) or from its JSON.
* Every printed number reads back exactly: data values are float32 and print as the
  shortest text that reads back as the same float32 (``max_abs`` as the shortest Python
  float text).
"""

import ast
import atexit
import datetime
import json
import os
import re
import sys
import tempfile
import threading
import weakref
import zlib

import numpy

from safe_layers.core import solver_iteration, deferred, caffe_process
from safe_layers.kernels import finite
from safe_layers.kernels.xp import array_module, to_numpy

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


# ---- numbers: printed so that they read back exactly -------------------------------------

def format_value(value):
    """A data value (float32) as the shortest text that reads back as the same float32."""
    if value is None:
        return "none"
    text = str(numpy.float32(value))
    return text[:-2] if text.endswith(".0") else text


def format_param(value):
    """A parameter (a Python float) as the shortest text that reads back as the same float."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def as_float32(value):
    """``value`` rounded to float32, as a Python float (None stays None)."""
    return None if value is None else float(numpy.float32(value))


def _read_value(text):
    """The float32 value :func:`format_value` printed."""
    return None if text == "none" else as_float32(float(text))


# ---- the subject of every line ------------------------------------------------------------

class Subject:
    """Who speaks in a line: ``<LayerType> <name>[ (after <follows>)] in <PHASE>``."""

    PATTERN = re.compile(r"(?P<layer_type>[A-Za-z_]\w*) (?P<layer>.+?)"
                         r"(?: \(after (?P<follows>.+?)\))? in (?P<phase>[A-Z]+|-?\d+): ")

    def __init__(self, layer_type, layer, follows, phase):
        self.layer_type, self.layer, self.follows, self.phase = layer_type, layer, follows, phase

    def text(self):
        return ("%s %s" % (self.layer_type, self.layer)
                + (" (after %s)" % self.follows if self.follows else "") + " in %s" % self.phase)

    @classmethod
    def split(cls, message):
        """(Subject, rest of the message) or (None, message)."""
        match = cls.PATTERN.match(message)
        if not match:
            return None, message
        return cls(**match.groupdict()), message[match.end():]

    def __eq__(self, other):
        return isinstance(other, Subject) and vars(self) == vars(other)

    def __repr__(self):
        return "Subject(%r)" % self.text()


# ---- one fault -------------------------------------------------------------------------------

class _Fields:
    """A record of ``FIELDS``, built from keywords and equal to another of its class when
    every field is (a NaN read back equals the NaN written)."""

    FIELDS = ()

    def __init__(self, **values):
        for key in self.FIELDS:
            setattr(self, key, values[key])

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return all(_same(getattr(self, k), getattr(other, k)) for k in self.FIELDS)

    __hash__ = None


class FaultReport(_Fields):
    """One fault: a blob with NaN/Inf, or values over ``max_abs``, seen by a layer.

    Attributes (plain Python values; :meth:`as_dict`):
        layer_type, layer (the name reports use), follows (or None), phase ('TRAIN'/'TEST'),
        pass_ ('forward data' / 'backward diff'), call (how many times this pass ran in this
        layer, from 1), iteration (the solver iteration of that call in TRAIN, None in TEST),
        blob ('bottom' / 'top'), blob_index, shape, nan, posinf, neginf, over (finite values
        over max_abs), max_abs (or None), first_index, first_value, finite_min, finite_max,
        finite_mean_abs (float32 values; None where there is none), detail (a sentence for
        faults the counts do not tell, or None), action (what was done), escalated_from
        (the repair that was escalated to abort, or None), escalated_after (the number of
        consecutive faulty calls that escalated it, or None).
    """

    FIELDS = ("layer_type", "layer", "follows", "phase", "pass_", "call", "iteration", "blob",
              "blob_index", "shape", "nan", "posinf", "neginf", "over", "max_abs", "first_index",
              "first_value", "finite_min", "finite_max", "finite_mean_abs", "detail", "action",
              "escalated_from", "escalated_after")
    OPTIONAL = {"blob": "bottom", "detail": None, "escalated_from": None, "escalated_after": None}

    def __init__(self, **values):
        values = dict(self.OPTIONAL, **values)
        missing = set(self.FIELDS) - set(values)
        unknown = set(values) - set(self.FIELDS)
        if missing or unknown:
            raise TypeError("FaultReport needs %s%s" % (", ".join(sorted(missing)) or "no more fields",
                                                         "; unknown: " + ", ".join(sorted(unknown))
                                                         if unknown else ""))
        super().__init__(**values)

    @property
    def subject(self):
        return Subject(self.layer_type, self.layer, self.follows, self.phase)

    @property
    def where(self):
        return self.subject.text()

    @property
    def kind(self):
        """'non-finite' when NaN/Inf are among the faults, else 'out-of-range'."""
        return "non-finite" if (self.nan or self.posinf or self.neginf) else "out-of-range"

    @property
    def when(self):
        if self.iteration is not None:
            return "iteration %d (call %d)" % (self.iteration, self.call)
        return "call %d" % self.call

    def counts_text(self):
        text = "nan=%d +inf=%d -inf=%d" % (self.nan, self.posinf, self.neginf)
        if self.max_abs is not None:
            text += " over|%s|=%d" % (format_param(self.max_abs), self.over)
        return text

    def line(self):
        """The one-line form for logs (without the glog prefix)."""
        first = ("first bad at %s = %s" % (list(self.first_index), format_value(self.first_value))
                 if self.first_index is not None else "no bad element")
        stats = ("finite min=%s max=%s mean|x|=%s"
                 % (format_value(self.finite_min), format_value(self.finite_max),
                    format_value(self.finite_mean_abs))
                 if self.finite_min is not None else "no finite values")
        shape = "x".join(str(d) for d in self.shape) or "scalar"
        detail = "; %s" % self.detail if self.detail else ""
        escalated = (" (escalated from %s after %d consecutive faulty calls)"
                     % (self.escalated_from, self.escalated_after) if self.escalated_from else "")
        return ("%s: %s %s, %s, %s[%d] shape %s: %s; %s; %s%s; action=%s%s"
                % (self.where, self.kind, self.pass_, self.when, self.blob, self.blob_index, shape,
                   self.counts_text(), first, stats, detail, self.action, escalated))

    _BODY = re.compile(
        r"(?P<kind>non-finite|out-of-range) (?P<pass_>\w+ \w+), "
        r"(?:iteration (?P<iteration>-?\d+) \(call (?P<call_it>\d+)\)|call (?P<call>\d+)), "
        r"(?P<blob>bottom|top)\[(?P<blob_index>\d+)\] shape (?P<shape>scalar|\d+(?:x\d+)*): "
        r"nan=(?P<nan>\d+) \+inf=(?P<posinf>\d+) -inf=(?P<neginf>\d+)"
        r"(?: over\|(?P<max_abs>[^|]+)\|=(?P<over>\d+))?; "
        r"(?:first bad at \[(?P<first_index>[-\d, ]*)\] = (?P<first_value>\S+)|no bad element); "
        r"(?:finite min=(?P<fmin>\S+) max=(?P<fmax>\S+) mean\|x\|=(?P<fmean>\S+)|no finite values)"
        r"(?:; (?P<detail>.*?))?; action=(?P<action>\w+)"
        r"(?: \(escalated from (?P<escalated_from>\w+) after (?P<escalated_after>\d+) "
        r"consecutive faulty calls\))?"
        r"(?: \(further faults summarised every (?P<every>\d+)\))?$")

    @classmethod
    def from_line(cls, text):
        """The FaultReport a fault line describes (glog prefix and 'ABORT ' allowed).

        Raises ValueError when ``text`` is not a fault line."""
        parsed = parse_line(text)
        if parsed is None or parsed.report is None:
            raise ValueError("not a safe_layers fault line: %r" % (text,))
        return parsed.report

    @classmethod
    def _from_body(cls, subject, body):
        m = cls._BODY.match(body)
        if not m:
            return None
        g = m.groupdict()
        first_index = (tuple(int(i) for i in g["first_index"].split(",") if i.strip())
                       if g["first_index"] is not None else None)
        shape = () if g["shape"] == "scalar" else tuple(int(d) for d in g["shape"].split("x"))
        call = int(g["call_it"] or g["call"])
        report = cls(
            layer_type=subject.layer_type, layer=subject.layer, follows=subject.follows,
            phase=subject.phase, pass_=g["pass_"], call=call,
            iteration=int(g["iteration"]) if g["iteration"] is not None else None,
            blob=g["blob"], blob_index=int(g["blob_index"]), shape=shape, nan=int(g["nan"]),
            posinf=int(g["posinf"]), neginf=int(g["neginf"]), over=int(g["over"] or 0),
            max_abs=float(g["max_abs"]) if g["max_abs"] is not None else None,
            first_index=first_index,
            first_value=_read_value(g["first_value"]) if g["first_value"] is not None else None,
            finite_min=_read_value(g["fmin"]) if g["fmin"] is not None else None,
            finite_max=_read_value(g["fmax"]) if g["fmax"] is not None else None,
            finite_mean_abs=_read_value(g["fmean"]) if g["fmean"] is not None else None,
            detail=g["detail"], action=g["action"], escalated_from=g["escalated_from"],
            escalated_after=int(g["escalated_after"]) if g["escalated_after"] else None)
        return report

    def as_dict(self):
        out = {key: getattr(self, key) for key in self.FIELDS}
        out["pass"] = out.pop("pass_")
        out["shape"] = list(self.shape)
        out["first_index"] = list(self.first_index) if self.first_index is not None else None
        return out

    def to_json(self):
        # NaN/Inf are not JSON; they appear as strings so any parser reads the record.
        return json.dumps({k: _jsonable(v) for k, v in self.as_dict().items()}, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        """The FaultReport of :meth:`to_json`'s text."""
        raw = json.loads(text) if isinstance(text, str) else dict(text)
        raw["pass_"] = raw.pop("pass")
        raw["shape"] = tuple(raw["shape"])
        if raw.get("first_index") is not None:
            raw["first_index"] = tuple(raw["first_index"])
        for key in ("first_value", "finite_min", "finite_max", "finite_mean_abs", "max_abs"):
            if isinstance(raw.get(key), str):
                raw[key] = float(raw[key])
        return cls(**raw)

    def __repr__(self):
        return "FaultReport(%s)" % self.line()


def _same(a, b):
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # NaN values read back as NaN
    return a == b


def _jsonable(value):
    if isinstance(value, float) and not numpy.isfinite(value):
        return repr(value)
    return value


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


# ---- the other line kinds --------------------------------------------------------------------

_WHEN = r"iteration -?\d+ \(call \d+\)|call \d+"


class FaultSummary(_Fields):
    """The running totals of one FaultLog, as its periodic and final summary lines say them."""

    FIELDS = ("subject", "count", "repaired", "nan", "posinf", "neginf", "over", "first_pass",
              "first_when", "latest_pass", "latest_when")
    _BODY = re.compile(r"(?P<count>\d+) faults? so far \((?P<repaired>\d+) repaired; nan=(?P<nan>\d+) "
                       r"\+inf=(?P<posinf>\d+) -inf=(?P<neginf>\d+) over=(?P<over>\d+) in total\); "
                       r"first at (?P<first_pass>\w+ \w+) (?P<first_when>%s), "
                       r"latest at (?P<latest_pass>\w+ \w+) (?P<latest_when>%s)$" % (_WHEN, _WHEN))

    def text(self):
        return ("%s: %d fault%s so far (%d repaired; nan=%d +inf=%d -inf=%d over=%d in total); "
                "first at %s %s, latest at %s %s"
                % (self.subject.text(), self.count, "" if self.count == 1 else "s", self.repaired,
                   self.nan, self.posinf, self.neginf, self.over, self.first_pass, self.first_when,
                   self.latest_pass, self.latest_when))

    @classmethod
    def _from_body(cls, subject, body):
        m = cls._BODY.match(body)
        if not m:
            return None
        g = m.groupdict()
        ints = {k: int(g[k]) for k in ("count", "repaired", "nan", "posinf", "neginf", "over")}
        return cls(subject=subject, first_pass=g["first_pass"], first_when=g["first_when"],
                   latest_pass=g["latest_pass"], latest_when=g["latest_when"], **ints)


class ClipStatistics(_Fields):
    """How often a GradientClip clipped, and the norms over its last calls (its statistics line)."""

    FIELDS = ("subject", "calls", "recent_clipped", "window", "total_clipped", "norm_window",
              "norm_min", "norm_median", "norm_max")
    _BODY = re.compile(r"backward call (?P<calls>\d+): clipped (?P<recent_clipped>\d+) of the last "
                       r"(?P<window>\d+) calls \((?P<total_clipped>\d+) of \d+ in all\); L2 norm over "
                       r"the last (?P<norm_window>\d+) calls min=(?P<norm_min>\S+) "
                       r"median=(?P<norm_median>\S+) max=(?P<norm_max>\S+)$")

    def text(self):
        return ("%s: backward call %d: clipped %d of the last %d calls (%d of %d in all); "
                "L2 norm over the last %d calls min=%s median=%s max=%s"
                % (self.subject.text(), self.calls, self.recent_clipped, self.window,
                   self.total_clipped, self.calls, self.norm_window, format_param(self.norm_min),
                   format_param(self.norm_median), format_param(self.norm_max)))

    @classmethod
    def _from_body(cls, subject, body):
        m = cls._BODY.match(body)
        if not m:
            return None
        g = m.groupdict()
        return cls(subject=subject, **{k: (float(v) if k.startswith("norm_m") else int(v))
                                        for k, v in g.items()})


class RecordFailure(_Fields):
    """A flight record that could not be written: said once per layer, never raised."""

    FIELDS = ("subject", "directory", "action", "error")
    _BODY = re.compile(r"flight record not written to (?P<directory>'.*?'|\".*?\") \(reported once; "
                       r"the fault's action=(?P<action>\w+) goes ahead\): (?P<error>.*)$")

    def text(self):
        return ("%s: flight record not written to %r (reported once; the fault's action=%s goes "
                "ahead): %s" % (self.subject.text(), self.directory, self.action, self.error))

    @classmethod
    def _from_body(cls, subject, body):
        m = cls._BODY.match(body)
        if not m:
            return None
        return cls(subject=subject, directory=ast.literal_eval(m.group("directory")),
                   action=m.group("action"), error=m.group("error"))


# ---- reading lines back ------------------------------------------------------------------------

class ReportLine:
    """One parsed line; see the module docstring for ``kind`` and the per-kind attributes."""

    def __init__(self, kind, message, severity=None, time=None, pid=None, subject=None,
                 report=None, summary=None, statistics=None, failure=None, summarised_every=None,
                 watch=None):
        self.kind = kind
        self.message = message
        self.severity = severity
        self.time = time
        self.pid = pid
        self.subject = subject
        self.report = report
        self.summary = summary
        self.statistics = statistics
        self.failure = failure
        self.summarised_every = summarised_every
        self.watch = watch

    def __repr__(self):
        return "ReportLine(%s, %r)" % (self.kind, self.message)


# glog 0.6 writes an 8-digit date (I20261125), older glog 4 digits (I1125); both are read.
_GLOG = re.compile(r"^(?P<severity>[IWEF])(?P<time>\d{4}(?:\d{4})? \d\d:\d\d:\d\d\.\d{6}) +"
                   r"(?P<pid>\d+) (?P<source>[^\]\s]+)\] (?P<message>.*)$")
_TAG = "safe_layers"


_OURS = re.compile(r"(?:(?P<severity>[IWEF])(?P<time>\d{4}(?:\d{4})? \d\d:\d\d:\d\d\.\d{6}) +"
                   r"(?P<pid>\d+) )?%s\] " % _TAG)


def parse_line(line):
    """The :class:`ReportLine` of one log line, or None when the line is not ours.

    Accepts a whole glog line (``W20261125 03:10:23.123456  4242 safe_layers] ...``, also
    after other text on the line), or the bare message (an exception's text)."""
    text = line.rstrip("\r\n")
    ours = _OURS.search(text)
    if ours is None and _GLOG.match(text):
        return None  # another source's glog line (Caffe's own)
    message = text[ours.end():] if ours else text
    parsed = _parse_message(message)
    if parsed is None:
        if ours is None:
            return None
        parsed = ReportLine("other", message)
    if ours is not None:
        parsed.severity, parsed.time = ours.group("severity"), ours.group("time")
        parsed.pid = int(ours.group("pid")) if ours.group("pid") else None
    return parsed


def _parse_message(message):
    if message.startswith("WATCH "):
        # A watch's lines (safe_layers.reporting.watch_lines writes and reads them) share the tag.
        from safe_layers.reporting import watch_lines as watch_report
        fields = watch_report.parse_line(message)
        return ReportLine("watch", message, watch=fields) if fields is not None else None
    kind_prefix = ""
    body = message
    if body.startswith("ABORT report: "):
        try:
            report = FaultReport.from_json(body[len("ABORT report: "):])
        except (ValueError, TypeError, KeyError):
            return None
        return ReportLine("abort_report", message, subject=report.subject, report=report)
    if body.startswith("ABORT "):
        kind_prefix, body = "abort", body[len("ABORT "):]
    elif body.startswith("final summary: "):
        kind_prefix, body = "final", body[len("final summary: "):]
    subject, rest = Subject.split(body)
    if subject is None:
        return None
    if kind_prefix != "final":
        report = FaultReport._from_body(subject, rest)
        if report is not None:
            every = re.search(r" \(further faults summarised every (\d+)\)$", rest)
            return ReportLine(kind_prefix or "fault", rest, subject=subject, report=report,
                              summarised_every=int(every.group(1)) if every else None)
        if kind_prefix == "abort":
            return ReportLine("notice", rest, subject=subject)
    summary = FaultSummary._from_body(subject, rest)
    if summary is not None:
        return ReportLine("final_summary" if kind_prefix else "summary", rest, subject=subject,
                          summary=summary)
    statistics = ClipStatistics._from_body(subject, rest)
    if statistics is not None:
        return ReportLine("final_statistics" if kind_prefix else "statistics", rest,
                          subject=subject, statistics=statistics)
    failure = RecordFailure._from_body(subject, rest)
    if failure is not None:
        return ReportLine("record_failure", rest, subject=subject, failure=failure)
    return ReportLine("notice", rest, subject=subject)


def glog_prefix(severity, now=None):
    """'W20261125 03:10:23.123456  4242 safe_layers] ': the shape of the lines glog 0.6
    (the one Caffe links here) writes, so our lines sort and read with Caffe's."""
    now = now or datetime.datetime.now()
    return "%s%s %s %5d %s] " % (severity, now.strftime("%Y%m%d"), now.strftime("%H:%M:%S.%f"),
                                 os.getpid(), _TAG)


# ---- the log of one layer ------------------------------------------------------------------------

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


# ---- live layers: names, nets, release, exit ---------------------------------------------------

class _Probe:
    pass


def _references(ref):
    obj = ref()
    return 0 if obj is None else sys.getrefcount(obj)


class LiveLayers:
    """The layers of this process that report, held weakly, with their FaultLogs.

    Caffe never frees a Python layer: its C++ PythonLayer keeps a reference to the Python
    object, which holds the C++ layer (a cycle Python's collector cannot see). When a net
    is released, that reference is the only one left; :meth:`sweep` notices this, prints
    the layer's final summary, lets the layer drop its buffers (``release_buffers()``) and
    forgets it, so building and dropping many nets leaves nothing growing behind.
    """

    def __init__(self):
        self._entries = []  # (weakref to owner, FaultLog), oldest first
        self._lock = threading.Lock()
        self._running = False
        self._epoch_phase = None
        self._epoch = 0
        self._unnamed = {}
        # An object held by exactly one outside reference, like a released Caffe layer:
        # counted through the same function, it calibrates what "released" reads as.
        self._probe_holder = [_Probe()]
        self._released_references = _references(weakref.ref(self._probe_holder[0]))

    def mark_running(self):
        """A layer ran: the next layer set up belongs to another net."""
        self._running = True

    def name_for(self, layer_type, name, phase):
        """``name``, or for an unnamed layer '#k': its number among the unnamed layers of its
        type in the net being built. A net's layers are set up one after another before any
        of them runs, so a new phase or a layer having run starts the next net (nets built
        back to back with nothing run in between count as one here)."""
        with self._lock:
            if self._running or phase != self._epoch_phase:
                self._unnamed = {}
                self._running = False
                self._epoch_phase = phase
                self._epoch += 1
            if name is not None:
                return name
            number = self._unnamed.get(layer_type, 0) + 1
            self._unnamed[layer_type] = number
        return "#%d" % number

    def register(self, owner, log):
        """Keep ``log`` of ``owner`` (weakly); ``log.net`` numbers the net being built."""
        self.sweep()
        with self._lock:
            log.net = self._epoch
            self._entries.append((weakref.ref(owner), log))

    def released(self, ref):
        return _references(ref) <= self._released_references

    def sweep(self):
        """Forget the layers whose nets are gone, printing their final summaries."""
        with self._lock:
            gone = [(ref, log) for ref, log in self._entries if self.released(ref)]
            if gone:
                dead = {id(log) for _, log in gone}
                self._entries = [(r, l) for r, l in self._entries if id(l) not in dead]
        for ref, log in gone:
            _final_summary_quietly(log)
            owner = ref()
            release = getattr(owner, "release_buffers", None)
            if release is not None:
                release()

    def entries(self):
        self.sweep()
        with self._lock:
            return [(ref(), log) for ref, log in self._entries if ref() is not None]

    def owners(self, layer_type=None, phase=None, net=None):
        """The live layers (objects) of ``layer_type`` in ``phase`` and built as part of net
        number ``net`` (a FaultLog's ``net``), oldest first."""
        return [owner for owner, log in self.entries()
                if (layer_type is None or log.layer_type == layer_type)
                and (phase is None or log.phase == phase) and (net is None or log.net == net)]

    def forget_all(self):
        with self._lock:
            self._entries = []
            self._unnamed = {}
            self._epoch_phase = None


LIVE = LiveLayers()


def layers_of(net):
    """The Python layer objects of a caffe.Net, or of every net of a caffe.Solver."""
    nets = [net]
    if hasattr(net, "test_nets") and hasattr(net, "net"):
        nets = [net.net] + list(net.test_nets)
    found = []
    for each in nets:
        found.extend(layer for layer in each.layers if hasattr(layer, "fault_log"))
    return found


def fault_logs(layer=None, phase=None, net=None):
    """The FaultLogs of the live layers of this process (oldest first), optionally only
    those of the layer named ``layer`` (its ``name``, or ``#k`` for the k-th unnamed one),
    in ``phase`` ('TRAIN'/'TEST'), and of ``net`` (a caffe.Net, or a caffe.Solver for all
    its nets): with several nets in one process, ``net=`` tells their layers apart.
    """
    logs = [log for _, log in LIVE.entries()]
    if net is not None:
        mine = {id(l.fault_log) for l in layers_of(net)}
        logs = [log for log in logs if id(log) in mine]
    return [log for log in logs
            if (layer is None or log.layer == layer) and (phase is None or log.phase == phase)]


def clear_fault_logs(net=None):
    """Without ``net``: forget every FaultLog so far (no final summaries for them; for
    tests and long pycaffe sessions). With ``net`` (a caffe.Net or caffe.Solver): clear
    only the logs of that net's layers, which keep reporting afresh."""
    if net is None:
        LIVE.forget_all()
        return
    for log in fault_logs(net=net):
        log.clear()


def _final_summary_quietly(log):
    try:
        log.final_summary()
    except Exception:  # noqa: BLE001 - a summary must never mask the real exit status
        pass


def _final_summaries():
    deferred.BOARDS.read_all()  # deferred checks not read yet (a pass cut short at exit)
    for _, log in LIVE.entries():
        _final_summary_quietly(log)


def _register_final_summaries():
    if caffe_process.caffe_cli_argv() is None:
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


# ---- the flight recorder -----------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME = 80


def safe_file_name(name):
    """``name`` as one file-name component: only letters, digits, '.', '_' and '-', at
    most 80 characters; a name that had to change gets a checksum of the original, so two
    different names ('ip/guard', 'ip_guard') never share a file."""
    cleaned = _UNSAFE.sub("_", name).strip("._") or "layer"
    if cleaned != name or len(cleaned) > _MAX_NAME:
        cleaned = "%s-%08x" % (cleaned[:_MAX_NAME - 9], zlib.crc32(name.encode("utf-8")))
    return cleaned


def flight_record_stem(report):
    """'TRAIN-ip_guard-4f3a2c1d-forward-data-iter37-call38': phase, layer, pass, when."""
    when = ("iter%d-call%d" % (report.iteration, report.call) if report.iteration is not None
            else "call%d" % report.call)
    return "%s-%s-%s-%s" % (report.phase, safe_file_name(report.layer),
                            report.pass_.replace(" ", "-"), when)


def write_flight_record(directory, stem, arrays, report, max_bytes):
    """Save ``arrays`` (name -> array) and ``report`` as ``<stem>.npz`` + ``<stem>.json``.

    Arrays are taken in order until ``max_bytes`` would be exceeded; the ones left out
    are listed in the JSON. Both files are written to temporary files first and then
    linked into place, so a reader never sees a partial file; an existing record is never
    overwritten (the stem gets '-2', '-3', ...). Returns the two paths; raises OSError
    (or whatever the write raised) on failure, leaving no file behind.
    """
    os.makedirs(directory, exist_ok=True)
    kept, skipped, used = {}, [], 0
    for name, array in arrays.items():
        # The size is known on the device: only arrays under the cap are copied to the host.
        if used + array.nbytes > max_bytes:
            skipped.append({"name": name, "shape": list(array.shape), "bytes": int(array.nbytes)})
            continue
        kept[name] = to_numpy(array)
        used += array.nbytes
    temporaries = []
    try:
        npz_tmp = _temporary(directory, temporaries)
        with open(npz_tmp, "wb") as f:
            numpy.savez_compressed(f, **kept)
            f.flush()
            os.fsync(f.fileno())
        record = {"report": json.loads(report.to_json()), "line": report.line(),
                  "arrays": sorted(kept), "skipped_over_size_cap": skipped, "max_bytes": max_bytes}
        json_tmp = _temporary(directory, temporaries)
        with open(json_tmp, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        return _publish(directory, stem, npz_tmp, json_tmp)
    finally:
        for path in temporaries:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _temporary(directory, temporaries):
    fd, path = tempfile.mkstemp(dir=directory, prefix=".safe_layers-", suffix=".tmp")
    os.close(fd)
    # mkstemp makes it 0600; a record is for the team reading the run: the usual umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    temporaries.append(path)
    return path


def _publish(directory, stem, npz_tmp, json_tmp):
    """Move both files in under the first free ``stem[-n]``; never overwrite."""
    links = True
    for attempt in range(1, 1000):
        name = stem if attempt == 1 else "%s-%d" % (stem, attempt)
        npz = os.path.join(directory, name + ".npz")
        jsn = os.path.join(directory, name + ".json")
        if links:
            try:
                os.link(npz_tmp, npz)  # atomic, and fails instead of overwriting
            except FileExistsError:
                continue
            except OSError:
                links = False  # a file system without hard links: rename below
            else:
                try:
                    os.link(json_tmp, jsn)
                except FileExistsError:
                    os.unlink(npz)
                    continue
                except BaseException:
                    os.unlink(npz)
                    raise
                return npz, jsn
        # rename is atomic too, but replaces an existing file: look first (racy only
        # against another writer choosing the very same new name).
        if os.path.lexists(npz) or os.path.lexists(jsn):
            continue
        os.rename(npz_tmp, npz)
        os.rename(json_tmp, jsn)
        return npz, jsn
    raise FileExistsError("no free file name for %r in %r" % (stem, directory))


class FlightRecorder:
    """Writes a layer's first fault (its arrays and report) to ``directory``, once.

    Reporting comes first; recording never raises: a failure (a read-only folder, a full
    disk, a file where the folder should be) is reported once through the layer's log and
    the fault's action goes ahead. Only one record is attempted per layer.
    """

    def __init__(self, log, directory, max_bytes):
        self.log = log
        self.directory = directory
        self.max_bytes = int(max_bytes)
        self.attempted = False
        self.paths = None

    def record(self, report, arrays):
        if self.attempted:
            return None
        self.attempted = True
        try:
            self.paths = write_flight_record(self.directory, flight_record_stem(report), arrays,
                                             report, self.max_bytes)
        except Exception as exc:  # noqa: BLE001 - a failure to record must not end training
            self.log.record_failure(self.directory, report.action,
                                    "%s: %s" % (type(exc).__name__, exc))
            return None
        return self.paths
