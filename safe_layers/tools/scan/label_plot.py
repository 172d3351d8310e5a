"""The label plot of ``scan --plot``: each source's histogram and batch-absence curves."""

import os

from safe_layers.core.errors import InputError
from safe_layers.tools.findings import save_png


def write_plot(reports, path):
    """Per source, the label histogram (absent classes in red) and, for its rarest classes,
    P(absent from a random batch) against the batch size, as a PNG at ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [r for r in reports if r.labels.total and not r.labels.too_many]
    if not shown:
        raise InputError("--plot: no labels to plot")
    fig, axes = plt.subplots(len(shown), 2, figsize=(12, 3.6 * len(shown)), squeeze=False)
    for (hist_ax, curve_ax), report in zip(axes, shown):
        stats, target = report.labels, report.target
        rows = stats.rows(target.num_classes, target.ignore_label)
        labels = [r["label"] for r in rows]
        counts = [r["count"] for r in rows]
        colors = ["tab:red" if c == 0 else "tab:blue" for c in counts]
        hist_ax.bar(range(len(labels)), counts, color=colors)
        if len(labels) <= 40:
            hist_ax.set_xticks(range(len(labels)), [str(l) for l in labels], fontsize=7)
        hist_ax.set_xlabel("label (red: absent)")
        hist_ax.set_ylabel("records")
        hist_ax.set_title("%s: %d records" % (os.path.basename(target.path.rstrip("/")), stats.total),
                          fontsize=9)
        rare = sorted((r for r in rows if r["count"]), key=lambda r: r["count"])[:5]
        largest = max([r["batch_for_99"] or 1 for r in rare] + [stats.batch_size or 1, 8])
        sizes = sorted({max(1, int(round(largest * 1.5 * i / 200))) for i in range(1, 201)})
        for r in rare:
            curve_ax.plot(sizes, [stats.p_absent_random(r["label"], b) for b in sizes],
                          label="label %s (%d)" % (r["label"], r["count"]))
        if stats.batch_size:
            curve_ax.axvline(stats.batch_size, color="k", linestyle="--", linewidth=1,
                             label="batch size %d" % stats.batch_size)
        curve_ax.axhline(0.5, color="grey", linewidth=0.5)
        curve_ax.set_xlabel("batch size")
        curve_ax.set_ylabel("P(class absent from a random batch)")
        curve_ax.set_ylim(0, 1)
        curve_ax.legend(fontsize=7)
        curve_ax.set_title("the rarest classes", fontsize=9)
    fig.tight_layout()
    try:
        save_png(fig, path)
    finally:
        plt.close(fig)
