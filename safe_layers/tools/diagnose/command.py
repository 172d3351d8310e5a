"""Say what killed a Caffe training run, from its log, with the lines that prove it.

    safe-layers diagnose train.log
    safe-layers diagnose train.log --plot train.png --format json

Reads a log of `caffe train`, of pycaffe (glog on stderr) or of `safe-layers train`, also
one still being written or cut off, in one streaming pass (memory does not grow with the
log). Finds the first iteration where anything went non-finite and classifies it in the
six known causes of NaN in Caffe training:

  SL801 bad learning-rate policy: lr itself non-finite or negative; names the policy
        and the solver field to fix (``poly`` without ``max_iter`` ...)
  SL802 exploding gradients: the loss climbed an order of magnitude or more above its
        first value before it went non-finite; with several losses, names the output that exploded and its weight
  SL803 faulty input or loss layer: the loss was falling (or flat), then suddenly
        non-finite; names the data layer's source to ``scan`` and where to guard
  SL807 non-finite from the first iteration: the net computes NaN on its first batch
  SL804 with debug_info: the first layer, in forward order, whose output (or weights)
        went non-finite
  SL805 with debug_info: the gradient that grew fastest in the iterations before
  SL806 a safe_layers layer's report: the layer, pass and iteration it caught
  SL808 the run aborted (a Caffe CHECK / LOG(FATAL), a Python layer's exception)
  SL809 a test net output non-finite while training stayed finite
  SL810 gradient clipping: how often, and a non-finite norm it let through
  SL811 the learning rate reached 0: nothing learns from there on
  SL812 the run finished without a single training iteration (``max_iter`` 0 or unset:
        `caffe train` stops at once, and its final test reports an untrained net)
  SL813 a test accuracy printed beside a non-finite test loss: Caffe's Accuracy layer counts
        a sample whose true-class score is NaN as correct, so a dead net scores 1.0
  SL814 what a watch did (``safe-layers train``, ``safe_layers.watch``): the iterations it
        skipped, its rollbacks (from which iteration to which checkpoint, base_lr before
        and after), and how the run ended (finished, stopped by the watch, cut off)

A rollback sends the run back to a checkpoint: the iterations after it are a new segment
of the run. The cause (SL802/SL803/SL807 and their evidence) is read from the segment the
first failure happened in; the iterations a rollback replays are left out of it.

Exit 0 when nothing went wrong, 1 when a cause was found, 2 when the file is not a
readable Caffe log.
"""

import collections
import math
import os
import re
import sys
import zlib

from safe_layers.core import lr_policy
from safe_layers.core.errors import InputError
from safe_layers.readers import layer_types
from safe_layers.readers.caffe_log import LogReader
from safe_layers.tools import findings as findings_module
from safe_layers.tools.findings import Finding

HELP = "explain a dead Caffe run from its training log: cause, iteration, layer, evidence lines"

# The loss climbed at least this many times above its first value (an order of magnitude)
# before the NaN (Track.growth): a softmax
# loss grows only linearly with the logits, so a classifier blown up by a high base_lr
# (measured: 2.3 -> 72.8, 31x, then NaN, examples/demo.py high_lr) rarely shows more.
EXPLODING_RATIO = 10.0
RISING_RATIO = 1000.0     # ... and, with nothing non-finite yet, 1000x up to the log's end
WINDOW = 64               # finite losses kept before the first non-finite one
GRADIENT_WINDOW = 8       # debug_info iterations kept per gradient before the first non-finite
SERIES_POINTS = 2048      # points kept per plotted curve, whatever the log's length
HEATMAP_COLUMNS = 400     # debug_info iterations kept for the heatmap

# Every rule of this command: id -> what it is about. --select / --ignore are checked
# against these ids; the module docstring and README's table list the same.
RULES = {
    "SL801": "bad learning-rate policy",
    "SL802": "exploding gradients",
    "SL803": "faulty input or loss layer",
    "SL804": "debug_info: the first non-finite layer",
    "SL805": "debug_info: the gradient that grew fastest",
    "SL806": "a report of our layers or of a watch",
    "SL807": "non-finite from the first iteration",
    "SL808": "the run aborted",
    "SL809": "a test net non-finite while training stayed finite",
    "SL810": "gradient clipping",
    "SL811": "the learning rate reached 0",
    "SL812": "no training iteration",
    "SL813": "an accuracy beside a non-finite test loss",
    "SL814": "what the watch did",
}
KNOWN_RULE_IDS = tuple(RULES)

ROLLBACKS_SHOWN = 6       # rollbacks named one by one in SL814 (all are counted)
SKIPS_SHOWN = 10          # skipped iterations named in SL814

DATA_LAYERS = layer_types.ALL_DATA


def add_arguments(parser):
    parser.add_argument("log", help="a Caffe training log (caffe train, pycaffe, safe-layers train; "
                        "gzipped too; - for standard input)")
    parser.add_argument("--plot", metavar="PNG",
                        help="write loss and lr over iterations (log scale, first non-finite point "
                             "marked) and, with debug_info, a per-layer heatmap of mean |diff|")
    parser.add_argument("--select", metavar="IDS", help="only these rule ids or prefixes (SL80,SL811)")
    parser.add_argument("--ignore", metavar="IDS", help="leave out these rule ids or prefixes")
    findings_module.add_format_argument(parser)


def finite(value):
    return value is not None and math.isfinite(value)


def fmt(value):
    if value is None:
        return "?"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return "%.6g" % value


class Series:
    """(x, y) points of a curve, at most ``capacity`` of them: when full, every other
    point is dropped and only every ``stride``-th point is taken from then on, so a log
    of any length plots in bounded memory. Non-finite points are always kept."""

    def __init__(self, capacity=SERIES_POINTS):
        self.capacity = capacity
        self.stride = 1
        self.seen = 0
        self.points = []

    def add(self, x, y):
        self.seen += 1
        if self.seen % self.stride and math.isfinite(y):
            return
        self.points.append((x, y))
        if len(self.points) > self.capacity:
            self.points = [p for i, p in enumerate(self.points) if i % 2 == 0 or not math.isfinite(p[1])]
            self.stride *= 2


class Point:
    """A value read at an iteration, with its line (evidence)."""

    __slots__ = ("iteration", "value", "line", "text")

    def __init__(self, iteration, value, line, text):
        self.iteration, self.value, self.line, self.text = iteration, value, line, text

    def as_dict(self):
        return {"iteration": self.iteration, "value": self.value, "line": self.line}


