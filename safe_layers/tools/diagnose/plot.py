"""``--plot``: the loss (raw, faint, and TensorBoard's moving average), the rate on a log
axis, the test outputs, marks where the run went non-finite, stopped or rolled back and,
with debug_info, a per-layer heatmap of mean |diff|. Several logs: one figure, one colour
per log.

:func:`figure_data` is what is drawn, as plain data (the tests check it)."""

import math
import os

import numpy

from safe_layers.tools import findings as findings_module
from safe_layers.tools import plotting
from safe_layers.tools.diagnose.series import fmt
from safe_layers.tools.plotting import Mark

# One colour per log of an overlay (matplotlib's tab10 without red, the marks' colour).
RUN_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf")


def marks(diagnosis):
    """The :class:`~safe_layers.tools.plotting.Mark` list of a run: the first non-finite
    value, rollbacks, a watch's stop, the rate reaching 0. Adding one is one line here."""
    d = diagnosis
    found = []
    if d.first_bad is not None and d.first_bad[0].iteration is not None:
        point = d.first_bad[0]
        found.append(Mark(point.iteration, "first non-finite: %s\niteration %s (line %d)"
                          % (d.first_bad_words(), point.iteration, point.line), "nonfinite"))
    for n, (point, details) in enumerate(d.rollbacks):
        at = details.get("at", point.iteration)  # the Point is the checkpoint it went back to
        if at is not None:
            found.append(Mark(at, "rolled back to %s (line %d)" % (point.iteration, point.line)
                              if n == 0 else "", "rollback"))
    if d.watch_stop is not None and d.watch_stop[0].iteration is not None:
        found.append(Mark(d.watch_stop[0].iteration, "stopped by the watch", "stop"))
    if d.lr_first_zero is not None:
        found.append(Mark(d.lr_first_zero.iteration, "lr reached 0", "note"))
    return found


def _title(d):
    net = d.nets.get("TRAIN")
    title = os.path.basename(d.path)
    if net is not None and net.name:
        title += " (net %s)" % net.name
    if d.segments > 1:
        title += ", %d rollback%s: the iterations before %s faded" % (
            d.segments - 1, "" if d.segments == 2 else "s", "it" if d.segments == 2 else "them")
    return title


def figure_data(diagnosis, smoothing=None):
    """What the figure of ``diagnosis`` shows, as plain data."""
    d = diagnosis
    loss = d.loss.series.points
    weight = plotting.auto_smoothing(len(loss)) if smoothing is None else smoothing
    # Each weighted output of a net with several losses (one: it is the loss).
    weighted = {name: t for name, t in d.outputs.items() if t.weight}
    outputs = {"%s (* %s)" % (name, fmt(t.weight)): t.series.points
               for name, t in weighted.items()} if len(weighted) > 1 else {}
    timeline = getattr(d, "timeline", None)
    tests = {name: s.points for name, s in timeline.tests.items()} if timeline else {}
    return {"title": _title(d), "label": os.path.basename(d.path), "loss": loss,
            "smoothing": weight, "smoothed": plotting.smoothed_segments(loss, weight),
            "outputs": {name: plotting.smoothed_segments(points, weight)
                        for name, points in outputs.items()},
            "lr": d.lr_series.points, "tests": tests,
            "false_accuracies": list(timeline.false_accuracies) if timeline else [],
            "marks": marks(d)}


def write_plot(diagnoses, path, smoothing=None):
    """Write the figure of ``diagnoses`` (one: that run in full; several: their curves
    overlaid, one colour per log) to the PNG ``path``."""
    import matplotlib.pyplot as plt
    fig = draw(diagnoses, smoothing)
    try:
        findings_module.save_png(fig, path)
    finally:
        plt.close(fig)


