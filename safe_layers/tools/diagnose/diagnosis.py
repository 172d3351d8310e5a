"""The model of one training run, as its log tells it, fed event by event.

:class:`Diagnosis` takes the events of :class:`safe_layers.readers.caffe_log.LogReader`
(``feed``) and keeps what the rules ask about: the solver and nets declared, the loss, lr
and output tracks, the first non-finite value, debug_info's gradients and heatmap, our
layers' and a watch's reports, and how the run ended. The rules
(:mod:`safe_layers.tools.diagnose.rules`) read it; they never feed it.
"""

import collections

from safe_layers.core import lr_policy
from safe_layers.readers import layer_types
from safe_layers.reporting import watch_lines
from safe_layers.tools.diagnose.series import (Heatmap, Point, RunStarts, Series, Track, finite,
                                               fmt, worse)

GRADIENT_WINDOW = 8       # debug_info iterations kept per gradient before the first non-finite
ROLLBACKS_SHOWN = 6       # rollbacks named one by one in SL814 (all are counted)
SKIPS_SHOWN = 10          # skipped iterations named in SL814
MAX_OUTPUTS = 64          # train net outputs tracked


def _ignore(event):
    pass


class Diagnosis:
    """Everything the log says about the run, kept in memory bounded by the net's size
    (never by the log's length). Feed events with :meth:`feed`, then :meth:`finish`."""

    def __init__(self, path):
        self.path = path
        self._handlers = {}
        self.solver = None            # Event 'solver'
        self.run_start = 1            # the line this run starts at (several runs in one file)
        self.earlier_runs = RunStarts()  # the runs before it in the file
        self.resumed = None           # Event 'resume': `Resuming from X.solverstate`
        self.policy = None            # Event 'policy'
        self.nets = {}                # phase -> Event 'net' (the latest of each)
        self.iteration = None         # the latest 'Iteration N' of training
        self.last_finite_loss = None  # Point: the log's last (self.loss stops at the first failure)
        self.first_iteration = None
        self.loss = Track("loss")
        self.lr_series = Series()
        self.lr_first_bad = None      # Point: lr non-finite
        self.lr_first_negative = None
        self.lr_first_zero = None
        self.lr_last_positive = None
        self.outputs = {}             # name -> Track (train net outputs)
        self.test_iteration = None
        self.test_bad = None          # Point: first non-finite test output
        self.test_bad_name = None
        self.test_block = None        # the open test pass: {"losses": [...], "accuracies": [...]}
        self.false_accuracy = None    # {"first": (acc, loss), "last": (acc, loss), "passes": n}
        self.last_test_accuracy = None  # Point: the last test accuracy output (rules/dead.py)
        self.first_bad = None         # (Point, what) the first non-finite training value
        self.first_bad_label = None    # the first non-finite value in words, when a report found it
        self.first_bad_action = None   # ... and what that report's writer did about it
        # how it ended
        self.fatal = None
        self.crash = None
        self.crash_signal = None
        self.python_error = None
        self.done = False
        self.incomplete = None
        self.lines = 0
        self._start_debug_info()
        self._start_reports()

    def _start_debug_info(self):
        """What debug_info's [Forward]/[Backward] lines and gradient clipping tell."""
        self.in_test = False
        self.test_outputs_seen = False
        self.block_lines = 0          # debug lines of the open block (one iteration)
        self.block_column = {}        # its heatmap column: layer -> mean |diff|
        self.block_gradients = {}     # (layer, kind, blob) -> its worst backward event
        self.forward_order = []       # layers in forward order, as debug_info lists them
        self.forward_seen = set()
        self.gradients = {}           # (layer, kind, blob) -> deque of Point (before first bad)
        self.frozen_gradients = None
        self.first_bad_forward = None  # (Point, event) in the first bad debug block
        self.first_bad_forward_block = None   # the debug block it is in (debug_blocks then)
        self.first_bad_forward_param = None   # Point: that layer's own weights, non-finite too
        self.first_bad_backward = None
        self.pending_bad = []          # Points of the open block awaiting their iteration
        self.heatmap = Heatmap()
        self.debug_blocks = 0
        self.norms_bad = None
        self.clips = 0
        self.clip_first = None
        self.clip_max = None
        self.clip_bad = None

    def _start_reports(self):
        """What our layers' report lines and a watch's WATCH lines (read by
        safe_layers.reporting.watch_lines's parsers) tell."""
        self.reports = 0
        self.unreadable_reports = 0
        self.first_unreadable_report = None
        self.first_report = None       # (Event, fault dict)
        self.first_train_report = None
        self.report_layers = collections.OrderedDict()
        self.frozen = False            # the histories ended at a rollback (Track.freeze)
        self.segments = 1              # a rollback starts a new segment of the run
        self.skip_lines = 0
        self.skipped_in_all = 0        # the largest count a skip line gave
        self.skip_iterations = []      # the iterations skipped (a retried one once), the first few
        self.first_skip = None         # Point
        self.last_skip = None
        self.rollbacks = []            # [(Point, details)]: the first ROLLBACKS_SHOWN
        self.rollback_lines = 0
        self.last_rollback = None      # (Point, details)
        self.watch_stop = None         # (Point, fields, message): the watch stopped the run
        self.watch_summary = None      # (Point, fields): its summary line

    # ---- reading ----------------------------------------------------------------------

    def feed(self, event):
        handler = self._handlers.get(event.kind)
        if handler is None:
            handler = self._handlers[event.kind] = getattr(self, "_on_" + event.kind, _ignore)
        handler(event)

    def finish(self, lines):
        """The log ended: close the open debug_info block and test pass."""
        self.lines = lines
        self._close_block(None if self.iteration is None else self.iteration)
        self._close_test()  # the final test pass, when the log ends with it

    def _note_bad(self, point, what):
        if self.first_bad is None:
            self.first_bad = (point, what)
            self._freeze_gradients()

    def _note_report_bad(self, event, iteration, value, label, action):
        """The first failure, found by a report line (a layer's or a watch's)."""
        if self.first_bad is not None:
            return
        self._note_bad(Point(iteration, value, event.line, event.text), "report")
        self.first_bad_label, self.first_bad_action = label, action

    def _tracks(self):
        return [self.loss] + list(self.outputs.values())

    def _on_solver(self, event):
        self.solver = event

    def _on_resume(self, event):
        self.resumed = event

    def _on_policy(self, event):
        self.policy = event

    def _on_net(self, event):
        self.nets[event.phase] = event

    def _on_testing(self, event):
        self._close_test()
        self.test_block = {"losses": [], "accuracies": []}
        self.test_iteration = event.iteration
        self.in_test = True
        self.test_outputs_seen = False

    def _on_loss(self, event):
        self._close_test()
        self._close_block(event.iteration)
        self.in_test = False
        if self.first_iteration is None:
            self.first_iteration = event.iteration
        self.iteration = event.iteration
        point = Point(event.iteration, event.value, event.line, event.text)
        self.loss.add(point)
        if finite(event.value):
            self.last_finite_loss = point
        else:
            self._note_bad(point, "loss")

    def _on_output(self, event):
        if event.phase == "TEST":
            self._test_output(event)
            return
        track = self.outputs.get(event.name)
        if track is None:
            if len(self.outputs) >= MAX_OUTPUTS:
                return
            track = self.outputs[event.name] = Track(event.name, event.weight)
            if self.frozen:
                track.freeze()
        point = Point(self.iteration, event.value, event.line, event.text)
        track.add(point)
        if not finite(event.value) and (event.weight is None or event.weight != 0):
            self._note_bad(point, "output %s" % event.name)

    def _test_output(self, event):
        self.test_outputs_seen = True
        if self.test_block is not None:
            point = Point(self.test_iteration, event.value, event.line, event.text)
            if event.weight is not None and event.weight != 0:
                self.test_block["losses"].append((event.name, point))
            elif self._is_accuracy(event.name):
                self.test_block["accuracies"].append((event.name, point))
                self.last_test_accuracy = point
        if not finite(event.value) and self.test_bad is None:
            self.test_bad = Point(self.test_iteration, event.value, event.line, event.text)
            self.test_bad_name = event.name

    def _on_lr(self, event):
        point = Point(event.iteration, event.value, event.line, event.text)
        self.lr_series.add(event.iteration, event.value)
        self._note_rate(point)

    def _note_rate(self, point):
        """A learning rate the log gives (Caffe's `lr = R` line, or a watch's lr check)."""
        if not finite(point.value):
            if self.lr_first_bad is None:
                self.lr_first_bad = point
                self._note_bad(point, "lr")
        elif point.value < 0:
            if self.lr_first_negative is None:
                self.lr_first_negative = point
        elif point.value == 0:
            if self.lr_first_zero is None and self.lr_last_positive is not None:
                self.lr_first_zero = point
        else:
            self.lr_last_positive = point

    def _is_accuracy(self, output):
        """An Accuracy layer's top in the logged TEST net; without that net, the name."""
        net = self.nets.get("TEST")
        if net is not None and any(l.type == "Accuracy" for l in net.layers):
            return any(l.type == "Accuracy" and output in l.tops for l in net.layers)
        return "acc" in output.lower()

    def _close_test(self):
        """A test pass whose loss is non-finite: any accuracy beside it is not an accuracy
        (AccuracyLayer::Forward_cpu counts `score >= score[label]`; every comparison with a
        NaN is false, so a NaN-scored sample has no better prediction: counted correct)."""
        block, self.test_block = self.test_block, None
        if not block or not block["accuracies"]:
            return
        bad = [(name, p) for name, p in block["losses"] if not finite(p.value)]
        if not bad:
            return
        pair = (block["accuracies"][0], bad[0])
        if self.false_accuracy is None:
            self.false_accuracy = {"first": pair, "passes": 0}
        self.false_accuracy["last"] = pair
        self.false_accuracy["passes"] += 1

    # ---- debug_info and clipping ---------------------------------------------------------

    def _debug_phase_is_test(self):
        if self.in_test and self.test_outputs_seen:
            self.in_test = False
        return self.in_test

    def _on_forward(self, event):
        if self.in_test and self._debug_phase_is_test():
            return
        self.block_lines += 1
        layer = event.layer
        if layer not in self.forward_seen:
            self.forward_seen.add(layer)
            if len(self.forward_order) < 10000:
                self.forward_order.append(layer)
        if not finite(event.value):
            first = self.first_bad_forward
            if (first is not None and event.blob_kind == "param" and first[1].layer == layer
                    and self.first_bad_forward_block == self.debug_blocks
                    and self.first_bad_forward_param is None):
                # ForwardDebugInfo logs a layer's tops before its params (net.cpp:588-605): a
                # top non-finite because of the layer's own weights comes first.
                self.first_bad_forward_param = Point(first[0].iteration, event.value, event.line,
                                                     event.text)
            self._debug_bad(event)

    def _on_backward(self, event):
        if self.in_test and self._debug_phase_is_test():
            return
        self.block_lines += 1
        value = event.value
        # The heatmap column: the largest mean |diff| of each layer (a non-finite one wins).
        column = self.block_column
        held = column.get(event.layer)
        if held is None or worse(held, value) is not held:
            column[event.layer] = value
        # Gradient histories: iter_size > 1 logs a key once per pass; keep the worst.
        if self.frozen_gradients is None:
            key = (event.layer, event.blob_kind, event.blob)
            held = self.block_gradients.get(key)
            if held is None or worse(held.value, value) is not held.value:
                self.block_gradients[key] = event
        if not finite(value):
            self._debug_bad(event)

    def _debug_bad(self, event):
        point = Point(None, event.value, event.line, event.text)
        if event.kind == "forward" and self.first_bad_forward is None:
            self.first_bad_forward = (point, event)
            self.first_bad_forward_block = self.debug_blocks
            self.pending_bad.append(point)
        elif event.kind == "backward" and self.first_bad_backward is None:
            self.first_bad_backward = (point, event)
            self.pending_bad.append(point)
        self._note_bad(point, "%s %s" % (event.kind, event.layer))

    def _on_norms(self, event):
        if self.in_test and self._debug_phase_is_test():
            return
        if not finite(event.l2_diff) and self.norms_bad is None:
            self.norms_bad = Point(None, event.l2_diff, event.line, event.text)
            self.pending_bad.append(self.norms_bad)

    def _close_block(self, iteration):
        """The debug lines logged before 'Iteration N, loss' belong to iteration N."""
        for point in self.pending_bad:
            point.iteration = iteration
        self.pending_bad = []
        if not self.block_lines:
            return
        self.debug_blocks += 1
        self.heatmap.add(iteration, self.block_column)
        if self.frozen_gradients is None:
            for key, event in self.block_gradients.items():
                history = self.gradients.get(key)
                if history is None:
                    history = self.gradients[key] = collections.deque(maxlen=GRADIENT_WINDOW)
                history.append(Point(iteration, event.value, event.line, event.text))
        self.block_lines = 0
        self.block_column = {}
        self.block_gradients = {}

    def _freeze_gradients(self):
        if self.frozen_gradients is None:
            self.frozen_gradients = {k: list(v) for k, v in self.gradients.items()}
            self.gradients = {}

    def _on_clip(self, event):
        self.clips += 1
        point = Point(self.iteration, event.norm, event.line, event.text)
        if self.clip_first is None:
            self.clip_first = point
        if not finite(event.norm):
            if self.clip_bad is None:
                self.clip_bad = point
        elif self.clip_max is None or event.norm > self.clip_max.value:
            self.clip_max = point

    # ---- our layers' and a watch's reports -------------------------------------------------

    def _on_report(self, event):
        """A line of our layers or of a watch (parsed by safe_layers.reporting.parse_line)."""
        fields = event.report.watch if getattr(event.report, "kind", None) == "watch" else None
        if fields is not None and self._on_watch(event, fields):
            return
        fault = report_fault(event.report)
        if fault is None:
            return
        self.reports += 1
        name = fault["layer"]
        self.report_layers[name] = self.report_layers.get(name, 0) + 1
        if self.first_report is None:
            self.first_report = (event, fault)
        if self.first_train_report is None and fault["phase"] != "TEST":
            self.first_train_report = (event, fault)
            label = "%s '%s' %s" % (fault["layer_type"] or "layer", fault["layer"], fault["what"])
            self._note_report_bad(event, fault["iteration"], fault_value(fault), label, fault["action"])

    def _on_watch(self, event, fields):
        """A watch's line (``fields``: what safe_layers.reporting.watch_lines.parse_line read).
        True when it is taken here; False for a producer line (read as a report)."""
        kind = fields.get("kind")
        message = event.report.message
        if fields.get("action") == "stop":
            if self.watch_stop is None:
                self.watch_stop = (Point(fields.get("iteration"), None, event.line, event.text),
                                   fields, message)
            elif self.watch_stop[2] == message:
                return True  # the same report again: `safe-layers train` ends by repeating it
        if kind == "skip":
            self._on_skip(Point(fields["iteration"], None, event.line, event.text), fields)
            return True
        if kind == "rollback":
            self._on_rollback(Point(fields["iteration"], None, event.line, event.text),
                              watch_event_details(fields))
            return True
        if kind == "summary":
            self.watch_summary = (Point(None, None, event.line, event.text), fields)
            return True
        if kind == "lr":
            # The watch checks the rate before Caffe logs it: a bad policy stops the run at
            # iteration 0 with no "lr = nan" line of Caffe's; its message (written by
            # lr_policy.describe) is read back by lr_policy.parse_described.
            described = lr_policy.parse_described(fields.get("message", ""))
            if described is not None and (not finite(described["lr"]) or described["lr"] < 0):
                self._note_rate(Point(described["iteration"], described["lr"], event.line, event.text))
            return True
        if kind in ("loss", "gradients", "weights", "stopped") and fields.get("phase") != "TEST":
            # The solver-level checks: a failure even where no layer's line came first
            # (a watch without check_layers).
            self._note_report_bad(event, fields["iteration"], None,
                                  "watch %s: %s" % (kind, fields["message"].split("; ")[0]),
                                  fields["action"])
            return True
        return kind != "producer"

    def _on_skip(self, point, fields):
        """A watch skipped an iteration (it is retried with the next batch)."""
        self.skip_lines += 1
        self.skipped_in_all = max(self.skipped_in_all,
                                  watch_event_details(fields).get("skipped", 0))
        if fields["iteration"] not in self.skip_iterations[-1:]:
            # A skipped iteration is retried with the next batch: repeats are one entry.
            self.skip_iterations.append(fields["iteration"])
            del self.skip_iterations[SKIPS_SHOWN + 1:]
        self.first_skip = self.first_skip or point
        self.last_skip = point

    def _on_rollback(self, point, details):
        """A rollback: the solver is back at a checkpoint and the iterations that follow
        are a new segment. The cause belongs to the segment of the first failure: with
        one found, the histories are closed; without (a log that starts mid-run), the
        new segment starts them over."""
        self.rollback_lines += 1
        if len(self.rollbacks) < ROLLBACKS_SHOWN:
            self.rollbacks.append((point, details))
        self.last_rollback = (point, details)
        self.segments += 1
        if self.first_bad is not None:
            self.frozen = True
            for track in self._tracks():
                track.freeze()
        else:
            for track in self._tracks():
                track.reset()
            self.gradients = {}

    def _on_unreadable_report(self, event):
        self.unreadable_reports += 1
        if self.first_unreadable_report is None:
            self.first_unreadable_report = event

    # ---- how it ended ------------------------------------------------------------------------

    def _on_fatal(self, event):
        if self.fatal is None:
            self.fatal = event

    def _on_crash(self, event):
        if self.crash is None:
            self.crash = event
        if event.signal and self.crash_signal is None:
            self.crash_signal = event

    def _on_python_error(self, event):
        if self.python_error is None:
            self.python_error = event

    def _on_done(self, event):
        self.done = self.done or event  # the first "Optimization Done." (Solver's, then caffe.cpp's)

    def _on_incomplete(self, event):
        self.incomplete = event

    # ---- what the net and the solver declare ----------------------------------------------

    def train_layers(self):
        net = self.nets.get("TRAIN")
        return net.layers if net is not None else []

    def layer_named(self, name):
        for layer in self.train_layers():
            if layer.name == name:
                return layer
        return None

    def producer_of(self, blob):
        found = None
        for layer in self.train_layers():
            if blob in layer.tops:
                found = layer
        return found

    def data_layers(self):
        return [l for l in self.train_layers() if l.type in layer_types.ALL_DATA]

    def solver_field(self, name):
        if self.solver is None:
            return None
        return self.solver.fields.get(name)

    def solver_line(self, name):
        if self.solver is None:
            return None
        return self.solver.field_lines.get(name)

    def solver_point(self, field):
        """The solver's line that sets ``field``, as evidence (None when not logged)."""
        line = self.solver_line(field)
        if line is None:
            return None
        text = getattr(self.solver, "field_texts", {}).get(field)
        return Point(None, None, line, text or "%s: %s" % (field, self.solver.fields[field]))

    def lr_policy(self):
        if self.solver is not None and "lr_policy" in self.solver.fields:
            return self.solver.fields["lr_policy"]
        if self.policy is not None:
            return self.policy.policy
        return None

    # ---- what the run came to -----------------------------------------------------------------

    def loss_tracks(self):
        """The training losses: the weighted train outputs, else the smoothed loss."""
        tracks = [t for t in self.outputs.values() if t.weight is not None and t.weight != 0]
        return tracks or [self.loss]

    def first_bad_words(self):
        """The first non-finite value in words: 'loss = nan', or what the report that
        found it names ("EuclideanLoss 'loss' forward top 'loss' data = inf")."""
        point, what = self.first_bad
        label = self.first_bad_label or what
        return label if point.value is None else "%s = %s" % (label, fmt(point.value))

    def skipped(self):
        """Iterations the watch skipped: its summary's count, else the most its skip lines
        tell (past ``log_first`` it prints only every ``log_every``-th skip)."""
        if self.watch_summary is not None:
            return self.watch_summary[1]["skipped"]
        return max(self.skip_lines, self.skipped_in_all)

    def rollback_count(self):
        if self.watch_summary is not None:
            return self.watch_summary[1]["rollbacks"]
        last = self.last_rollback[1].get("rollbacks", 0) if self.last_rollback else 0
        return max(self.rollback_lines, last)

    def ending(self):
        """How the run ended: 'stopped' (by the watch), 'finished', 'aborted' (a Caffe
        CHECK, a crash, a Python exception) or 'cut off' (the log just ends)."""
        if self.done:
            return "finished"
        if self.watch_stop is not None:
            return "stopped"
        if self.fatal is not None or self.crash is not None or self.python_error is not None:
            return "aborted"
        return "cut off"


