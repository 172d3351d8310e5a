"""What a watch reports, one line each, and the parser of those lines (writer and
reader together: one format, one owner).

Lines go out behind :func:`safe_layers.reporting.glog_prefix`, so they sort and read
with Caffe's own log::

    E20261125 03:18:18.830953  5236 safe_layers] WATCH producer forward "Input" "mnist" (layer 0) in TRAIN, iteration 37: non-finite top[0] "data" data, shape 64x1x28x28: nan=1 +inf=0 -inf=0; first bad at [5, 0, 3, 4] = nan; samples [5] of 64; inputs: none; action=skip
    W20261125 03:18:18.831002  5236 safe_layers] WATCH skip iteration 37: non-finite loss nan and param diffs (conv1[0], conv1[1]); weights, momentum and iter left as they were; 1 skipped in all

:func:`parse_line` turns any such line (with or without the glog prefix) back into a
dict; ``to_json`` gives the full structured form (the event log of `safe-layers train`).

Where two watches of one process run side by side, each line names its watch right after
the tag (:func:`tagged`: ``WATCH [lenet] skip iteration 37: ...``); :func:`parse_line`
gives that name back as ``tag``.
"""

import json
import re

from safe_layers.core.float_text import jsonable, six_digits

TAG = "WATCH "

SAMPLES_SHOWN = 16


def _q(text):
    return json.dumps(str(text))


def _shape(shape):
    return "x".join(str(d) for d in shape)


class BlobFault:
    """What was wrong in one array: counts, first bad element, samples hit."""

    def __init__(self, shape, nan, posinf, neginf, first_index, first_value, samples):
        self.shape = tuple(int(d) for d in shape)
        self.nan, self.posinf, self.neginf = int(nan), int(posinf), int(neginf)
        self.first_index = tuple(first_index) if first_index is not None else None
        self.first_value = first_value
        self.samples = list(samples)

    def text(self):
        first = ("first bad at [%s] = %s" % (", ".join(str(i) for i in self.first_index),
                                             six_digits(self.first_value))
                 if self.first_index is not None else "no bad element")
        shown = ", ".join(str(s) for s in self.samples[:SAMPLES_SHOWN])
        more = " ..." if len(self.samples) > SAMPLES_SHOWN else ""
        batch = self.shape[0] if self.shape else 1
        return ("shape %s: nan=%d +inf=%d -inf=%d; %s; samples [%s]%s (%d) of %d"
                % (_shape(self.shape), self.nan, self.posinf, self.neginf, first, shown, more,
                   len(self.samples), batch))

    def as_dict(self):
        return {"shape": list(self.shape), "nan": self.nan, "posinf": self.posinf,
                "neginf": self.neginf,
                "first_index": list(self.first_index) if self.first_index is not None else None,
                "first_value": self.first_value, "samples": list(self.samples)}


