"""A streaming reader of Caffe training logs: glog lines in, typed events out.

    for event in read_log("train.log"):        # one pass, memory flat in the log's size
        if event.kind == "loss": ...

Reads what `caffe train`, pycaffe (glog on stderr) and `safe-layers train` write, in
BVLC Caffe's format and in the forks' (py-faster-rcnn, SSD, SegNet, Intel Caffe, NVCaffe:
the patterns below cite each one's line)
(``solver.cpp``: ``Iteration N, loss = L`` and the outputs; ``sgd_solver.cpp``: the ``lr``;
``net.cpp``: the ``debug_info`` lines of ``ForwardDebugInfo`` and ``BackwardDebugInfo``): the glog prefix with a 4-digit
(``I1125``, glog < 0.6) or 8-digit (``I20261125``) date, or none (``--log_prefix=false``);
``nan``, ``-nan``, ``inf``, ``-inf`` parse as floats. Lines it does not know are skipped,
never fatal; a last line without its newline (a log still being written, or cut off) is
not trusted and is reported as ``incomplete``. Over-long lines are read in pieces of at
most :data:`MAX_LINE` bytes, so a binary file cannot make it load everything at once.

Every event has ``kind`` and ``line`` (1-based); every event but ``forward`` / ``backward``
has ``stamp``: glog's (date, time) texts (``("1207", "02:44:09.595819")``), None on a
line without glog's prefix (and on a parameter block). Kinds and fields:

- ``solver``: fields (dict of the solver's top-level scalars, from "Initializing solver
  from parameters:"), field_lines (field -> its line), end_line
- ``net``: name, phase ('TRAIN'/'TEST'), layers (list of :class:`LayerInfo`, in the
  order Caffe builds and runs them), end_line ("Initializing net from parameters:")
- ``policy``: policy ("Learning Rate Policy: poly", logged by ``Solve``)
- ``loss``: iteration, value (``Iteration N (... iter/s ...), loss = L`` or the older
  and final ``Iteration N, loss = L``: the loss smoothed over ``average_loss``)
- ``output``: phase, index, name, value, weight (None for non-loss outputs), weighted
- ``lr``: iteration, value, extra (the fields a fork prints after it, by name: NVCaffe's
  ``m``, ``lrm``, ``wd``, ``gs``; empty for BVLC's line)
- ``testing``: iteration, net (``Iteration N, Testing net (#i)``)
- ``test_loss``: value
- ``clip``: norm, limit, scale (``Gradient clipping: scaling down gradients ...``)
- ``forward``: layer, blob_kind ('top'/'param'), blob, value (``[Forward] ... data: v``)
- ``backward``: layer, blob_kind ('bottom'/'param'), blob, value (``[Backward] ... diff: v``)
- ``norms``: l1_data, l1_diff, l2_data, l2_diff (``[Backward] All net params ...``)
- ``update``: layer, param, data, diff (the ``[Update]`` lines of older Caffe)
- ``multistep``: iteration, step
- ``fatal``: message, source (an ``F`` line: ``Check failed`` or ``LOG(FATAL)``)
- ``crash``: message, signal (``terminate called after throwing ...``, glibc's ``double
  free or corruption``, glog's ``*** SIGSEGV (@0x0) received by PID ...``: signal 'SIGSEGV')
- ``python_error``: message, error (the last line of a Python traceback,
  ``safe_layers.reporting.FaultAbort: ...``, or a line ``SomethingError: ...``)
- ``solving``: net (``Solving NAME``, solver.cpp:289: training starts)
- ``done``: (``Optimization Done.``)
- ``report``: report (a line of our layers or of a watch, as
  ``safe_layers.reporting.parse_line`` reads it: the parser lives beside the writer, so
  none of our formats is repeated here), severity; also a tool's own line that quotes a
  watch line after its name (``safe-layers train: WATCH summary: ...``)
- ``unreadable_report``: error (a line of ours its parser raised on: skipped, counted)
- ``incomplete``: text (the last line, without its newline)

:class:`LogReader` also counts ``lines`` and ``glog_lines`` (lines with a glog prefix).
"""

import re

MAX_LINE = 1 << 16
_CHUNK = 1 << 20

_NUMBER = r"[-+]?(?:nan|inf(?:inity)?|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"