def fault_value(fault):
    """The first bad value of a fault (a :func:`report_fault` dict): the one its report
    printed when that is non-finite, else the worst kind its counts hold (nan, +inf,
    -inf), else the out-of-range value."""
    value = fault.get("first_value")
    if value is not None and not finite(value):
        return value
    for key, kind in (("nan", float("nan")), ("posinf", float("inf")), ("neginf", float("-inf"))):
        if fault.get(key):
            return kind
    return value


def watch_event_details(fields):
    """What a watch's skip / rollback line says, read by the parser beside its writer."""
    # Deferred: importing safe_layers.reporting (the layers' runtime: kernels, the live
    # layer registry) is kept out of `safe-layers --help`; a log with WATCH lines needs it.
    return watch_lines.event_details(fields)


def report_fault(line):
    """The fault a parsed report line tells (a dict: source 'layer' or 'watch', layer,
    layer_type, follows, phase, iteration, what, nan, posinf, neginf, first_index, action,
    note), or None for a line that is not about a fault (summaries, statistics, notes).

    ``line`` is what ``safe_layers.reporting.parse_line`` returns; its attributes are
    read here, its text never re-parsed."""
    kind = getattr(line, "kind", None)
    if kind in ("fault", "abort", "abort_report"):
        report = line.report
        return {"source": "layer", "layer": report.layer, "layer_type": report.layer_type,
                "follows": report.follows, "phase": report.phase, "iteration": report.iteration,
                "what": report.pass_, "nan": report.nan, "posinf": report.posinf,
                "neginf": report.neginf, "first_index": report.first_index,
                "first_value": report.first_value, "action": report.action,
                "note": report.detail or ""}
    if kind == "watch":
        fields = line.watch or {}
        if fields.get("kind") != "producer":
            return None
        return {"source": "watch", "layer": fields["layer"], "layer_type": fields["layer_type"],
                "follows": None, "phase": fields["phase"], "iteration": fields["iteration"],
                "what": "%s %s '%s' %s" % (fields["pass"], fields["role"], fields["blob"], fields["what"]),
                "nan": fields["nan"], "posinf": fields["posinf"], "neginf": fields["neginf"],
                "first_index": fields["first_index"], "first_value": fields["first_value"],
                "action": fields["action"], "note": fields["note"]}
    return None