class ProducerFault:
    """The first layer, in execution order, whose inputs were finite and whose output
    is not: in forward its top data, in backward a bottom diff or a param diff.

    Attributes: pass_ ('forward'/'backward'), phase, iteration (None without a solver),
    call (the pass count of this net, from 1), layer, layer_type, layer_index, role
    ('top'/'bottom'/'param'), blob_index, blob (its name; 'layer[i]' for a param),
    what ('data'/'diff'), fault (:class:`BlobFault`), inputs (list of dicts: role, blob,
    min, max, mean_abs of what the layer read), note (why the inputs still explain it,
    e.g. non-finite weights; '' if nothing), action.
    """

    kind = "producer"

    def __init__(self, pass_, phase, iteration, call, layer, layer_type, layer_index, role,
                 blob_index, blob, what, fault, inputs, note, action):
        self.pass_, self.phase, self.iteration, self.call = pass_, phase, iteration, call
        self.layer, self.layer_type, self.layer_index = layer, layer_type, layer_index
        self.role, self.blob_index, self.blob, self.what = role, blob_index, blob, what
        self.fault, self.inputs, self.note, self.action = fault, inputs, note, action

    def when(self):
        return ("iteration %d" % self.iteration if self.iteration is not None
                else "call %d" % self.call)

    def line(self):
        inputs = "; ".join("%s %s min=%s max=%s mean|x|=%s" % (i["role"], _q(i["blob"]),
                                                               six_digits(i["min"]), six_digits(i["max"]),
                                                               six_digits(i["mean_abs"]))
                           for i in self.inputs) or "none"
        note = "; note: %s" % self.note if self.note else ""
        return ('%sproducer %s %s %s (layer %d) in %s, %s: non-finite %s[%d] %s %s, %s; '
                'inputs finite: %s%s; action=%s'
                % (TAG, self.pass_, _q(self.layer_type), _q(self.layer), self.layer_index,
                   self.phase, self.when(), self.role, self.blob_index, _q(self.blob), self.what,
                   self.fault.text(), inputs, note, self.action))

    def as_dict(self):
        out = {"kind": self.kind, "pass": self.pass_, "phase": self.phase,
               "iteration": self.iteration, "call": self.call, "layer": self.layer,
               "layer_type": self.layer_type, "layer_index": self.layer_index, "role": self.role,
               "blob_index": self.blob_index, "blob": self.blob, "what": self.what,
               "inputs": self.inputs, "note": self.note, "action": self.action}
        out.update(self.fault.as_dict())
        return out

    def to_json(self):
        return json.dumps(jsonable(self.as_dict()), sort_keys=True)

    def __repr__(self):
        return "ProducerFault(%s)" % self.line()


class SolverFault:
    """A fault the solver-level checks found: ``kind`` is 'lr' (the rate), 'loss',
    'gradients' (param diffs), 'weights' (param data after an update), 'growth' (an
    early warning), 'dead' (the net stopped learning: :func:`dead_message`) or 'stopped'
    (the watch gave up); ``message`` says what and why;
    ``params`` names the param blobs involved ('layer[i]'); ``details`` holds the rest."""

    def __init__(self, kind, phase, iteration, message, action, params=(), details=None):
        self.kind, self.phase, self.iteration = kind, phase, iteration
        self.message, self.action = message, action
        self.params = list(params)
        self.details = dict(details or {})

    def line(self):
        return "%s%s in %s, iteration %d: %s; action=%s" % (TAG, self.kind, self.phase,
                                                           self.iteration, self.message, self.action)

    def as_dict(self):
        out = {"kind": self.kind, "phase": self.phase, "iteration": self.iteration,
               "message": self.message, "action": self.action, "params": self.params}
        out.update(self.details)
        return out

    def to_json(self):
        return json.dumps(jsonable(self.as_dict()), sort_keys=True)

    def __repr__(self):
        return "SolverFault(%s)" % self.line()


class Event:
    """Something the watch did: 'skip', 'rollback', 'checkpoint', 'clip', 'lr' (a
    changed base_lr), 'reduced' (what an older pycaffe lacks, said once when the watch
    attaches), each at an iteration, with a message and details."""

    def __init__(self, kind, iteration, message, details=None):
        self.kind, self.iteration, self.message = kind, iteration, message
        self.details = dict(details or {})

    def line(self):
        return "%s%s iteration %d: %s" % (TAG, self.kind, self.iteration, self.message)

    def as_dict(self):
        out = {"kind": self.kind, "iteration": self.iteration, "message": self.message}
        out.update(self.details)
        return out

    def to_json(self):
        return json.dumps(jsonable(self.as_dict()), sort_keys=True)

    def __repr__(self):
        return "Event(%s)" % self.line()


def tag_text(name):
    """``name`` as a line's watch tag: no blank, no bracket, at most 40 characters."""
    return re.sub(r"[^\w.#+-]", "_", str(name))[:40] or "_"


def tagged(line, tag):
    """``line`` (a WATCH line) naming the watch that wrote it: ``WATCH [tag] ...``."""
    if not line.startswith(TAG):
        return line
    return "%s[%s] %s" % (TAG, tag_text(tag), line[len(TAG):])