# glog: severity, date (MMDD or YYYYMMDD), time, thread id, file:line (our own lines
# write "safe_layers]" without a line number).
_PREFIX = re.compile(r"([IWEF])(\d{8}|\d{4}) (\d\d:\d\d:\d\d\.\d{6}) +(\d+) ([^\s\]:]+)(?::(\d+))?\] ")

# The display lines of BVLC Caffe and of every fork, matched by search (a fork's text before
# "Iteration" is allowed):
#   BVLC            solver.cpp:239 "Iteration N (X iter/s, Ys/D iters), loss = L";
#                   the final one, solver.cpp:327 "Iteration N, loss = L"
#   py-faster-rcnn  caffe-fast-rcnn (faster-rcnn branch) solver.cpp:229, SegNet
#                   (caffe-segnet) solver.cpp:214, Intel Caffe solver.cpp:312:
#                   "Iteration N, loss = L"; weiliu89/caffe (SSD) solver.cpp:218 as BVLC
#   NVCaffe 0.16-0.17.0 solver.cpp:347 "Iteration N (X iter/s, Ys/D iter), E/Tep, loss = L"
#                   (the epochs "E/Tep, " only when the data layer knows its size) and
#                   solver.cpp:353 "Iteration N (Y s), loss = L" (its first three iterations);
#   NVCaffe 0.17.4  solver.cpp:337/342, the same after the device, "    [0] Iteration N ..."
#                   ("[rank.device]" with several processes, Net::print_current_device,
#                   net.cpp:1479)
_LOSS = re.compile(r"Iteration (\d+)(?: \([^)]*\))?, (?:[-+.\deE]+/[-+.\deE]+ep, )?loss = (%s)\s*$"
                   % _NUMBER, re.I)
# The rate: "Iteration N, lr = R" in BVLC (sgd_solver.cpp:112), caffe-fast-rcnn
# (sgd_solver.cpp:106), SSD (sgd_solver.cpp:105), SegNet (solver.cpp:486), Intel Caffe
# (sgd_solver.cpp:225); NVCaffe adds fields after it: 0.16.3 ", m = M" (sgd_solver.cpp:136),
# 0.16.6-0.17.0 ", m = M, wd = W, gs = G" (sgd_solver.cpp:170), 0.17.4 ", m = M, lrm = L,
# wd = W, gs = G" after the device (sgd_solver.cpp:180). The extra fields are kept by name.
_LR = re.compile(r"Iteration (\d+), lr = (%s)((?:, [A-Za-z_]\w* = %s)*)\s*$" % (_NUMBER, _NUMBER), re.I)
_LR_FIELD = re.compile(r", ([A-Za-z_]\w*) = (%s)" % _NUMBER, re.I)
_TESTING = re.compile(r"Iteration (\d+), Testing net \(#(\d+)\)")
# "    Train net output #k: name = v (* w = w*v loss)": BVLC solver.cpp:258 and every fork
# (caffe-fast-rcnn solver.cpp:245, SSD solver.cpp:237, SegNet solver.cpp:229, Intel Caffe
# solver.cpp:333, NVCaffe 0.16.6 solver.cpp:371); NVCaffe 0.17.4 puts its device first
# (solver.cpp:358: "    [0]     Train net output #k: ...").
_OUTPUT = re.compile(r"\s*(?:[\[(][\d.]+[\])]\s+)?(Train|Test) net output #(\d+): (\S+) = (%s)"
                     r"(?: \(\* (%s) = (%s) loss\))?\s*$" % (_NUMBER, _NUMBER, _NUMBER), re.I)
_TEST_LOSS = re.compile(r"Test loss: (%s)\s*$" % _NUMBER, re.I)
_CLIP = re.compile(r"Gradient clipping: scaling down gradients \(L2 norm (%s) > (%s)\) "
                   r"by scale factor (%s)" % (_NUMBER, _NUMBER, _NUMBER), re.I)
# A whole debug_info line, prefix (glog's, or none) included: one match per line.
_PREFIX_TEXT = r"[IWEF](?:\d{8}|\d{4}) \d\d:\d\d:\d\d\.\d{6} +\d+ [^\s\]:]+(?::\d+)?\] "
_FORWARD_LINE = re.compile(r"(%s)?\s*\[Forward\] Layer (\S+), (top|param) blob (\S+) data: (%s)\s*$"
                           % (_PREFIX_TEXT, _NUMBER), re.I)
