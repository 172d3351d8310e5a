"""The PNG `safe-layers train` writes at the end: the loss (raw, faint, and its
TensorBoard-style moving average), the rate on a log axis, the test outputs when the run
tested, and marks where something happened (first non-finite, rollbacks, the stop).

:func:`figure_data` reads the event log into what is drawn (no matplotlib needed: the
tests check it); :func:`write_plot` draws it.
"""

import os

from safe_layers.tools import plotting
from safe_layers.tools.findings import save_png
from safe_layers.tools.plotting import Mark, finite


def _float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _title(events):
    """The solver's file name and the net's name, as the first run of the log gives them."""
    run = next((e for e in events if e.get("event") == "run"), {})
    start = next((e for e in events if e.get("event") == "start"), {})
    title = os.path.basename(run.get("solver") or "") or "safe-layers train"
    if start.get("net"):
        title += " (net %s)" % start["net"]
    runs = sum(1 for e in events if e.get("event") == "run")
    if runs > 1:
        title += ", %d runs (resumed)" % runs
    return title


def _test_series(events):
    """{output name: [(iteration, value)]} of the test passes; a second test net's
    outputs are named 'name (#k)', an output blob of several values 'name[i]'."""
    tests = {}
    for e in events:
        if e.get("event") != "test":
            continue
        for name, values in (e.get("outputs") or {}).items():
            label = name if not e.get("net") else "%s (#%d)" % (name, e["net"])
            for i, value in enumerate(values):
                key = label if len(values) == 1 else "%s[%d]" % (label, i)
                tests.setdefault(key, []).append((e["iteration"], _float(value)))
    return tests


def marks(events):
    """The :class:`~safe_layers.tools.plotting.Mark` list of a run: the first non-finite
    value, each net found dead (from when), each rollback, where the run stopped. Adding a kind of mark is one line here."""
    found = []
    bad = [e["iteration"] for e in events if e.get("event") == "iteration"
           and not (finite(_float(e.get("loss"))) and finite(_float(e.get("lr"))))]
    bad += [e["iteration"] for e in events if e.get("event") == "fault" and "iteration" in e
            and e.get("kind") != "dead"]
    if bad:
        found.append(Mark(min(bad), "first non-finite: iteration %d" % min(bad), "nonfinite"))
    for e in events:
        if e.get("event") == "fault" and e.get("kind") == "dead":
            layers = ", ".join(l["layer"] for l in (e.get("layers") or [])[:2])
            since = e.get("since", e["iteration"])
            found.append(Mark(since, "dead%s since %d (found at %d)" % (
                " (%s)" % layers if layers else "", since, e["iteration"]), "dead"))
    rollbacks = [e for e in events if e.get("event") == "watch" and e.get("kind") == "rollback"]
    for n, e in enumerate(rollbacks):
        found.append(Mark(e.get("from", e["iteration"]),
                          "rolled back to %s" % e["iteration"] if n == 0 else "", "rollback"))
    stopped = next((e for e in reversed(events) if e.get("event") == "stopped"), None)
    if stopped is not None:
        found.append(Mark(stopped["iteration"], "stopped at iteration %d" % stopped["iteration"], "stop"))
    return found


def figure_data(events, smoothing=None):
    """What the figure of ``events`` (the event log's records) shows, as plain data."""
    its = [e for e in events if e.get("event") == "iteration"]
    loss = [(e["iteration"], _float(e.get("loss"))) for e in its]
    weight = plotting.auto_smoothing(len(loss)) if smoothing is None else smoothing
    tests = _test_series(events)
    return {"title": _title(events), "loss": loss, "smoothing": weight,
            "smoothed": plotting.smoothed_segments(loss, weight),
            "lr": [(e["iteration"], _float(e.get("lr"))) for e in its],
            "skips": [e["iteration"] for e in events
                      if e.get("event") == "watch" and e.get("kind") == "skip"],
            "tests": tests, "false_accuracies": plotting.false_accuracies(tests), "marks": marks(events)}


def write_plot(events, path, smoothing=None):
    """Draw :func:`figure_data` of ``events`` into the PNG ``path`` (matplotlib, Agg)."""
    from matplotlib import pyplot
    figure = draw(figure_data(events, smoothing))
    try:
        save_png(figure, path)
    finally:
        pyplot.close(figure)
    return path


def draw(data):
    """The matplotlib figure of :func:`figure_data`'s ``data`` (headless: Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    panels = 3 if data["tests"] else 2
    figure, axes = pyplot.subplots(panels, 1, figsize=(10, 2.6 + 2.2 * panels), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1.4, 2][:panels]})
    loss_axis, lr_axis = axes[0], axes[1]
    _draw_loss(loss_axis, data)
    plotting.draw_lr(lr_axis, data["lr"])
    plotting.log_lr_axis(lr_axis, data["lr"])
    if data["tests"]:
        accuracy_axis = plotting.draw_tests(axes[2], data["tests"], data["false_accuracies"])
        plotting.finish_test_axes(axes[2], accuracy_axis, [data["tests"]])
    plotting.iteration_axis(axes[-1])
    plotting.draw_marks(list(axes), data["marks"])
    loss_axis.set_title(data["title"], fontsize=10)
    figure.tight_layout()
    return figure


def _draw_loss(ax, data):
    """Raw loss faint, its moving average solid; segments a rollback abandoned faded."""
    runs = data["smoothed"]
    smoothing = data["smoothing"]
    for n, (xs, raw, smooth) in enumerate(runs):
        last = n == len(runs) - 1
        fade = 1.0 if last else 0.4
        if smoothing:
            ax.plot(xs, raw, color="#1f77b4", linewidth=0.8, alpha=plotting.RAW_ALPHA * fade,
                    label="loss" if last else None)
        ax.plot(xs, smooth, color="#1f77b4", linewidth=1.6, alpha=fade,
                label=("loss, smoothed (EMA weight %.3g)" % smoothing if smoothing else "loss")
                if last else ("abandoned by a rollback" if n == 0 else None))
    if data["skips"]:
        ax.plot(data["skips"], [0.03] * len(data["skips"]), "x", color="red", markersize=7,
                transform=ax.get_xaxis_transform(), clip_on=False,
                label="skipped (%d)" % len(data["skips"]))
    plotting.value_axis(ax, [v for _, v in data["loss"]], "loss")
    if data["loss"]:
        ax.legend(loc="best", fontsize=8)
