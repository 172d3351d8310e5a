"""The values a log gives over iterations: points, tracks, plotted series, the heatmap.

Each keeps memory bounded by the net's size, never by the log's length: a plotted curve
thins itself when full, a heatmap merges adjacent columns, a track keeps a handful of
points (first, minimum, last finite, first non-finite).
"""

import collections
import math

from safe_layers.core.float_text import six_digits

SERIES_POINTS = 2048      # points kept per plotted curve, whatever the log's length
HEATMAP_COLUMNS = 400     # debug_info iterations kept for the heatmap


def finite(value):
    return value is not None and math.isfinite(value)


def fmt(value):
    """A number of the log as diagnose prints it ('?' where the log gave none)."""
    return six_digits(value, none="?")


def worse(a, b):
    """The worse of two mean |diff| values: a non-finite one, else the larger (None: absent)."""
    if a is None:
        return b
    if b is None:
        return a
    if not math.isfinite(a):
        return a
    if not math.isfinite(b):
        return b
    return max(a, b)


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
        self.count = 0               # finite values before ``bad``: how much of a curve there is
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
        self.count += 1
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
                merged.append((it, {k: worse(a.get(k), b.get(k)) for k in set(a) | set(b)}))
            if len(self.columns) % 2:
                merged.append(self.columns[-1])
            self.columns = merged


class RunStarts:
    """The first lines of the runs before the one diagnosed, in memory that does not grow
    with their number (a log appended to a million times): how many, the first and the
    last :data:`KEPT` of them."""

    KEPT = 10

    def __init__(self):
        self.count = 0
        self.first = []
        self.last = collections.deque(maxlen=self.KEPT)

    def append(self, line):
        self.count += 1
        if len(self.first) < self.KEPT:
            self.first.append(line)
        else:
            self.last.append(line)

    def __len__(self):
        return self.count

    def shown(self):
        """The line numbers kept, with None where some were left out."""
        left_out = self.count - len(self.first) - len(self.last)
        return self.first + ([None] if left_out else []) + list(self.last)