_BACKWARD_LINE = re.compile(r"(%s)?\s*\[Backward\] Layer (\S+), (bottom|param) blob (\S+) diff: (%s)\s*$"
                            % (_PREFIX_TEXT, _NUMBER), re.I)
_FORWARD = re.compile(r"\s*\[Forward\] Layer (\S+), (top|param) blob (\S+) data: (%s)\s*$"
                      % _NUMBER, re.I)
_BACKWARD = re.compile(r"\s*\[Backward\] Layer (\S+), (bottom|param) blob (\S+) diff: (%s)\s*$"
                       % _NUMBER, re.I)
_NORMS = re.compile(r"\s*\[Backward\] All net params \(data, diff\): L1 norm = \((%s), (%s)\); "
                    r"L2 norm = \((%s), (%s)\)" % ((_NUMBER,) * 4), re.I)
_UPDATE = re.compile(r"\s*\[Update\] Layer (\S+), param (?:blob )?(\S+?)(?: \(owned by layer \S+, "
                     r"param \S+\))?(?: data: (%s);)? diff: (%s)\s*$" % (_NUMBER, _NUMBER), re.I)
_MULTISTEP = re.compile(r"MultiStep Status: Iteration (\d+), step = (\d+)")
_SNAPSHOT_ITER = re.compile(r"_iter_(\d+)\.solverstate(?:\.h5)?$")
_POLICY = re.compile(r"Learning Rate Policy: (\S*)")
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*): (.*)$")
_PYTHON_ERROR = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.*)$")
# How a process dies without a glog F line: glibc's heap checks, glog's failure signal
# handler, a C++ exception nobody caught (a Python layer's under the caffe binary).
_CRASH = re.compile(r"(terminate called|\*\*\* Aborted at|\*\*\* (SIG[A-Z]+) |double free|free\(\): |"
                    r"malloc\(\): |realloc\(\): |corrupted |munmap_chunk\(\)|Segmentation fault|"
                    r"Aborted \(core dumped\))")
_PROTO_LINE = re.compile(r"\s*(?:[A-Za-z_]\w*\s*\{|\}|[A-Za-z_]\w*:.*)?\s*$")
_FIELD = re.compile(r"\s*([A-Za-z_][\w]*)\s*:\s*(.*?)\s*$")

# A line a tool prints about the watch, without glog's prefix: "safe-layers train: WATCH
# summary: ..." (the watch's own text after "<program>: ").
_TOOL_WATCH = ": WATCH "

_BLOCK_SOLVER = "Initializing solver from parameters:"
_BLOCK_NET = "Initializing net from parameters:"


def to_float(text):
    """A number as Caffe prints it; 'nan', '-nan', 'inf', '-inf' included."""
    return float(text)


class LogEvent:
    """One fact read from a log line: ``kind``, ``line``, ``text`` (the whole line) and
    the kind's fields as attributes."""

    def __init__(self, kind, line, text=None, **fields):
        self.stamp = None     # glog's (date, time) of the line, set by the reader
        self.__dict__.update(fields)
        self.kind = kind
        self.line = line
        self.text = text      # the whole line as read (evidence to quote)

    def as_dict(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("text", "stamp")}

    def __repr__(self):
        return "LogEvent(%s@%d %s)" % (self.kind, self.line, self.as_dict())


class DebugEvent:
    """A ``forward`` or ``backward`` event (the bulk of a debug_info log), lighter than
    :class:`LogEvent`: layer, blob_kind, blob, value."""

    __slots__ = ("kind", "line", "text", "layer", "blob_kind", "blob", "value")

    def __init__(self, kind, line, text, layer, blob_kind, blob, value):
        self.kind, self.line, self.text = kind, line, text
        self.layer, self.blob_kind, self.blob, self.value = layer, blob_kind, blob, value

    def as_dict(self):
        return {"kind": self.kind, "line": self.line, "layer": self.layer,
                "blob_kind": self.blob_kind, "blob": self.blob, "value": self.value}

    def __repr__(self):
        return "DebugEvent(%s@%d %s)" % (self.kind, self.line, self.as_dict())


class LayerInfo:
    """A layer of a net as its parameter block in the log declares it."""

    __slots__ = ("name", "type", "bottoms", "tops", "loss_weights", "params")

    def __init__(self):
        self.name, self.type = None, None
        self.bottoms, self.tops, self.loss_weights = [], [], []
        self.params = {}   # "data_param.source" -> value (first occurrence), scalars only

    def as_dict(self):
        return {"name": self.name, "type": self.type, "bottoms": self.bottoms, "tops": self.tops,
                "loss_weights": self.loss_weights, "params": self.params}

    def __repr__(self):
        return "LayerInfo(%s: %s)" % (self.name, self.type)