class Track:
    """One quantity over iterations: its first value, its smallest and last finite value
    before it first went non-finite, and that first non-finite value.

    :meth:`freeze` ends the history at a rollback: the iterations replayed after it are
    another segment of the run, computed with other weights (and often another base_lr),
    and tell nothing of how the first failure came about."""

    def __init__(self, name, weight=None):
        self.name = name
        self.weight = weight
        self.series = Series()
        self.reset()

    def reset(self):
        """Forget the history (not the plotted series): a new segment of the run starts."""
        self.first = None
        self.minimum = None
        self.last = None
        self.peak_after_min = None   # largest finite value after the minimum
        self.bad = None
        self.recovered = None        # the first finite value after ``bad``
        self.frozen = False

    def freeze(self):
        """Take no more values into the history (the plotted series goes on)."""
        self.frozen = True

    def add(self, point):
        if point.iteration is not None:
            self.series.add(point.iteration, point.value)
        if self.frozen:
            return
        if self.bad is not None:
            if self.recovered is None and finite(point.value):
                self.recovered = point
            return
        if not finite(point.value):
            self.bad = point
            return
        if self.first is None:
            self.first = point
        if self.minimum is None or point.value < self.minimum.value:
            self.minimum = point
            self.peak_after_min = point
        elif point.value > self.peak_after_min.value:
            self.peak_after_min = point
        self.last = point

    def rise(self):
        """How many times the value grew from its minimum to its last finite value before
        going non-finite (1.0 when it did not grow; None without a finite history)."""
        if self.minimum is None or self.last is None:
            return None
        low = self.minimum.value
        high = max(self.last.value, self.peak_after_min.value)
        if low <= 0:
            return float("inf") if high > 0 and low == 0 else None
        return high / low


    def growth(self):
        """How many times the value's peak (after its minimum, up to its last finite value)
        exceeds its first value: an explosion climbs above where training started, while a
        loss that trained down to 0.01 and wanders to 0.1 has risen 10x from its minimum
        but not grown. Falls back to :meth:`rise` when the first value is not positive."""
        if self.first is None or self.first.value <= 0:
            return self.rise()
        return max(self.last.value, self.peak_after_min.value) / self.first.value


class Heatmap:
    """Mean |diff| per layer per debug_info iteration, at most ``columns`` columns
    (adjacent ones merged by maximum, a non-finite value winning)."""

    def __init__(self, columns=HEATMAP_COLUMNS):
        self.capacity = columns
        self.columns = []   # [(iteration, {layer: value})]

    def add(self, iteration, values):
        self.columns.append((iteration, values))
        if len(self.columns) > self.capacity:
            merged = []
            for i in range(0, len(self.columns) - 1, 2):
                (it, a), (_, b) = self.columns[i], self.columns[i + 1]
                merged.append((it, {k: _worse(a.get(k), b.get(k)) for k in set(a) | set(b)}))
            if len(self.columns) % 2:
                merged.append(self.columns[-1])
            self.columns = merged


def _ignore(event):
    pass


def _worse(a, b):
    if a is None:
        return b
    if b is None:
        return a
    if not math.isfinite(a):
        return a
    if not math.isfinite(b):
        return b
    return max(a, b)


