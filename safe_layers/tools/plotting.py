"""The pieces of a training figure that `safe-layers train` and `safe-layers diagnose`
draw alike: TensorBoard's smoothing, the rate on a log axis, iterations as 1k, 2k, and
vertical marks (first non-finite, stop, rollback ...) from one list.

The functions that prepare data (:func:`ema`, :func:`auto_smoothing`, :func:`lr_limits`,
:func:`iteration_label`, :func:`segments`) need no matplotlib; the drawing ones take axes.
"""

import collections
import math

# TensorBoard's smoothing with its debiasing (tensorboard/components/vz_line_chart2/
# line-chart.ts, resmoothDataset): the window of the automatic weight is this share of
# the points, so 40 points and 40,000 points are both smoothed visibly and not flattened.
AUTO_WINDOW_SHARE = 1 / 50
MAX_AUTO_SMOOTHING = 0.999

# A vertical mark on every panel at an iteration: ``style`` is a key of MARK_STYLES.
Mark = collections.namedtuple("Mark", "iteration label style")

MARK_STYLES = {
    "nonfinite": {"color": "red", "linestyle": "--", "linewidth": 1.2},
    "stop": {"color": "black", "linestyle": "-", "linewidth": 1.4},
    "rollback": {"color": "orange", "linestyle": "--", "linewidth": 1},
    "dead": {"color": "purple", "linestyle": ":", "linewidth": 1.4},
    "note": {"color": "gray", "linestyle": ":", "linewidth": 1},
}

RAW_ALPHA = 0.25

# The test outputs of one run, one colour each (twin axes would restart matplotlib's cycle).
TEST_COLOURS = ("#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#bcbd22", "#7f7f7f")          # the raw curve under its smoothed one, as TensorBoard draws it


def finite(value):
    return value is not None and math.isfinite(value)


def auto_smoothing(count):
    """The EMA weight for ``count`` points: a window of :data:`AUTO_WINDOW_SHARE` of them
    (weight 1 - 1/window), 0 (no smoothing) for 100 points or fewer."""
    window = count * AUTO_WINDOW_SHARE
    if window <= 2:
        return 0.0
    return min(MAX_AUTO_SMOOTHING, 1.0 - 1.0 / window)


def ema(values, weight):
    """TensorBoard's debiased exponential moving average of ``values`` (weight in [0, 1)):
    ``last = last * w + (1 - w) * v``, shown as ``last / (1 - w ** n)`` after n finite
    values; a non-finite value is kept as it is and does not enter the average."""
    if not 0 <= weight < 1:
        raise ValueError("the smoothing weight must be in [0, 1), not %r" % weight)
    out, last, count = [], 0.0, 0
    for value in values:
        if not finite(value):
            out.append(value)
            continue
        last = last * weight + (1 - weight) * value
        count += 1
        out.append(last / (1 - weight ** count))
    return out


def segments(points):
    """``points`` ((iteration, value) pairs) cut where the iteration goes back (a
    rollback, or a run resumed from an earlier snapshot): a list of runs, oldest first."""
    runs, start = [], 0
    for i in range(1, len(points) + 1):
        if i == len(points) or points[i][0] <= points[i - 1][0]:
            runs.append(points[start:i])
            start = i
    return [run for run in runs if run]


def smoothed_segments(points, weight):
    """Each segment of ``points`` with its EMA, restarted at every segment (the iterations
    after a rollback are computed with other weights): [(xs, raw, smoothed)]."""
    out = []
    for run in segments(points):
        xs = [x for x, _ in run]
        raw = [y for _, y in run]
        out.append((xs, raw, ema(raw, weight)))
    return out


def lr_limits(values):
    """The y limits of a log-scale rate axis for ``values`` (positive finite ones count):
    at least one decade, centred on the rate when it hardly changes (a constant 0.1
    gets 0.0316-0.316, not 0.096-0.104); None when no value is positive."""
    rates = [v for v in values if finite(v) and v > 0]
    if not rates:
        return None
    low, high = min(rates), max(rates)
    if high / low < 10:
        # One decade around the geometric middle holds both ends (high / low < 10).
        centre = math.sqrt(low * high)
        return centre / math.sqrt(10), centre * math.sqrt(10)
    return low / 1.5, high * 1.5


def iteration_label(value, _position=None):
    """An iteration on the x axis: 500, 1k, 2.5k, 1M."""
    if abs(value) >= 1e6:
        return "%gM" % (value / 1e6)
    if abs(value) >= 1e3:
        return "%gk" % (value / 1e3)
    return "%g" % value


def iteration_axis(ax, label="iteration"):
    """Iterations as 1k, 2k ... on ``ax``'s x axis, with integer ticks."""
    from matplotlib import ticker
    ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=10, integer=True, min_n_ticks=3))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(iteration_label))
    ax.set_xlabel(label)