def record_line(path):
    """The line that says where a replayable record was written."""
    return "%srecord: %s (replay: safe_layers.anomaly.replay(%r, net))" % (TAG, path, path)


def record_failed_line(directory, error):
    return "%srecord: could not write to %s: %s" % (TAG, directory, error)


def repeat_line(count, kind, latest):
    """The periodic line that stands for reports past ``log_first``."""
    return "%s%d %s reports so far; latest: %s" % (TAG, count, kind, latest.line())


def summary_line(faults, counts, skipped, rollbacks, checkpoints, clips, ended_dead=None):
    """One line: what a watch saw and did (``Watch.summary``); ``ended_dead``: the
    iteration since which the net the run ends with is dead, or None."""
    shown = ", ".join("%s=%d" % kv for kv in sorted(counts.items())) or "none"
    dead = "; ended dead since iteration %d" % ended_dead if ended_dead is not None else ""
    return ("%ssummary: %d faults (%s); %d skipped, %d rollbacks, %d checkpoints, %d clips%s"
            % (TAG, faults, shown, skipped, rollbacks, checkpoints, clips, dead))


def dead_message(since, layers=(), vanished=None, chance=None):
    """The message of a 'dead' SolverFault (read back by :func:`dead_details`): since
    which iteration the net is dead, and the evidence: ``layers`` (dicts: layer, type,
    blob, iterations: a top all zeros that many iterations in a row), ``vanished``
    (ratio: lr x diff norm / weight norm, or None when every diff is zero; threshold,
    iterations, loss, zero_layers), ``chance`` (mean, level, terms: [(loss weight, C)],
    window, band, iterations, never_left)."""
    parts = ["dead since iteration %d" % since]
    if layers:
        parts.append("dead layers: " + ", ".join(
            "%s (%s, top %s, all zeros %d iterations in a row)"
            % (_q(l["layer"]), _q(l["type"]), _q(l["blob"]), l["iterations"]) for l in layers))
    if vanished:
        ratio = vanished["ratio"]
        text = ("vanished gradients: %s for %d iterations in a row at loss %s"
                % ("every param diff zero" if ratio is None else "update/weights %s < %s"
                   % (six_digits(ratio), six_digits(vanished["threshold"])),
                   vanished["iterations"], six_digits(vanished["loss"])))
        if vanished["zero_layers"]:
            text += "; zero param diffs in " + ", ".join(_q(n) for n in vanished["zero_layers"])
        parts.append(text)
    if chance:
        terms = " + ".join(("ln %d" % c) if w == 1 else "%s x ln %d" % (six_digits(w), c)
                           for w, c in chance["terms"])
        parts.append("loss at chance: mean %s of the last %d iterations within %s%% of the "
                     "chance level %s = %s for %d iterations, %s"
                     % (six_digits(chance["mean"]), chance["window"],
                        six_digits(100 * chance["band"]), six_digits(chance["level"]), terms,
                        chance["iterations"], "never below it" if chance["never_left"]
                        else "after having been below it"))
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------
# The reader.

_GLOG = r"(?:[IWEF]\d{4}(?:\d{4})? \d\d:\d\d:\d\d\.\d{6} +\d+ \S+\] )?"
_STR = r'"(?:[^"\\]|\\.)*"'

_PRODUCER = re.compile(
    _GLOG + r"WATCH producer (?P<pass>forward|backward) (?P<layer_type>" + _STR + r") "
    r"(?P<layer>" + _STR + r") \(layer (?P<layer_index>\d+)\) in (?P<phase>\w+), "
    r"(?:iteration (?P<iteration>-?\d+)|call (?P<call>\d+)): "
    r"non-finite (?P<role>top|bottom|param)\[(?P<blob_index>\d+)\] (?P<blob>" + _STR + r") "
    r"(?P<what>data|diff), shape (?P<shape>[\dx]*): nan=(?P<nan>\d+) \+inf=(?P<posinf>\d+) "
    r"-inf=(?P<neginf>\d+); (?:first bad at \[(?P<first_index>[^\]]*)\] = (?P<first_value>\S+)"
    r"|no bad element); samples \[(?P<samples>[^\]]*)\](?: \.\.\.)? \((?P<n_samples>\d+)\) "
    r"of (?P<batch>\d+); inputs finite: (?P<inputs>.*?)(?:; note: (?P<note>.*))?; "
    r"action=(?P<action>\w+)$")