class Diagnosis:
    """Everything the log says about the run, kept in memory bounded by the net's size
    (never by the log's length). Feed events with :meth:`feed`, then :meth:`findings`."""

    def __init__(self, path):
        self.path = path
        self._handlers = {}
        self.solver = None            # Event 'solver'
        self.run_start = 1            # the line this run starts at (several runs in one file)
        self.earlier_runs = []        # the first lines of the runs before it in the file
        self.resumed = None           # Event 'resume': `Resuming from X.solverstate`
        self.policy = None            # Event 'policy'
        self.nets = {}                # phase -> Event 'net' (the latest of each)
        self.iteration = None         # the latest 'Iteration N' of training
        self.last_finite_loss = None  # Point: the log's last (self.loss stops at the first failure)
        self.first_iteration = None
        self.loss = Track("loss")
        self.lr = Track("lr")
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
        self.first_bad = None         # (Point, what) the first non-finite training value
        # debug_info
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
        self.first_bad_backward = None
        self.pending_bad = []          # Points of the open block awaiting their iteration
        self.heatmap = Heatmap()
        self.debug_blocks = 0
        self.norms_bad = None
        # clipping
        self.clips = 0
        self.clip_first = None
        self.clip_max = None
        self.clip_bad = None
        # our layers' reports
        self.reports = 0
        self.unreadable_reports = 0
        self.first_unreadable_report = None
        self.first_report = None       # (Event, fault dict)
        self.first_train_report = None
        self.report_layers = collections.OrderedDict()
        # how it ended
        self.fatal = None
        self.crash = None
        self.crash_signal = None
        self.python_error = None
        self.done = False
        self.incomplete = None
        self.lines = 0
        # what a watch did (its WATCH lines, read by safe_layers.reporting.watch_lines's parsers)
        self.first_bad_label = None    # the first non-finite value in words, when a report found it
        self.first_bad_action = None   # ... and what that report's writer did about it
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
            self.test_outputs_seen = True
            if self.test_block is not None:
                point = Point(self.test_iteration, event.value, event.line, event.text)
                if event.weight is not None and event.weight != 0:
                    self.test_block["losses"].append((event.name, point))
                elif self._is_accuracy(event.name):
                    self.test_block["accuracies"].append((event.name, point))
            if not finite(event.value) and self.test_bad is None:
                self.test_bad = Point(self.test_iteration, event.value, event.line, event.text)
                self.test_bad_name = event.name
            return
        track = self.outputs.get(event.name)
        if track is None:
            if len(self.outputs) >= 64:
                return
            track = self.outputs[event.name] = Track(event.name, event.weight)
            if self.frozen:
                track.freeze()
        point = Point(self.iteration, event.value, event.line, event.text)
        track.add(point)
        if not finite(event.value) and (event.weight is None or event.weight != 0):
            self._note_bad(point, "output %s" % event.name)

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
            self._debug_bad(event)

    def _on_backward(self, event):
        if self.in_test and self._debug_phase_is_test():
            return
        self.block_lines += 1
        value = event.value
        # The heatmap column: the largest mean |diff| of each layer (a non-finite one wins).
        column = self.block_column
        held = column.get(event.layer)
        if held is None or _worse(held, value) is not held:
            column[event.layer] = value
        # Gradient histories: iter_size > 1 logs a key once per pass; keep the worst.
        if self.frozen_gradients is None:
            key = (event.layer, event.blob_kind, event.blob)
            held = self.block_gradients.get(key)
            if held is None or _worse(held.value, value) is not held.value:
                self.block_gradients[key] = event
        if not finite(value):
            self._debug_bad(event)

    def _debug_bad(self, event):
        point = Point(None, event.value, event.line, event.text)
        if event.kind == "forward" and self.first_bad_forward is None:
            self.first_bad_forward = (point, event)
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
            point = Point(fields["iteration"], None, event.line, event.text)
            self.skip_lines += 1
            self.skipped_in_all = max(self.skipped_in_all,
                                      watch_event_details(fields).get("skipped", 0))
            if fields["iteration"] not in self.skip_iterations[-1:]:
                # A skipped iteration is retried with the next batch: repeats are one entry.
                self.skip_iterations.append(fields["iteration"])
                del self.skip_iterations[SKIPS_SHOWN + 1:]
            self.first_skip = self.first_skip or point
            self.last_skip = point
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

    def finish(self, lines):
        self.lines = lines
        self._close_block(None if self.iteration is None else self.iteration)

    # ---- what the net declares ----------------------------------------------------------

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
        return [l for l in self.train_layers() if l.type in DATA_LAYERS]

    def solver_field(self, name):
        if self.solver is None:
            return None
        return self.solver.fields.get(name)

    def solver_line(self, name):
        if self.solver is None:
            return None
        return self.solver.field_lines.get(name)

    def lr_policy(self):
        if self.solver is not None and "lr_policy" in self.solver.fields:
            return self.solver.fields["lr_policy"]
        if self.policy is not None:
            return self.policy.policy
        return None

    # ---- verdicts ------------------------------------------------------------------------

    def findings(self):
        out = []
        lr_finding = self._lr_policy_finding()
        if lr_finding:
            out.append(lr_finding)
        cause = None
        if lr_finding is None and self.first_bad is not None:
            cause = self._trend_finding()
        elif lr_finding is None:
            cause = self._rising_finding()
        if cause:
            out.append(cause)
        out.extend(self._debug_findings(cause))
        out.extend(self._report_findings())
        out.extend(self._abort_findings(bool(out)))
        watched = self._watch_finding()
        if watched:
            out.append(watched)
        out.extend(self._test_findings())
        out.extend(self._clip_findings())
        zero = self._lr_zero_finding()
        if zero:
            out.append(zero)
        idle = self._no_training_finding()
        if idle:
            out.append(idle)
        accuracy = self._false_accuracy_finding()
        if accuracy:
            out.append(accuracy)
        return out

    def first_bad_words(self):
        """The first non-finite value in words: 'loss = nan', or what the report that
        found it names ("EuclideanLoss 'loss' forward top 'loss' data = inf")."""
        point, what = self.first_bad
        label = self.first_bad_label or what
        return label if point.value is None else "%s = %s" % (label, fmt(point.value))

    def _finding(self, rule, severity, point, message, fix, evidence, layer=None, **data):
        if rule not in RULES:
            raise ValueError("rule %s is not in diagnose.RULES" % rule)
        evidence = [p for p in evidence if p is not None and p.line is not None]
        seen, unique = set(), []
        for p in sorted(evidence, key=lambda p: p.line):
            if p.line not in seen:
                seen.add(p.line)
                unique.append(p)
        data["evidence"] = [{"line": p.line, "text": p.text} for p in unique]
        if point is not None and point.iteration is not None:
            data.setdefault("iteration", point.iteration)
        return Finding(self.path, point.line if point is not None else 0, 1 if point is not None else 0,
                       rule, severity, message, fix, layer=layer, data=data)

    def _solver_point(self, field):
        line = self.solver_line(field)
        if line is None:
            return None
        text = getattr(self.solver, "field_texts", {}).get(field)
        return Point(None, None, line, text or "%s: %s" % (field, self.solver.fields[field]))

    def _lr_policy_finding(self):
        bad = self.lr_first_bad or self.lr_first_negative
        if bad is None:
            return None
        policy = self.lr_policy()
        fields = dict(self.solver.fields) if self.solver is not None else {}
        if policy:
            fields["lr_policy"] = policy
        if self.solver is None and policy is None:
            field, why = None, "the log does not show the solver's parameters"
            fix = "fix the solver fields lr_policy reads (SGDSolver::GetLearningRate, sgd_solver.cpp:27-70)"
        else:
            param = lr_policy.LogFields(fields)
            field, why = lr_policy.explain(param, bad.iteration, bad.value)
            fix = lr_policy.fix(param, bad.iteration, bad.value)
        what = "non-finite" if not finite(bad.value) else "negative"
        message = ("bad learning-rate policy: lr = %s (%s) at iteration %s%s; %s"
                   % (fmt(bad.value), what, bad.iteration,
                      ", lr_policy \"%s\"" % policy if policy else "", why))
        if self.first_bad is not None and self.first_bad[1] != "lr":
            point, what_bad = self.first_bad
            if point.line > bad.line:
                message += "; the loss went non-finite after it (line %d)" % point.line
        fix += "; `safe-layers lint SOLVER` simulates the schedule before training"
        evidence = [bad, self._solver_point("lr_policy"), self._solver_point(field) if field else None]
        after = self.loss.bad
        if after is not None and after.line > bad.line:
            evidence.append(after)
        return self._finding("SL801", "error", bad, message, fix, evidence, policy=policy, field=field,
                             lr=bad.value)

    def _loss_tracks(self):
        """The training losses: the weighted train outputs, else the smoothed loss."""
        tracks = [t for t in self.outputs.values() if t.weight is not None and t.weight != 0]
        return tracks or [self.loss]

    def _trend_finding(self):
        point, what = self.first_bad
        tracks = self._loss_tracks()
        history = [t for t in tracks if t.minimum is not None]
        bad_tracks = [t for t in tracks if t.bad is not None]
        if not history and self.loss.minimum is None:
            return self._from_start_finding(point)
        caught = what == "report" and not bad_tracks and self.loss.bad is None
        # The loss that went wrong first; the one that grew most if none did.
        if bad_tracks:
            culprit = min(bad_tracks, key=lambda t: t.bad.line)
        else:
            culprit = max(history, key=lambda t: t.rise() or 0)
        if culprit.minimum is None:
            culprit = self.loss if self.loss.minimum is not None else culprit
        if culprit.minimum is None:
            return self._from_start_finding(point)
        rise = culprit.rise() or 1.0
        bad_value = culprit.bad.value if culprit.bad is not None else (
            self.loss.bad.value if self.loss.bad is not None else point.value)
        exploding = (culprit.growth() or 0) >= EXPLODING_RATIO
        if caught and not exploding:
            return None  # a guard or watch caught it while the loss was sane: SL806 says where
        bad_point = culprit.bad or self.loss.bad or point
        several = len([t for t in tracks if t is not self.loss]) > 1
        low, high = culprit.minimum, max(culprit.last, culprit.peak_after_min, key=lambda p: p.value)
        name = "" if culprit is self.loss or not several else " '%s'" % culprit.name
        if exploding:
            base_lr = self.solver_field("base_lr")
            if not caught:
                then = "then became %s at iteration %s" % (fmt(bad_point.value), bad_point.iteration)
            elif self.first_bad_action in ("stop", "abort"):
                then = "until a report stopped it at iteration %s (line %d)" % (
                    bad_point.iteration, bad_point.line)
            else:
                then = "until a report caught it at iteration %s (line %d%s)" % (
                    bad_point.iteration, bad_point.line, ", action=%s" % self.first_bad_action
                    if self.first_bad_action not in (None, "report") else "")
            message = ("exploding gradients: the loss%s rose from %s (iteration %s) to %s (iteration "
                       "%s), %.1f orders of magnitude, %s"
                       % (name, fmt(low.value), low.iteration, fmt(high.value), high.iteration,
                          math.log10(rise) if finite(rise) else float("inf"), then))
            fix = ("lower base_lr%s by at least 10x" % (" (%s)" % base_lr if base_lr else ""))
            layer = None
            data = {"cause": "exploding gradients", "rise": rise}
            if several:
                producer = self.producer_of(culprit.name)
                layer = producer.name if producer is not None else culprit.name
                others = ["'%s' %s" % (t.name, "also went non-finite" if t.bad is not None else
                                       "stayed within %.0fx" % (t.rise() or 1.0))
                          for t in tracks if t is not culprit and t is not self.loss]
                message += ("; of %d losses, '%s' (loss_weight %s, layer '%s') exploded first; %s"
                            % (len(tracks), culprit.name, fmt(culprit.weight), layer, ", ".join(others)))
                fix = ("lower the loss_weight of layer '%s' (now %s) by 10x or more, or base_lr; a "
                       "GradientClip layer between '%s' and its bottom limits that loss's gradient "
                       "alone" % (layer, fmt(culprit.weight), layer))
                data["output"] = culprit.name
                data["loss_weight"] = culprit.weight
            else:
                fix += "; or bound the gradient: clip_gradients in the solver, or a GradientClip layer above the loss"
            evidence = [low, high, bad_point, self._solver_point("base_lr")]
            return self._finding("SL802", "error", bad_point, message, fix, evidence, layer=layer, **data)
        # Falling or flat, then a sudden NaN: the input or the loss.
        first = culprit.first
        if low.value < first.value * 0.9:
            trend = "fell from %s (iteration %s) to %s (iteration %s)" % (
                fmt(first.value), first.iteration, fmt(low.value), low.iteration)
        elif (culprit.growth() or 1.0) >= 1.5:
            trend = "rose from %s (iteration %s) to %s (iteration %s), %.1fx: less than an order " \
                    "of magnitude" % (fmt(first.value), first.iteration, fmt(high.value), high.iteration,
                                      culprit.growth())
        else:
            trend = "stayed near %s" % fmt(first.value)
        last = culprit.last
        gap = (bad_point.iteration is not None and last.iteration is not None
               and bad_point.iteration - last.iteration > 1)
        message = ("faulty input or loss layer: the loss%s %s, then became %s at iteration %s without "
                   "growing first (last finite %s at iteration %s%s)"
                   % (name, trend, fmt(bad_point.value), bad_point.iteration, fmt(last.value),
                      last.iteration, "; the log shows every %dth iteration: it went non-finite in "
                      "iterations %d-%d" % (bad_point.iteration - last.iteration, last.iteration + 1,
                                            bad_point.iteration) if gap else ""))
        recovered = culprit.recovered
        if recovered is not None:
            message += ("; training went on: the loss is finite again from iteration %s (%s)"
                        % (recovered.iteration, "a watch skipped the bad iteration"
                           if self.first_train_report and self.first_train_report[1]["source"] == "watch"
                           else "the bad batch did not reach the weights"))
        fix, data = self._input_advice(bad_point.iteration, since=last.iteration)
        evidence = [first, low, last, bad_point, recovered]
        return self._finding("SL803", "error", bad_point, message, fix, evidence,
                             cause="faulty input or loss layer", **data)

    def _rising_finding(self):
        """No value went non-finite (yet): a loss still climbing by orders of magnitude at
        the end of the log is an explosion under way (a log still being written, or a run
        a watch stopped)."""
        for track in self._loss_tracks():
            rise = track.rise()
            if rise is None or rise < RISING_RATIO or track.last is None:
                continue
            low, last = track.minimum, track.last
            if last.value < 0.5 * track.peak_after_min.value:
                continue  # it came back down
            base_lr = self.solver_field("base_lr")
            message = ("exploding gradients under way: the loss%s rose from %s (iteration %s) to %s "
                       "(iteration %s, the last in the log), %.1f orders of magnitude; nothing is "
                       "non-finite yet" % ("" if track is self.loss else " '%s'" % track.name,
                                           fmt(low.value), low.iteration, fmt(last.value),
                                           last.iteration, math.log10(rise)))
            fix = "lower base_lr%s by at least 10x, or clip the gradient" % (
                " (%s)" % base_lr if base_lr else "")
            return self._finding("SL802", "warning", last, message, fix, [low, last],
                                 cause="exploding gradients", rise=rise)
        return None

    def _input_advice(self, iteration, since=None):
        """The fix for a faulty input: the sources to scan, and the records read by
        ``iteration`` (with ``since``, the last finite loss logged before it, by every
        iteration after that one: with display > 1 the first bad one is not logged)."""
        data_layers = self.data_layers()
        sources = []
        for layer in data_layers:
            source = layer.params.get("data_param.source") or layer.params.get("hdf5_data_param.source") \
                or layer.params.get("image_data_param.source")
            if source:
                sources.append((layer, source))
        parts = []
        data = {}
        if sources:
            parts.append("scan the training data: %s" % "; ".join(
                "`safe-layers scan %s` (layer '%s')" % (source, layer.name) for layer, source in sources))
            data["sources"] = [source for _, source in sources]
            layer, _ = sources[0]
            batch = layer.params.get("data_param.batch_size") or layer.params.get("hdf5_data_param.batch_size")
            iter_size = int(self.solver_field("iter_size") or 1)
            # A resumed run's data layer starts again at record 0 (Caffe saves no cursor).
            origin = 0 if self.resumed is None else self.resumed.iteration
            if batch and iteration is not None and layer.type == "Data" and origin is None:
                parts.append("the run resumed from %s, whose iteration the log does not say: "
                             "Caffe's data layer starts again at record 0 there, so count the "
                             "records from the resumed iteration" % self.resumed.path)
            elif batch and iteration is not None and layer.type == "Data":
                batch, per = int(batch), iter_size * int(batch)
                first = since + 1 if since is not None and iteration - since > 1 else iteration
                start, end = (first - origin) * per, (iteration - origin + 1) * per - 1
                which = ("iteration %d" % iteration if first == iteration
                         else "iterations %d-%d" % (first, iteration))
                resumed = (" (counted from iteration %d, where the run resumed: Caffe's data layer "
                           "starts again at record 0)" % origin if origin else "")
                parts.append("%s read records %d-%d of '%s' in key order (modulo its size)%s"
                             % (which, start, end, layer.name, resumed))
                data["record_positions"] = [start, end]
        else:
            parts.append("scan the training data (`safe-layers scan SOURCE`)")
        guard_after = "data layer '%s'" % data_layers[0].name if data_layers else "the data layer"
        parts.append("put a NaNGuard (action: abort) on the tops of %s to stop at the bad batch; "
                     "check the loss layer (a loss normalised by label counts, InfogainLoss's H)"
                     % guard_after)
        return "; ".join(parts), data

    def _from_start_finding(self, point):
        message = ("non-finite from the first iteration: %s at iteration %s, with no finite "
                   "loss before it: the net computes NaN/Inf on its first batch"
                   % (self.first_bad_words(), point.iteration))
        fix = ("run `safe-layers lint` on the net (pooling windows outside the input, BatchNorm at "
               "zero statistics, bad fillers); %s" % self._input_advice(point.iteration)[0])
        return self._finding("SL807", "error", point, message, fix, [point],
                             cause="non-finite from the start")

    def _debug_findings(self, cause):
        out = []
        if self.first_bad_forward is not None:
            point, event = self.first_bad_forward
            layer = self.layer_named(event.layer)
            kind = " (%s)" % layer.type if layer is not None and layer.type else ""
            if event.blob_kind == "param":
                message = ("debug_info: the first non-finite value in forward order is layer '%s'%s's "
                           "weights (param blob %s = %s) at iteration %s: the update of an earlier "
                           "iteration made them non-finite" % (event.layer, kind, event.blob,
                                                                fmt(event.value), point.iteration))
                fix = "see the first non-finite gradient (backward) and the cause above"
            else:
                layer_type = layer.type if layer is not None else None
                role, fix = "", ("guard it: a NaNGuard after '%s' (action: abort) reports the first bad "
                                 "element" % event.layer)
                if layer_type in DATA_LAYERS:
                    role = ": the input itself is non-finite"
                elif layer_type == "Pooling":
                    # Seed cause 5: a window past the input (stride > kernel, CEIL rounding).
                    role = (": with finite input, a pooling window lying outside it (stride > kernel, "
                            "Caffe's CEIL rounding) averages 0/0 or outputs -FLT_MAX")
                    fix = ("`safe-layers lint` checks the geometry with real shapes; pad, change "
                           "kernel/stride, or round_mode: FLOOR")
                elif layer_type == "BatchNorm":
                    role = ": BatchNorm (at zero statistics it outputs x/sqrt(eps), ~316x)"
                    fix = ("replace it with StableBatchNorm (same blobs, caffemodels load both ways; "
                           "`safe-layers harden --swap batchnorm`)")
                elif layer_type and "Loss" in layer_type:
                    role = ": the loss layer, its bottoms finite"
                    if layer_type == "InfogainLoss":
                        fix = ("InfogainLoss with an unnormalized or non-finite H, or labels outside "
                               "[0, K): SafeInfogainLoss validates both")
                message = ("debug_info: the first layer in forward order whose output went non-finite "
                           "is '%s'%s (top blob '%s' = %s) at iteration %s%s"
                           % (event.layer, kind, event.blob, fmt(event.value), point.iteration, role))
                if layer_type in DATA_LAYERS:
                    source = (layer.params.get("data_param.source")
                              or layer.params.get("hdf5_data_param.source") or "SOURCE")
                    fix = ("`safe-layers scan %s` finds the record; a NaNGuard on the tops of '%s' "
                           "stops at its batch" % (source, event.layer))
            out.append(self._finding("SL804", "error", point, message, fix, [point], layer=event.layer,
                                     blob=event.blob, blob_kind=event.blob_kind))
        grown = self._fastest_gradient()
        if grown is not None:
            (layer_name, kind, blob), first, last, ratio = grown
            per_iteration = ratio ** (1.0 / max(1, (last.iteration or 0) - (first.iteration or 0)))
            message = ("debug_info: the gradient that grew fastest before the first non-finite value: "
                       "layer '%s' %s blob %s diff %s (iteration %s) -> %s (iteration %s), x%.3g "
                       "(x%.3g per iteration)" % (layer_name, kind, blob, fmt(first.value),
                                                   first.iteration, fmt(last.value), last.iteration,
                                                   ratio, per_iteration))
            fix = ("clip it: a GradientClip layer above '%s', or lower base_lr / that layer's "
                   "lr_mult" % layer_name)
            severity = "error" if cause is not None and cause.rule == "SL802" else "warning"
            out.append(self._finding("SL805", severity, last, message, fix, [first, last],
                                     layer=layer_name, blob=blob, growth=ratio))
        if self.first_bad_backward is not None and self.first_bad_forward is None:
            point, event = self.first_bad_backward
            message = ("debug_info: the first non-finite gradient is layer '%s' %s blob %s diff = %s "
                       "at iteration %s (backward runs from the loss down)"
                       % (event.layer, event.blob_kind, event.blob, fmt(event.value), point.iteration))
            out.append(self._finding("SL804", "error", point, message,
                                     "a NaNGuard (check: backward) below '%s' reports the first bad "
                                     "element" % event.layer, [point], layer=event.layer,
                                     blob=event.blob, blob_kind=event.blob_kind))
        return out

    def _fastest_gradient(self):
        history = self.frozen_gradients if self.frozen_gradients is not None else None
        if not history:
            return None
        best = None
        for key, points in history.items():
            usable = [p for p in points if finite(p.value) and p.value > 0]
            if len(usable) < 2:
                continue
            ratio = usable[-1].value / usable[0].value
            if best is None or ratio > best[3]:
                best = (key, usable[0], usable[-1], ratio)
        if best is None or best[3] < 10:
            return None
        return best

    def _report_findings(self):
        chosen = self.first_train_report or self.first_report
        if chosen is None:
            return []
        event, fault = chosen
        layer, follows = fault["layer"], fault["follows"]
        who = "%s '%s'%s" % (fault["layer_type"] or "layer", layer,
                             " (after '%s')" % follows if follows else "")
        if fault["source"] == "watch":
            who = "the watch: layer '%s' (%s)" % (layer, fault["layer_type"])
        counts = ", ".join("%s=%d" % (label, fault[key]) for key, label in
                           (("nan", "nan"), ("posinf", "+inf"), ("neginf", "-inf")) if fault.get(key))
        message = ("%s caught non-finite %s in %s at iteration %s%s%s"
                   % (who, fault["what"] or "values", fault["phase"] or "?", fault["iteration"],
                      ": " + counts if counts else "",
                      ", first bad at %s" % list(fault["first_index"]) if fault["first_index"] else ""))
        if fault["action"]:
            message += " (action=%s)" % fault["action"]
        others = ["%s (%d)" % (name, count) for name, count in self.report_layers.items() if name != layer]
        if others:
            message += "; reported too: %s" % ", ".join(others)
        watched = follows or layer
        producer = self.layer_named(watched)
        if (producer is not None and producer.type in DATA_LAYERS) or fault["layer_type"] in DATA_LAYERS \
                or fault["layer_type"] == "Input":
            fix = self._input_advice(fault["iteration"])[0]
        elif fault["source"] == "watch":
            fix = ("layer '%s' is the first whose inputs were finite and whose output is not: look "
                   "at its parameters and its bottoms%s" % (layer, "; " + fault["note"] if fault["note"] else ""))
        else:
            fix = ("'%s' is the first non-finite output the guards saw: look at that layer (and at "
                   "what feeds it)" % watched)
        point = Point(fault["iteration"], float("nan"), event.line, event.text)
        return [self._finding("SL806", "error", point, message, fix, [point], layer=watched,
                              reports=self.reports, report=fault)]

    def _fatal_fix(self, event):
        """The fix for a Caffe CHECK / LOG(FATAL) whose place says what it is about."""
        source, message = event.source or "", event.message
        if source.startswith("sgd_solver.cpp") or "learning rate policy" in message:
            # SGDSolver::GetLearningRate checks the fields each policy reads.
            field = re.search(r"param_\.(\w+)\(\)", message)
            field = field.group(1) if field else None
            policy = self.lr_policy()
            return ("bad learning-rate policy%s: %s; `safe-layers lint SOLVER` checks every policy's "
                    "fields before training" % (
                        " (lr_policy \"%s\")" % policy if policy else "",
                        "fix %s in the solver" % field if field else "fix the solver's lr fields"),
                    {"cause": "bad learning-rate policy", "field": field, "policy": policy})
        if source.startswith("data_transformer.cpp"):
            return ("a record's shape differs from what the data layer expects (another record's, "
                    "crop_size or the mean's): `safe-layers scan SOURCE` names the records whose "
                    "shape differs", {"cause": "faulty input"})
        return "Caffe's own message names the check that failed", {}

    def _abort_findings(self, explained):
        out = []
        if self.fatal is not None:
            event = self.fatal
            point = Point(self.iteration, None, event.line, event.text)
            fix, data = self._fatal_fix(event)
            evidence = [point] + ([self._solver_point(data["field"])] if data.get("field") else [])
            out.append(self._finding("SL808", "error", point,
                                     "the run aborted at %s: %s" % (event.source or "?", event.message),
                                     fix, evidence, source=event.source, **data))
        if self.python_error is not None:
            event = self.python_error
            point = Point(self.iteration, None, event.line, event.text)
            evidence = [point] + ([Point(None, None, self.crash.line, self.crash.text)]
                                  if self.crash is not None else [])
            out.append(self._finding("SL808", "error", point, "the run aborted: %s" % event.message,
                                     "a Python layer raised; its report and traceback are above "
                                     "this line", evidence, error=event.error))
        elif self.crash is not None:
            event = self.crash
            point = Point(self.iteration, None, event.line, event.text)
            signal = self.crash_signal.signal if self.crash_signal is not None else None
            message = "the process crashed: %s" % event.message
            if signal and signal not in event.message:
                message += " (%s)" % signal
            fix = "see the lines above it"
            if "error_already_set" in event.message:
                fix = ("a Python layer raised under a caffe binary built without WITH_PYTHON_LAYER; "
                       "its report is above this line")
            pooling = [l.name for l in self.train_layers()
                       if l.type == "Pooling" and l.params.get("pooling_param.pool", "MAX") == "MAX"]
            if self.first_bad is not None and pooling and "error_already_set" not in event.message:
                message += (" after non-finite values reached MAX pooling (%s): over an all-NaN window "
                            "Caffe's CPU backward writes one element outside the blob, which corrupts "
                            "the heap" % ", ".join(pooling[:6]))
                fix = ("keep NaN out of MAX pooling: a NaNGuard (action: clamp or abort) before "
                       "'%s' and the cause above" % pooling[0])
            evidence = [point] + ([Point(None, None, self.crash_signal.line, self.crash_signal.text)]
                                  if self.crash_signal is not None else [])
            out.append(self._finding("SL808", "error", point, message, fix, evidence, signal=signal))
        return out

    def _test_findings(self):
        if self.test_bad is None:
            return []
        if self.first_bad is not None:
            trained = self.first_bad[0]
            if trained.line < self.test_bad.line:
                return []  # training died first; the test outputs only follow it
            if trained.iteration is not None and trained.iteration <= self.test_bad.iteration:
                # The test pass of iteration N runs before training iteration N, on the same
                # weights: both went non-finite there, and the training finding says why.
                return []
        batchnorm = [l.name for l in self.nets.get("TEST").layers if l.type == "BatchNorm"] \
            if self.nets.get("TEST") is not None else []
        why = (": BatchNorm layers (%s) at untrained statistics output x/sqrt(eps) in the test pass "
               "before any training (StableBatchNorm does not)" % ", ".join(batchnorm[:5])
               if batchnorm else "")
        message = ("test net output '%s' = %s at iteration %s while training stayed finite%s"
                   % (self.test_bad_name, fmt(self.test_bad.value), self.test_bad.iteration, why))
        fix = "look at the test net's data and its TEST-only layers"
        sources = [l.params.get("data_param.source") or l.params.get("hdf5_data_param.source")
                   for l in (self.nets["TEST"].layers if "TEST" in self.nets else []) if l.type in DATA_LAYERS]
        sources = [source for source in sources if source]
        if sources:
            fix = "scan the test data: %s" % "; ".join("`safe-layers scan %s`" % s for s in sources)
        return [self._finding("SL809", "error", self.test_bad, message, fix, [self.test_bad],
                              output=self.test_bad_name)]

    def _clip_findings(self):
        if not self.clips:
            return []
        if self.clip_bad is not None:
            message = ("gradient clipping saw a non-finite L2 norm (%s) at iteration %s: Caffe's "
                       "clip_gradients lets a NaN norm pass and turns an inf norm into NaN weights"
                       % (fmt(self.clip_bad.value), self.clip_bad.iteration))
            return [self._finding("SL810", "error", self.clip_bad, message,
                                  "find the first non-finite gradient (above); GradientClip layers zero "
                                  "non-finite elements before the norm", [self.clip_bad])]
        limit = self.solver_field("clip_gradients")
        message = ("gradient clipping scaled gradients down %d times (largest L2 norm %s at iteration "
                   "%s%s)" % (self.clips, fmt(self.clip_max.value) if self.clip_max else "?",
                             self.clip_max.iteration if self.clip_max else "?",
                             ", limit %s" % limit if limit else ""))
        return [self._finding("SL810", "info", self.clip_first, message, "", [self.clip_first, self.clip_max],
                              clips=self.clips)]

    def _lr_zero_finding(self):
        if self.lr_first_zero is None:
            return None
        point = self.lr_first_zero
        policy = self.lr_policy()
        fields = self.solver.fields if self.solver is not None else {}
        field = {"step": "gamma", "exp": "gamma", "multistep": "gamma"}.get(policy)
        if policy == "poly":
            field = "max_iter"
        message = ("the learning rate reached 0 at iteration %s%s: nothing learns from there on"
                   % (point.iteration, " (lr_policy \"%s\"%s)" % (policy, ", gamma %s" % fields["gamma"]
                                                               if "gamma" in fields else "") if policy else ""))
        return self._finding("SL811", "warning", point, message,
                             "check %s" % field if field else "check the solver's lr fields",
                             [self.lr_last_positive, point, self._solver_point("lr_policy")])

    # ---- what a watch did ------------------------------------------------------------------

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

    def _stop_words(self):
        _, fields, _ = self.watch_stop
        if fields["kind"] == "producer":
            return "non-finite %s '%s' %s, produced by %s '%s' in %s" % (
                fields["role"], fields["blob"], fields["what"], fields["layer_type"], fields["layer"],
                fields["pass"])
        parts = fields["message"].split("; ")
        if fields["kind"] == "stopped" and len(parts) > 1:
            return "%s; %s" % (parts[0], parts[-1])   # the fault, and the limit it hit
        return parts[0]

    def _watch_finding(self):
        """SL814: the skips, the rollbacks and the end of a watched run."""
        skipped, rollbacks, ending = self.skipped(), self.rollback_count(), self.ending()
        stopped = self.watch_stop is not None and ending == "stopped"
        if not (skipped or rollbacks or stopped):
            return None
        acts = []
        if skipped:
            its = self.skip_iterations
            shown = ", ".join(str(i) for i in its[:SKIPS_SHOWN])
            more = ", ..." if len(its) > SKIPS_SHOWN or skipped > self.skip_lines else ""
            acts.append("skipped %d iteration%s (at %s %s%s)" % (
                skipped, "" if skipped == 1 else "s", "iteration" if len(its) == 1 and not more
                else "iterations", shown, more))
        rolled = []
        for point, details in self.rollbacks:
            text = "from iteration %s (non-finite %s) to the checkpoint of iteration %s" % (
                details.get("at", "?"), details.get("cause", "?"), point.iteration)
            if details.get("further_back"):
                text += " (one further back: the previous one failed again)"
            elif details.get("same_again"):
                text += " (the same one again: none older was kept)"
            if details.get("base_lr_to") is not None:
                text += ", base_lr %s -> %s" % (fmt(details["base_lr_from"]), fmt(details["base_lr_to"]))
            rolled.append(text)
        if rollbacks:
            more = "; ..." if rollbacks > len(rolled) else ""
            acts.append("rolled back %s: %s%s" % ("once" if rollbacks == 1 else "%d times" % rollbacks,
                                                 "; ".join(rolled), more))
        evidence = [self.first_skip, self.last_skip] + [p for p, _ in self.rollbacks]
        if self.last_rollback is not None:
            evidence.append(self.last_rollback[0])
        if self.watch_summary is not None:
            evidence.append(self.watch_summary[0])
        lr_left = self.last_rollback[1].get("base_lr_to") if self.last_rollback else None
        if stopped:
            point = self.watch_stop[0]
            evidence.append(point)
            how = "stopped the run at iteration %s: %s" % (point.iteration, self._stop_words())
            if acts:
                message = "the watch %s, then %s" % (" and ".join(acts), how)
                fix = ("%s did not get past the fault: fix the cause above"
                       % " and ".join(w for w, n in (("skipping", skipped), ("rolling back", rollbacks)) if n))
            else:
                message = "the watch %s (its first fault: on_nonfinite stop)" % how
                fix = ("fix the cause above; to train past a bad iteration instead: `safe-layers "
                       "train --on-nonfinite skip` (a bad batch), with `--rollback-after K "
                       "--lr-factor F` for a run that diverges")
            severity = "error"
        else:
            # The first thing the watch did (a log cut at the start may hold its summary only).
            point = next(p for p in (self.first_skip, self.rollbacks[0][0] if self.rollbacks else None,
                                     self.watch_summary[0] if self.watch_summary else None) if p)
            if ending == "finished":
                end = "the run then finished at iteration %s (Optimization Done.)" % self.iteration
                evidence.append(Point(None, None, self.done.line, self.done.text))
                fix = ("the weights come from a run that %s: fix the cause above" %
                       ("was rolled back" if rollbacks else "skipped iterations"))
                if lr_left is not None:
                    fix += "; the rollbacks left base_lr at %s, a value to start from" % fmt(lr_left)
            elif ending == "aborted":
                end = "then the run aborted (SL808)"
                fix = "see SL808 and the cause above"
            else:
                end = ("the log ends at iteration %s without 'Optimization Done.' (cut off, or still "
                       "running)" % self.iteration)
                fix = "fix the cause above"
            message = "the watch %s; %s" % (" and ".join(acts), end)
            severity = "warning"
        data = {"skipped": skipped, "rollbacks": rollbacks, "ended": ending,
                "rolled_back": [dict(details, line=p.line, to=p.iteration) for p, details in self.rollbacks],
                "stopped_at": self.watch_stop[0].iteration if stopped else None}
        return self._finding("SL814", severity, point, message, fix, evidence, **data)

    def _no_training_finding(self):
        """`caffe train` with max_iter 0 (unset: its proto default) runs Step(0): no
        training iteration, a final "Iteration 0, loss" and test, and "Optimization Done."."""
        if not self.done or self.solver is None or self.iteration != self.first_iteration:
            return None  # losses at several iterations: something was trained
        try:
            max_iter = float(self.solver_field("max_iter") or 0)
        except ValueError:
            return None
        if max_iter > 0:
            return None
        point = Point(self.iteration, None, self.done.line, self.done.text)
        declared = self._solver_point("max_iter")
        message = ("the run trained nothing: max_iter is %s, so `caffe train` ran no iteration "
                   "before \"Optimization Done.\" (any test output above is the untrained net's)"
                   % ("0" if declared is not None else "not set (0)"))
        return self._finding("SL812", "error", point, message,
                             "set max_iter in the solver (the number of iterations to train)",
                             [declared, point], cause="no training")

    def _false_accuracy_finding(self):
        self._close_test()  # the final test pass, when the log ends with it
        seen = self.false_accuracy
        if seen is None:
            return None
        (accuracy_name, accuracy), (loss_name, loss) = seen["first"]
        (_, last), (_, last_loss) = seen["last"]
        message = ("test output '%s' = %s at iteration %s beside the test loss '%s' = %s overstates: "
                   "Caffe's Accuracy layer counts every sample whose true-class score is NaN as correct "
                   "(no score compares >= a NaN), so a net whose every score is NaN scores 1.0"
                   % (accuracy_name, fmt(accuracy.value), accuracy.iteration, loss_name, fmt(loss.value)))
        if seen["passes"] > 1:
            message += "; %d test passes read so, the last at iteration %s (%s = %s)" % (
                seen["passes"], last.iteration, accuracy_name, fmt(last.value))
        fix = ("judge the run by its test loss; keep NaN out of the test net's scores (a NaNGuard "
               "with action: abort before the Accuracy layer, or `safe-layers train`)")
        evidence = [accuracy, loss] + ([last, last_loss] if seen["passes"] > 1 else [])
        return self._finding("SL813", "warning", accuracy, message, fix, evidence,
                             output=accuracy_name, passes=seen["passes"])


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
    from safe_layers.reporting import watch_lines
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


