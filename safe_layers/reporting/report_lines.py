"""Every line our layers print: each kind's writer beside its reader, and parse_line over all.

One format, one owner: tools that read Caffe logs (``safe-layers diagnose``) call the
parser instead of copying its regular expressions.

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
import json
import re

import numpy

# Under the names reporting has always exported them by.
from safe_layers.core.float_text import jsonable
from safe_layers.core.float_text import shortest as format_param, shortest_float32 as format_value
from safe_layers.reporting import glog, watch_lines


# ---- numbers: printed so that they read back exactly -------------------------------------

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
        return json.dumps(jsonable(self.as_dict()), sort_keys=True)

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


def parse_line(line):
    """The :class:`ReportLine` of one log line, or None when the line is not ours.

    Accepts a whole glog line (``W20261125 03:10:23.123456  4242 safe_layers] ...``, also
    after other text on the line), or the bare message (an exception's text)."""
    text = line.rstrip("\r\n")
    ours = glog.OURS.search(text)
    if ours is None and glog.ANY_LINE.match(text):
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
        # A watch's lines (watch_lines writes and reads them) share the tag.
        fields = watch_lines.parse_line(message)
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