_SOLVER = re.compile(
    _GLOG + r"WATCH (?P<kind>lr|loss|gradients|weights|growth|dead|stopped) in (?P<phase>\w+), "
    r"iteration (?P<iteration>-?\d+): (?P<message>.*); action=(?P<action>\w+)$")

_EVENT = re.compile(
    _GLOG + r"WATCH (?P<kind>skip|rollback|checkpoint|clip|lr|reduced) iteration (?P<iteration>-?\d+): "
    r"(?P<message>.*)$")

_TAGGED = re.compile(r"WATCH \[(?P<tag>[^\]\s]+)\] ")

_INPUT = re.compile(r"(?P<role>[\w\[\] ]+?) (?P<blob>" + _STR + r") min=(?P<min>\S+) "
                    r"max=(?P<max>\S+) mean\|x\|=(?P<mean_abs>[^\s;]+)")  # "; " joins inputs


_RECORD = re.compile(_GLOG + r"WATCH record: (?:(?P<path>\S+) \(replay: .*\)|could not write to "
                     r"(?P<directory>.*?): (?P<error>.*))$")
_REPEAT = re.compile(_GLOG + r"WATCH (?P<count>\d+) (?P<kind>\w+) reports so far; latest: "
                     r"(?P<latest>.*)$")
_SUMMARY = re.compile(_GLOG + r"WATCH summary: (?P<faults>\d+) faults \((?P<counts>[^)]*)\); "
                      r"(?P<skipped>\d+) skipped, (?P<rollbacks>\d+) rollbacks, "
                      r"(?P<checkpoints>\d+) checkpoints, (?P<clips>\d+) clips"
                      r"(?:; ended dead since iteration (?P<ended_dead>-?\d+))?$")


def _float(text):
    return None if text == "none" else float(text)


def rollback_message(state, to, cause, at, further_back=False, same_again=False,
                     base_lr=None, rollbacks=1):
    """The message of a 'rollback' Event (read back by :func:`event_details`): the state
    restored and its iteration, the fault kind and iteration that caused it, whether the
    previous rollback's checkpoint failed again (``further_back``: one older restored;
    ``same_again``: none older kept), ``base_lr`` (from, to) when lr_factor changed it, and
    the rollbacks in all."""
    message = "restored %s (iteration %d) after %s at iteration %d" % (state, to, cause, at)
    if further_back:
        message += " (the previous rollback's checkpoint failed again: one further back)"
    elif same_again:
        message += (" (the previous rollback's checkpoint failed again, and no older one is "
                    "kept: the same one again)")
    if base_lr is not None:
        message += "; base_lr %s -> %s" % (six_digits(base_lr[0]), six_digits(base_lr[1]))
    return message + "; %d rollbacks in all" % rollbacks


def skip_message(skipped):
    """The message of a 'skip' Event (read back by :func:`event_details`)."""
    return "weights, momentum and iter left as they were; %d skipped in all" % skipped


# The messages rollback_message and skip_message write (the line carries only the text).
_ROLLBACK_MESSAGE = re.compile(
    r"restored (?P<state>.+) \(iteration (?P<to>-?\d+)\) after (?P<cause>\w+) at iteration "
    r"(?P<at>-?\d+)(?: \(the previous rollback's checkpoint failed again(?:(?P<further>: one "
    r"further back)|(?P<same>, and no older one is kept: the same one again))\))?"
    r"(?:; base_lr (?P<base_lr_from>\S+) -> (?P<base_lr_to>\S+))?; (?P<rollbacks>\d+) "
    r"rollbacks in all$")
_SKIP_MESSAGE = re.compile(r"; (?P<skipped>\d+) skipped in all$")