def _unquote(value):
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape")
    return value


class _ParameterBlock:
    """A multi-line protobuf DebugString that follows "Initializing ... parameters:".

    Caffe logs it as one glog record: the lines after the first carry no prefix. Only
    what the diagnosis needs is kept (bounded by the net's size, whatever the log's)."""

    def __init__(self, kind, line):
        self.kind = kind
        self.line = line
        self.end_line = line
        self.depth = 0
        self.path = []
        self.fields = {}
        self.field_lines = {}
        self.field_texts = {}   # the field's line as the log has it (evidence quotes it)
        self.name = None
        self.phase = None
        self.layers = []
        self.layer = None

    def feed(self, text, line):
        self.end_line = line
        stripped = text.strip()
        if not stripped:
            return
        if stripped.endswith("{"):
            name = stripped[:-1].strip()
            if self.kind == "net" and self.depth == 0 and name == "layer":
                self.layer = LayerInfo()
                self.layers.append(self.layer)
            self.path.append(name)
            self.depth += 1
            return
        if stripped == "}":
            if self.path:
                self.path.pop()
            self.depth = max(0, self.depth - 1)
            if self.depth == 0:
                self.layer = None
            return
        match = _FIELD.match(stripped)
        if not match:
            return
        key, value = match.group(1), _unquote(match.group(2))
        if self.kind == "solver":
            if self.depth == 0 and key not in self.fields:
                self.fields[key] = value
                self.field_lines[key] = line
                self.field_texts[key] = stripped
            return
        if self.depth == 0:
            if key == "name":
                self.name = value
            return
        if self.path == ["state"] and key == "phase":
            self.phase = value
            return
        layer = self.layer
        if layer is None:
            return
        if self.depth == 1:
            if key == "name":
                layer.name = value
            elif key == "type":
                layer.type = value
            elif key == "bottom":
                layer.bottoms.append(value)
            elif key == "top":
                layer.tops.append(value)
            elif key == "loss_weight":
                layer.loss_weights.append(_safe_float(value))
            return
        dotted = ".".join(self.path[1:] + [key])
        layer.params.setdefault(dotted, value)

    def event(self):
        if self.kind == "solver":
            return LogEvent("solver", self.line, fields=self.fields, field_lines=self.field_lines,
                         field_texts=self.field_texts, end_line=self.end_line)
        return LogEvent("net", self.line, name=self.name, phase=self.phase or "TRAIN",
                     layers=self.layers, end_line=self.end_line)


def _safe_float(text):
    try:
        return float(text)
    except ValueError:
        return None