# ---------------------------------------------------------------------------------------

def report_parser():
    """The parser of our layers' (and a watch's) report lines, from the module that
    writes them."""
    from safe_layers import reporting
    return reporting.parse_line


def diagnose(path):
    """A :class:`Diagnosis` of the log at ``path`` (InputError when unreadable)."""
    if path == "-":
        handle = os.fdopen(os.dup(sys.stdin.fileno()), "rb")  # `... | safe-layers diagnose -`
    else:
        if os.path.isdir(path):
            raise InputError("%s: is a directory, not a log" % path)
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            raise InputError("%s: no such file" % path) from None
        except OSError as exc:
            raise InputError("%s: cannot read: %s" % (path, exc.strerror or exc)) from None
    if handle.peek(2)[:2] == b"\x1f\x8b" if hasattr(handle, "peek") else False:
        import gzip
        handle = gzip.GzipFile(fileobj=handle)  # a rotated train.log.gz, read as it streams
    diagnosis = Diagnosis(path)
    earlier_runs = []  # first lines of the runs before the one diagnosed
    reader = LogReader(handle, report_parser())
    with handle:
        try:
            for event in reader:
                if event.kind == "solver" and diagnosis.iteration is not None:
                    # A second "Initializing solver" after training lines: another run
                    # appended to the same file (people do `caffe train ... 2>> train.log`).
                    # Each run's cause, settings and records are its own: the last is read.
                    earlier_runs.append(diagnosis.run_start)
                    diagnosis = Diagnosis(path)
                    diagnosis.run_start = event.line
                diagnosis.feed(event)
        except OSError as exc:  # gzip.BadGzipFile is one
            raise InputError("%s: read error after line %d: %s" % (path, reader.lines, exc)) from None
        except (EOFError, zlib.error) as exc:
            raise InputError("%s: the gzip stream is cut short or corrupt after line %d (%s); "
                             "`zcat` what is there into a file and diagnose that"
                             % (path, reader.lines, exc)) from None
    diagnosis.finish(reader.lines)
    if reader.lines == 0 and diagnosis.incomplete is None:
        raise InputError("%s: empty log" % path)
    if reader.glog_lines == 0 and reader.events == 0:
        raise InputError("%s: not a Caffe log: none of its %d lines is a glog line or a line Caffe's "
                         "solver writes" % (path, max(reader.lines, 1)))
    diagnosis.reader = reader
    diagnosis.earlier_runs = earlier_runs
    return diagnosis