def event_details(fields):
    """What the message of a parsed 'rollback' or 'skip' event line (``parse_line``'s dict)
    says, as numbers: rollback: to (the checkpoint's iteration), at (the iteration of the
    fault that caused it), cause (its kind), further_back (the previous rollback's checkpoint
    failed again: one older), same_again (... and none older is kept), base_lr_from / base_lr_to (None
    without lr_factor), rollbacks (in all, this one included), state; skip: skipped (in
    all). {} for any other line, or a message this version does not know."""
    kind = fields.get("kind") if fields else None
    if kind == "rollback":
        match = _ROLLBACK_MESSAGE.match(fields["message"])
        if match is None:
            return {}
        g = match.groupdict()
        return {"to": int(g["to"]), "at": int(g["at"]), "cause": g["cause"], "state": g["state"],
                "further_back": bool(g["further"]), "same_again": bool(g["same"]),
                "base_lr_from": _float(g["base_lr_from"]) if g["base_lr_from"] else None,
                "base_lr_to": _float(g["base_lr_to"]) if g["base_lr_to"] else None,
                "rollbacks": int(g["rollbacks"])}
    if kind == "skip":
        match = _SKIP_MESSAGE.search(fields["message"])
        return {"skipped": int(match.group("skipped"))} if match else {}
    return {}


_DEAD_LAYER_TEXT = (r"(?P<layer>" + _STR + r") \((?P<type>" + _STR + r"), top (?P<blob>" + _STR
                    + r"), all zeros (?P<iterations>\d+) iterations in a row\)")
_DEAD_LAYER = re.compile(_DEAD_LAYER_TEXT)
_DEAD_LAYERS = re.sub(r"\?P<\w+>", "?:", _DEAD_LAYER_TEXT)  # the same, capturing nothing
_DEAD_MESSAGE = re.compile(
    r"dead since iteration (?P<since>-?\d+)(?:; dead layers: (?P<layers>" + _DEAD_LAYERS
    + r"(?:, " + _DEAD_LAYERS + r")*))?"
    r"(?:; vanished gradients: (?P<vanished>.*?))?(?:; loss at chance: (?P<chance>.*))?$")
_VANISHED = re.compile(
    r"(?:every param diff zero|update/weights (?P<ratio>\S+) < (?P<threshold>\S+)) for "
    r"(?P<iterations>\d+) iterations in a row at loss (?P<loss>[^;\s]+)"
    r"(?:; zero param diffs in (?P<zero>.*))?$")
_CHANCE = re.compile(
    r"mean (?P<mean>\S+) of the last (?P<window>\d+) iterations within (?P<band>\S+)% of the "
    r"chance level (?P<level>\S+) = (?P<terms>.*?) for (?P<iterations>\d+) iterations, "
    r"(?P<how>never below it|after having been below it)$")


def dead_details(fields):
    """What the message of a parsed 'dead' line (``parse_line``'s dict) says, as the
    arguments :func:`dead_message` wrote it from (since, layers, vanished, chance; the
    chance ``terms`` as text; a vanished ``threshold`` only where a ratio is shown); {}
    for any other line."""
    if not fields or fields.get("kind") != "dead":
        return {}
    match = _DEAD_MESSAGE.match(fields["message"])
    if match is None:
        return {}
    g = match.groupdict()
    out = {"since": int(g["since"]), "layers": [], "vanished": None, "chance": None}
    for m in _DEAD_LAYER.finditer(g["layers"] or ""):
        out["layers"].append({"layer": json.loads(m["layer"]), "type": json.loads(m["type"]),
                              "blob": json.loads(m["blob"]), "iterations": int(m["iterations"])})
    m = _VANISHED.match(g["vanished"] or "")
    if m:
        out["vanished"] = {
            "ratio": float(m["ratio"]) if m["ratio"] else None,
            "threshold": float(m["threshold"]) if m["threshold"] else None,
            "iterations": int(m["iterations"]), "loss": float(m["loss"]),
            "zero_layers": [json.loads(q) for q in re.findall(_STR, m["zero"] or "")]}
    m = _CHANCE.match(g["chance"] or "")
    if m:
        out["chance"] = {"mean": float(m["mean"]), "window": int(m["window"]),
                         "band": float(m["band"]) / 100, "level": float(m["level"]),
                         "terms": m["terms"], "iterations": int(m["iterations"]),
                         "never_left": m["how"] == "never below it"}
    return out