class LogReader:
    """Iterate over the events of a log file (a path, or a binary file object).

    Attributes after (or during) iteration: ``lines`` read, ``glog_lines`` with a glog
    prefix, ``events`` yielded, ``date_digits`` (4 or 8, of the first prefix seen).
    """

    def __init__(self, source, report_parser=None):
        self.source = source
        self.report_parser = report_parser
        self.lines = 0
        self.glog_lines = 0
        self.events = 0
        self.overlong = 0
        self._traceback = False
        self.date_digits = None
        self.tail = None

    def __iter__(self):
        if hasattr(self.source, "read"):  # a binary stream: read in chunks, split here
            yield from self._events(self.source)
        else:
            with open(self.source, "rb") as f:
                yield from self._events(f)

    def _lines(self, f):
        """(number, text) of each complete line, decoded; over-long lines skipped; the
        last line without its newline yielded as (number, None) with ``self.tail`` set.
        Reads 1 MB at a time, decodes and splits it in C: a binary file without newlines
        never sits in memory whole."""
        carry = b""
        skipping = False   # inside an over-long line, until its newline
        number = 0
        read = f.read
        while True:
            chunk = read(_CHUNK)
            if not chunk:
                break
            data = carry + chunk if carry else chunk
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                if len(carry) > MAX_LINE:
                    carry, skipping = b"", True
                continue
            carry = data[cut + 1:]
            # Cut at a newline, so no UTF-8 sequence is split.
            lines = data[:cut].decode("utf-8", "replace").split("\n")
            if skipping:
                lines[0] = None  # the end of an over-long line
                skipping = False
            for text in lines:
                number += 1
                if text is None or len(text) > MAX_LINE:
                    self.overlong += 1
                    continue
                yield number, text
            if len(carry) > MAX_LINE:
                carry, skipping = b"", True
        if skipping:
            number += 1
            self.overlong += 1
        elif carry:
            number += 1
            self.tail = carry
            self.lines = number
            yield number, None
            return
        self.lines = number

    def _events(self, f):
        block = None
        self.tail = None
        forward_line, backward_line = _FORWARD_LINE.match, _BACKWARD_LINE.match
        for number, text in self._lines(f):
            if text is None:
                # The last line, without its newline: still being written or cut off.
                yield LogEvent("incomplete", number, self.tail.decode("utf-8", "replace"))
                break
            if text.endswith("\r"):
                text = text[:-1]
            if block is None and "] Layer " in text:
                # Fast path for the bulk of a debug_info log: one match checks the prefix
                # (glog's or none) and reads the line.
                m = None
                if "[Forward] Layer " in text:
                    m, kind = forward_line(text), "forward"
                elif "[Backward] Layer " in text:
                    m, kind = backward_line(text), "backward"
                if m is not None:
                    prefix, layer, blob_kind, blob, value = m.groups()
                    if prefix:
                        self.glog_lines += 1
                    self.events += 1
                    yield DebugEvent(kind, number, text, layer, blob_kind, blob, float(value))
                    continue
            prefix = _PREFIX.match(text)
            if prefix is None:
                if block is not None:
                    if _PROTO_LINE.match(text):
                        block.feed(text, number)
                        continue
                    # Not protobuf text: the block ended (a log written without glog's
                    # prefix has no other sign of it).
                    self.events += 1
                    yield block.event()
                    block = None
                message = text
                severity = None
                source = None
            else:
                self.glog_lines += 1
                if self.date_digits is None:
                    self.date_digits = len(prefix.group(2))
                if block is not None:
                    self.events += 1
                    yield block.event()
                    block = None
                message = text[prefix.end():]
                severity = prefix.group(1)
                source = prefix.group(5)
            event = self._parse(message, number, severity, source)
            if event is None:
                continue
            if event.kind == "block":
                block = _ParameterBlock(event.block, number)
                continue
            event.text = text
            # glog's date (MMDD or YYYYMMDD) and time: when the line was written.
            event.stamp = (prefix.group(2), prefix.group(3)) if prefix is not None else None
            self.events += 1
            yield event
        if block is not None:
            self.events += 1
            yield block.event()

    def _parse(self, message, number, severity, source):
        """The event of one message, or None. One concept that reads best whole: the order of
        the tests is the meaning (a fatal line first, our own lines before Caffe's, whose
        patterns a report's text may contain), so the ladder stays in one place."""
        if severity == "F":
            return LogEvent("fatal", number, message=message.strip(), source=source)
        # Ours next: a report's text may hold "Iteration " or "loss = " of its own.
        if source == "safe_layers" or (severity is None and ("safe_layers] " in message
                                                             or _TOOL_WATCH in message)):
            return self._report(message, number, severity)
        # Cheap substring tests first: most lines of a debug_info log are [Forward] /
        # [Backward], and most lines of any log match nothing.
        if "[Forward]" in message:
            m = _FORWARD.match(message)
            if m:
                return LogEvent("forward", number, layer=m.group(1), blob_kind=m.group(2),
                             blob=m.group(3), value=float(m.group(4)))
            return None
        if "[Backward]" in message:
            m = _BACKWARD.match(message)
            if m:
                return LogEvent("backward", number, layer=m.group(1), blob_kind=m.group(2),
                             blob=m.group(3), value=float(m.group(4)))
            m = _NORMS.match(message)
            if m:
                return LogEvent("norms", number, l1_data=float(m.group(1)), l1_diff=float(m.group(2)),
                             l2_data=float(m.group(3)), l2_diff=float(m.group(4)))
            return None
        if "Iteration " in message:
            if "loss = " in message:
                m = _LOSS.search(message)
                if m:
                    return LogEvent("loss", number, iteration=int(m.group(1)), value=float(m.group(2)))
            elif "lr = " in message:
                m = _LR.search(message)
                if m:
                    extra = {k: float(v) for k, v in _LR_FIELD.findall(m.group(3))}
                    return LogEvent("lr", number, iteration=int(m.group(1)), value=float(m.group(2)),
                                    extra=extra)
            elif "Testing net" in message:
                m = _TESTING.search(message)
                if m:
                    return LogEvent("testing", number, iteration=int(m.group(1)), net=int(m.group(2)))
            elif "MultiStep" in message:
                m = _MULTISTEP.search(message)
                if m:
                    return LogEvent("multistep", number, iteration=int(m.group(1)), step=int(m.group(2)))
            return None
        if "net output #" in message:
            m = _OUTPUT.match(message)
            if m:
                weight = float(m.group(5)) if m.group(5) is not None else None
                weighted = float(m.group(6)) if m.group(6) is not None else None
                return LogEvent("output", number, phase=m.group(1).upper(), index=int(m.group(2)),
                             name=m.group(3), value=float(m.group(4)), weight=weight,
                             weighted=weighted)
            return None
        if message.startswith(_BLOCK_SOLVER):
            return LogEvent("block", number, block="solver")
        if message.startswith(_BLOCK_NET):
            return LogEvent("block", number, block="net")
        if "[Update]" in message:
            m = _UPDATE.match(message)
            if m:
                return LogEvent("update", number, layer=m.group(1), param=m.group(2),
                             data=float(m.group(3)) if m.group(3) is not None else None,
                             diff=float(m.group(4)))
            return None
        if message.startswith("Gradient clipping"):
            m = _CLIP.match(message)
            if m:
                return LogEvent("clip", number, norm=float(m.group(1)), limit=float(m.group(2)),
                             scale=float(m.group(3)))
            return None
        if message.lstrip().startswith("Test loss:"):
            m = _TEST_LOSS.match(message.lstrip())
            if m:
                return LogEvent("test_loss", number, value=float(m.group(1)))
            return None
        if message.startswith("Solving "):
            # solver.cpp:289 `Solving <net name>`: training starts (parse_log.py's zero of
            # Seconds, extract_seconds.py:38).
            return LogEvent("solving", number, net=message[len("Solving "):].strip())
        if "Learning Rate Policy:" in message:
            # BVLC solver.cpp:290 starts the line with it; NVCaffe 0.17.4 (solver.cpp:411)
            # writes "[0] Solving NAME Learning Rate Policy: P" on one line.
            m = _POLICY.search(message)
            return LogEvent("policy", number, policy=m.group(1)) if m else None
        if message.startswith("Optimization Done"):
            return LogEvent("done", number)
        if message.startswith("Resuming from "):
            # caffe.cpp (and safe-layers train): `Resuming from X.solverstate`; Caffe names
            # its snapshots <prefix>_iter_N, the only place the log says where it resumed.
            path = message[len("Resuming from "):].strip()
            m = _SNAPSHOT_ITER.search(path)
            return LogEvent("resume", number, path=path, iteration=int(m.group(1)) if m else None)
        if severity is None:
            m = _CRASH.match(message)
            if m:
                return LogEvent("crash", number, message=message.strip(), signal=m.group(2))
            if message.startswith("Traceback (most recent call last)"):
                self._traceback = True
                return None
            if self._traceback and not message[:1].isspace():
                # The line after a traceback's indented frames: "Module.Error: text".
                self._traceback = False
                m = _EXCEPTION.match(message)
                if m:
                    return LogEvent("python_error", number, message=message.strip(), error=m.group(1))
                return None
            m = _PYTHON_ERROR.match(message)
            if m:
                return LogEvent("python_error", number, message=message.strip(), error=m.group(1))
        return None

    def _report(self, message, number, severity):
        if self.report_parser is None:
            return None
        if severity is None and "safe_layers] " not in message:
            # `safe-layers train: WATCH summary: ...`, a tool's own line quoting the watch;
            # or `...NonFiniteError: WATCH ...`, the exception a stopping watch raises,
            # whose text is the report it printed.
            message = message[message.index(_TOOL_WATCH) + 2:]
            self._traceback = False
        try:
            report = self.report_parser(message)
        except Exception as exc:  # noqa: BLE001 - a line is never fatal to the reader
            return LogEvent("unreadable_report", number, error="%s: %s" % (type(exc).__name__, exc))
        if report is None:
            return None
        return LogEvent("report", number, report=report, severity=severity)


def read_log(source, report_parser=None):
    """Iterate over the events of ``source`` (see :class:`LogReader`)."""
    return iter(LogReader(source, report_parser))
