"""``--plot``: loss and lr over iterations (first non-finite point marked) and, with
debug_info, a per-layer heatmap of mean |diff|."""

import math
import os

import numpy

from safe_layers.tools import findings as findings_module
from safe_layers.tools.diagnose.series import fmt


def write_plot(diagnosis, path):
    """Write the figure of ``diagnosis`` to the PNG ``path``."""
    import matplotlib  # deferred: matplotlib is heavy and only --plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
        _mark_first_bad(d, loss_ax, lr_ax)
    lr_ax.set_xlabel("iteration")
    if heat:
        _plot_heatmap(fig, axes[2][0], d.forward_order, heat)
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


def _mark_first_bad(d, loss_ax, lr_ax):
    """A red line at the first non-finite iteration, labelled on the loss axes."""
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