def parse_line(line):
    """The dict a WATCH line carries (``kind`` first: 'producer', a SolverFault kind or
    an Event kind), or None for any other line. Numbers come back as numbers; producer
    lines give the same keys as ``ProducerFault.as_dict`` (finite input statistics to
    six digits); a line that names its watch (:func:`tagged`) adds ``tag``."""
    line = line.rstrip("\n")
    match = _TAGGED.search(line)
    if match is None or match.start() != line.find(TAG):  # the line's own tag, not one inside
        return _parse_untagged(line)
    fields = _parse_untagged(line[:match.start()] + TAG + line[match.end():])
    if fields is not None:
        fields["tag"] = match.group("tag")
    return fields


def _parse_untagged(line):
    match = _REPEAT.search(line)  # first: it carries another report's line inside
    if match:
        latest = parse_line(match.group("latest")) or {}
        return dict(latest, repeated=int(match.group("count")))
    match = _PRODUCER.search(line)
    if match:
        g = match.groupdict()
        inputs = [] if g["inputs"] == "none" else [
            {"role": m["role"], "blob": json.loads(m["blob"]), "min": _float(m["min"]),
             "max": _float(m["max"]), "mean_abs": _float(m["mean_abs"])}
            for m in _INPUT.finditer(g["inputs"])]
        return {
            "kind": "producer", "pass": g["pass"], "phase": g["phase"],
            "iteration": int(g["iteration"]) if g["iteration"] is not None else None,
            "call": int(g["call"]) if g["call"] is not None else None,
            "layer": json.loads(g["layer"]), "layer_type": json.loads(g["layer_type"]),
            "layer_index": int(g["layer_index"]), "role": g["role"],
            "blob_index": int(g["blob_index"]), "blob": json.loads(g["blob"]), "what": g["what"],
            "shape": [int(d) for d in g["shape"].split("x")] if g["shape"] else [],
            "nan": int(g["nan"]), "posinf": int(g["posinf"]), "neginf": int(g["neginf"]),
            "first_index": ([int(i) for i in g["first_index"].split(", ")]
                            if g["first_index"] else ([] if g["first_index"] == "" else None)),
            "first_value": float(g["first_value"]) if g["first_value"] else None,
            "samples": [int(s) for s in g["samples"].split(", ")] if g["samples"] else [],
            "n_samples": int(g["n_samples"]), "batch": int(g["batch"]),
            "inputs": inputs, "note": g["note"] or "", "action": g["action"]}
    match = _SOLVER.search(line)
    if match:
        g = match.groupdict()
        return {"kind": g["kind"], "phase": g["phase"], "iteration": int(g["iteration"]),
                "message": g["message"], "action": g["action"]}
    match = _EVENT.search(line)
    if match:
        g = match.groupdict()
        return {"kind": g["kind"], "iteration": int(g["iteration"]), "message": g["message"]}
    match = _RECORD.search(line)
    if match:
        g = match.groupdict()
        if g["path"]:
            return {"kind": "record", "path": g["path"]}
        return {"kind": "record", "path": None, "directory": g["directory"], "error": g["error"]}
    match = _SUMMARY.search(line)
    if match:
        g = match.groupdict()
        counts = dict((k, int(v)) for k, v in (item.split("=") for item in g["counts"].split(", ")
                                              if "=" in item))
        return {"kind": "summary", "faults": int(g["faults"]), "counts": counts,
                "skipped": int(g["skipped"]), "rollbacks": int(g["rollbacks"]),
                "checkpoints": int(g["checkpoints"]), "clips": int(g["clips"]),
                "ended_dead": int(g["ended_dead"]) if g["ended_dead"] else None}
    return None