def log_lr_axis(ax, values):
    """``ax`` as the rate's axis: log scale, limits from :func:`lr_limits`; non-positive
    and non-finite rates (which a log axis cannot show) as triangles on its bottom edge."""
    from matplotlib import ticker
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: "%g" % v))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    limits = lr_limits([v for _, v in values])
    if limits is not None:
        ax.set_ylim(*limits)
    bad = [x for x, v in values if not (finite(v) and v > 0)]
    if bad:
        ax.plot(bad, [0.02] * len(bad), "v", color="red", markersize=6, clip_on=False,
                transform=ax.get_xaxis_transform(), label="lr <= 0 or non-finite")
    ax.set_ylabel("learning rate")


def draw_marks(axes, marks):
    """A vertical line per :class:`Mark` on each of ``axes``, its label (when it has one)
    written along the line on the first, from the top; labels of marks at one iteration
    side by side."""
    top = axes[0]
    beside = collections.Counter()
    for mark in marks:
        style = MARK_STYLES.get(mark.style, MARK_STYLES["note"])
        for ax in axes:
            ax.axvline(mark.iteration, **style)
        if not mark.label:
            continue
        top.annotate(mark.label, xy=(mark.iteration, 0.98), xycoords=("data", "axes fraction"),
                     xytext=(-3 - 11 * beside[mark.iteration], 0), textcoords="offset points",
                     rotation=90, ha="right", va="top", color=style["color"], fontsize=8,
                     bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none",
                           "alpha": 0.7})
        beside[mark.iteration] += 1


def value_axis(ax, values, label):
    """A loss axis: log scale when every finite value is positive, symlog otherwise."""
    finite_values = [v for v in values if finite(v)]
    if finite_values and min(finite_values) > 0:
        ax.set_yscale("log")
    elif finite_values:
        ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylabel(label)


def is_accuracy(name):
    """An output drawn on the 0-1 axis (the event log has no layer types: the name says)."""
    return "acc" in name.lower()


def false_accuracies(tests):
    """[(iteration, name, value)]: an accuracy printed in a test pass where another
    output (a loss) is non-finite. AccuracyLayer::Forward_cpu (accuracy_layer.cpp:57)
    counts a sample correct unless some score beats the true one; a NaN beats nothing,
    so a dead net scores 1.0."""
    bad = {it for name, points in tests.items() if not is_accuracy(name)
           for it, value in points if not finite(value)}
    return [(it, name, value) for name, points in tests.items() if is_accuracy(name)
            for it, value in points if it in bad]


def draw_lr(ax, rates, color="green", label=None):
    """The rate per segment (a rollback's lower base_lr starts a new one); call
    :func:`log_lr_axis` once all rates of the axis are drawn."""
    runs = segments(rates)
    for n, run in enumerate(runs):
        last = n == len(runs) - 1
        shown = [(x, v) for x, v in run if finite(v) and v > 0]
        ax.plot([x for x, _ in shown], [v for _, v in shown], color=color, linewidth=1.2,
                alpha=1.0 if last else 0.4, label=label if last else None)


def draw_tests(ax, tests, false_accuracies, color=None, prefix="test ", accuracy_axis=None):
    """Test losses on ``ax`` (solid), accuracies on a right axis (dashed, 0-1); a non-finite
    value as a red x on the top edge, an accuracy beside a non-finite loss circled in red.
    Returns the accuracy axis (None when no output is an accuracy)."""
    for n, (name, points) in enumerate(sorted(tests.items())):
        good = [(x, v) for x, v in points if finite(v)]
        bad = [x for x, v in points if not finite(v)]
        target, style = ax, "-o"
        if is_accuracy(name):
            accuracy_axis = accuracy_axis or ax.twinx()
            target, style = accuracy_axis, "--s"
        target.plot([x for x, _ in good], [v for _, v in good], style, markersize=3, linewidth=1.2,
                    color=color or TEST_COLOURS[n % len(TEST_COLOURS)], label="%s%s" % (prefix, name))
        if bad:
            target.plot(bad, [0.97] * len(bad), "x", color="red", markersize=8, clip_on=False,
                        transform=target.get_xaxis_transform(),
                        label="%s%s non-finite" % (prefix, name))
    if false_accuracies and accuracy_axis is not None:
        accuracy_axis.plot([it for it, _, _ in false_accuracies], [v for _, _, v in false_accuracies],
                           "o", markersize=11, markerfacecolor="none", markeredgecolor="red",
                           label="accuracy beside a non-finite loss (Caffe counts NaN scores correct)")
    return accuracy_axis


def finish_test_axes(ax, accuracy_axis, tests_list):
    """Scales, labels and one legend for the test panel (``tests_list``: every drawn
    run's {name: points})."""
    losses = [v for tests in tests_list for name, points in tests.items() if not is_accuracy(name)
              for _, v in points]
    value_axis(ax, losses, "test loss")
    handles, labels = ax.get_legend_handles_labels()
    if accuracy_axis is not None:
        accuracy_axis.set_ylim(-0.02, 1.05)
        accuracy_axis.set_ylabel("test accuracy")
        more = accuracy_axis.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        ax.legend(handles, labels, loc="best", fontsize=7)