def summary_lines(diagnosis, found):
    d = diagnosis
    out = []
    for finding in found:
        evidence = finding.data.get("evidence") or []
        if evidence:
            out.append("evidence for %s (%s):" % (finding.rule, finding.message.split(":")[0]))
            for item in evidence:
                out.append("  %s:%d: %s" % (d.path, item["line"], (item["text"] or "").strip()))
    run = "log: %d lines" % d.lines
    if d.earlier_runs:
        run = "log: %d lines holding %d runs (each from an \"Initializing solver\" line: %s); " \
              "this is about the last, from line %d" % (
                  d.lines, len(d.earlier_runs) + 1, ", ".join(str(n) for n in d.earlier_runs + [d.run_start]),
                  d.run_start)
    if d.first_iteration is not None:
        run += ", iterations %s-%s" % (d.first_iteration, d.iteration)
    if d.segments > 1:
        run += " in %d segments (%d rollback%s)" % (d.segments, d.segments - 1,
                                                   "" if d.segments == 2 else "s")
    last = d.last_finite_loss
    if last is not None:
        run += ", last finite loss %s at iteration %s" % (fmt(last.value), last.iteration)
    if d.debug_blocks:
        run += ", %d debug_info iterations" % d.debug_blocks
    if d.reports:
        run += ", %d safe_layers report lines" % d.reports
    out.append(run)
    if d.first_bad is None and not any(f.severity == "error" for f in found):
        out.append("no non-finite value in the training log")
    ending = d.ending()
    if ending == "finished":
        out.append("the run finished (Optimization Done.)")
    elif ending == "stopped":
        point = d.watch_stop[0]
        out.append("the watch stopped the run at iteration %s (line %d)" % (point.iteration, point.line))
    elif ending == "cut off":
        out.append("the log ends without 'Optimization Done.': the run is still going or was cut off "
                   "(or it ran through pycaffe's solver.step(), which never writes it)")
    if d.unreadable_reports:
        out.append("%d safe_layers lines could not be parsed by reporting.parse_line (first: line %d, %s); "
                   "skipped" % (d.unreadable_reports, d.first_unreadable_report.line,
                                d.first_unreadable_report.error))
    if d.incomplete is not None:
        out.append("line %d has no newline (still being written or cut off): not read"
                   % d.incomplete.line)
    return out