def draw(diagnoses, smoothing=None):
    """The matplotlib figure of ``diagnoses`` (headless: Agg)."""
    import matplotlib  # deferred: matplotlib is heavy and only --plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = [figure_data(d, smoothing) for d in diagnoses]
    single = len(data) == 1
    heat = diagnoses[0].heatmap.columns if single else None
    tests = any(item["tests"] for item in data)
    ratios = [3, 1.4] + ([2] if tests else []) + ([4] if heat else [])
    fig, axes = plt.subplots(len(ratios), 1, figsize=(11, 1.3 + 1.7 * sum(ratios)),
                             squeeze=False, gridspec_kw={"height_ratios": ratios})
    axes = [row[0] for row in axes]
    loss_ax, lr_ax = axes[0], axes[1]
    curves = axes[:3] if tests else axes[:2]
    for ax in curves[1:]:
        ax.sharex(loss_ax)
    accuracy_ax = None
    for n, item in enumerate(data):
        colour = RUN_COLOURS[n % len(RUN_COLOURS)]
        _draw_loss(loss_ax, item, colour, item["label"] if not single else None)
        plotting.draw_lr(lr_ax, item["lr"], color=colour if not single else "green",
                         label=item["label"] if not single else "lr")
        if tests and item["tests"]:
            accuracy_ax = plotting.draw_tests(axes[2], item["tests"], item["false_accuracies"],
                                              color=None if single else colour,
                                              prefix="test " if single else "%s: " % item["label"],
                                              accuracy_axis=accuracy_ax)
    plotting.value_axis(loss_ax, [v for item in data for _, v in item["loss"]],
                        "loss (Caffe's, average_loss)")
    loss_ax.legend(fontsize=7, loc="best")
    plotting.log_lr_axis(lr_ax, [p for item in data for p in item["lr"]])
    if tests:
        plotting.finish_test_axes(axes[2], accuracy_ax, [item["tests"] for item in data])
    plotting.iteration_axis(curves[-1])
    for n, item in enumerate(data):
        item_marks = item["marks"] if single else [
            Mark(m.iteration, "%s: %s" % (item["label"], m.label) if m.label else "", m.style)
            for m in item["marks"] if m.style in ("nonfinite", "stop")]
        plotting.draw_marks(curves, item_marks)
    if heat:
        _plot_heatmap(fig, axes[-1], diagnoses[0].forward_order, heat)
    loss_ax.set_title(data[0]["title"] if single else
                      "%d runs: %s" % (len(data), ", ".join(item["label"] for item in data)),
                      fontsize=10)
    fig.tight_layout()
    return fig


def _draw_loss(ax, item, colour, label):
    """The loss of one run (raw faint, EMA solid; the segments before a rollback faded),
    and each weighted train output's EMA (thin) when a single run is drawn."""
    weight = item["smoothing"]
    runs = item["smoothed"]
    name = label or "loss"
    for n, (xs, raw, smooth) in enumerate(runs):
        last = n == len(runs) - 1
        fade = 1.0 if last else 0.4
        good = [(x, r, s) for x, r, s in zip(xs, raw, smooth) if plotting.finite(r)]
        if weight:
            ax.plot([x for x, _, _ in good], [r for _, r, _ in good], color=colour, linewidth=0.8,
                    alpha=plotting.RAW_ALPHA * fade)
        ax.plot([x for x, _, _ in good], [s for _, _, s in good], color=colour, linewidth=1.6,
                alpha=fade, label=("%s (EMA %.3g)" % (name, weight) if weight else name) if last else None)
        bad = [x for x, r in zip(xs, raw) if not plotting.finite(r)]
        if bad:
            ax.plot(bad[:1], [0.97], "x", color="red", markersize=9, clip_on=False,
                    transform=ax.get_xaxis_transform())
    if label is None:
        for name, segments in item["outputs"].items():
            for n, (xs, raw, smooth) in enumerate(segments):
                good = [(x, s) for x, s in zip(xs, smooth) if plotting.finite(s)]
                ax.plot([x for x, _ in good], [s for _, s in good], linewidth=0.9,
                        alpha=1.0 if n == len(segments) - 1 else 0.4,
                        label=name if n == len(segments) - 1 else None)


def _plot_heatmap(fig, ax, forward_order, heat):
    """log10 mean |diff| per layer (rows, forward order) per debug_info iteration."""
    layers = [l for l in forward_order if any(l in column for _, column in heat)]
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