def json_extra(diagnosis):
    d = diagnosis
    first = None
    if d.first_bad is not None:
        point, what = d.first_bad
        first = dict(point.as_dict(), what=what, words=d.first_bad_words())
    return {"log": d.path, "lines": d.lines, "runs": [n for n in d.earlier_runs] + [d.run_start],
            "first_iteration": d.first_iteration,
            "last_iteration": d.iteration, "finished": bool(d.done), "ended": d.ending(),
            "segments": d.segments, "skipped": d.skipped(), "rollbacks": d.rollback_count(),
            "incomplete_last_line": d.incomplete.line if d.incomplete is not None else None,
            "first_nonfinite": first, "lr_policy": d.lr_policy(),
            "solver": d.solver.fields if d.solver is not None else None,
            "forward_order": d.forward_order, "debug_info_iterations": d.debug_blocks,
            "report_lines": d.reports,
            "loss": d.loss.series.points, "lr": d.lr_series.points,
            "outputs": {name: t.series.points for name, t in d.outputs.items()}}


# ---------------------------------------------------------------------------------------
# Plot.

def write_plot(diagnosis, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy
    d = diagnosis
    heat = d.heatmap.columns
    rows = 3 if heat else 2
    fig, axes = plt.subplots(rows, 1, figsize=(11, 3.4 * rows), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2] + ([4] if heat else [])})
    loss_ax, lr_ax = axes[0][0], axes[1][0]
    lr_ax.sharex(loss_ax)
    curves = [("loss (smoothed)", d.loss.series.points)]
    curves += [("%s%s" % (name, " (* %s)" % fmt(t.weight) if t.weight is not None else ""), t.series.points)
               for name, t in d.outputs.items() if t.weight is not None]
    _plot_curves(loss_ax, curves, "loss")
    _plot_curves(lr_ax, [("lr", d.lr_series.points)], "learning rate")
    if d.first_bad is not None and d.first_bad[0].iteration is not None:
        point = d.first_bad[0]
        for ax in (loss_ax, lr_ax):
            ax.axvline(point.iteration, color="red", linestyle="--", linewidth=1)
        # The label on the side of the line with more room.
        low, high = loss_ax.get_xlim()
        right = point.iteration < (low + high) / 2
        loss_ax.annotate("first non-finite: %s\niteration %s (line %d)"
                         % (d.first_bad_words(), point.iteration, point.line),
                         xy=(point.iteration, 0.97), xycoords=("data", "axes fraction"),
                         xytext=(8 if right else -8, 0), textcoords="offset points",
                         ha="left" if right else "right", va="top", color="red", fontsize=8)
    lr_ax.set_xlabel("iteration")
    if heat:
        ax = axes[2][0]
        layers = [l for l in d.forward_order if any(l in column for _, column in heat)]
        layers += sorted({l for _, column in heat for l in column} - set(layers))
        matrix = numpy.full((len(layers), len(heat)), numpy.nan)
        bad = numpy.zeros(matrix.shape, bool)
        for j, (_, column) in enumerate(heat):
            for i, layer in enumerate(layers):
                value = column.get(layer)
                if value is None:
                    continue
                if not math.isfinite(value):
                    bad[i, j] = True
                elif value > 0:
                    matrix[i, j] = math.log10(value)
        iterations = [it for it, _ in heat]
        image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis")
        if bad.any():
            from matplotlib.colors import ListedColormap
            overlay = numpy.ma.masked_where(~bad, numpy.ones(bad.shape))
            ax.imshow(overlay, aspect="auto", interpolation="nearest", cmap=ListedColormap(["red"]),
                      vmin=0, vmax=1)
        ax.set_yticks(range(len(layers)), layers, fontsize=7 if len(layers) < 40 else 4)
        ticks = sorted(set(numpy.linspace(0, len(heat) - 1, min(10, len(heat))).astype(int)))
        ax.set_xticks(ticks, [str(iterations[t]) if iterations[t] is not None else "end" for t in ticks])
        ax.set_xlabel("iteration (debug_info)")
        ax.set_title("log10 mean |diff| per layer (backward, forward order top to bottom; red: non-finite)",
                     fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.03)
    title = os.path.basename(d.path)
    if d.segments > 1:
        title += " (%d rollback%s: the iterations before %s faded)" % (
            d.segments - 1, "" if d.segments == 2 else "s", "it" if d.segments == 2 else "them")
    loss_ax.set_title(title, fontsize=10)
    fig.tight_layout()
    try:
        findings_module.save_png(fig, path)
    finally:
        plt.close(fig)


def segments(points):
    """``points`` cut where the iteration goes back (a rollback): a list of runs."""
    runs, start = [], 0
    for i in range(1, len(points) + 1):
        if i == len(points) or points[i][0] < points[i - 1][0]:
            runs.append(points[start:i])
            start = i
    return runs


def _plot_curves(ax, curves, label):
    positive_only = True
    plotted = False
    for name, points in curves:
        xs = [x for x, y in points if math.isfinite(y)]
        ys = [y for x, y in points if math.isfinite(y)]
        if not xs:
            continue
        plotted = True
        if min(ys) <= 0:
            positive_only = False
        runs = segments(points)
        color = None
        for n, run in enumerate(runs):
            last = n == len(runs) - 1
            good = [(x, y) for x, y in run if math.isfinite(y)]
            lines = ax.plot([x for x, _ in good], [y for _, y in good], linewidth=1, color=color,
                            alpha=1.0 if last else 0.35, label=name if last else None)
            color = lines[0].get_color()
        bad = [(x, y) for x, y in points if not math.isfinite(y)]
        if bad:
            ax.plot([bad[0][0]], [ys[-1] if ys else 1], "rx", markersize=9)
    if plotted:
        if positive_only:
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog", linthresh=1e-3)
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no finite %s in the log" % label, transform=ax.transAxes, ha="center")
    ax.set_ylabel(label)


# ---------------------------------------------------------------------------------------

def run(args):
    selected = findings_module.rule_list(args.select, known=KNOWN_RULE_IDS, option="--select")
    ignored = findings_module.rule_list(args.ignore, known=KNOWN_RULE_IDS, option="--ignore")
    if args.plot:
        if os.path.realpath(args.plot) == os.path.realpath(args.log):
            raise InputError("--plot %s would overwrite the log" % args.plot)
        findings_module.check_output_path(args.plot, "the plot")
    diagnosis = diagnose(args.log)
    found = findings_module.select(diagnosis.findings(), selected, ignored)
    summary = summary_lines(diagnosis, found)
    if args.plot:
        write_plot(diagnosis, args.plot)
        summary.append("plot: %s" % args.plot)
    return findings_module.emit(found, args.format, extra=json_extra(diagnosis),
                                summary="\n".join(summary), stream=sys.stdout)
