"""The figures of `safe-layers train` and `safe-layers diagnose --plot`: the data they draw
(TensorBoard's EMA against a hand computation, the rate's log axis, marks at the right
iterations, accuracy beside a non-finite loss, several logs on one figure) and the PNG
read back (size, not blank). No golden images."""

import math

import pytest

from safe_layers.tools import plotting
from safe_layers.tools.diagnose import plot as diagnose_plot
from safe_layers.tools.diagnose.reading import read_log
from safe_layers.tools.train import plot as train_plot
from support.diagnose_runs import run_diagnose, train_log
from support.nets import POOLING_NET


def read_png(path):
    """(width, height, distinct colours) of the PNG at ``path``."""
    from PIL import Image
    with Image.open(path) as image:
        assert image.format == "PNG"
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        return image.size[0], image.size[1], len(colours)


def test_ema_is_tensorboards_debiased_average():
    # By hand, weight 0.5: last = 0.5 * 1 = 0.5 -> 0.5 / (1 - 0.5) = 1;
    # last = 0.25 + 1.5 = 1.75 -> 1.75 / 0.75; nan passes through, enters nothing;
    # last = 0.875 + 2.5 = 3.375 -> 3.375 / 0.875.
    got = plotting.ema([1.0, 3.0, float("nan"), 5.0], 0.5)
    assert got[0] == pytest.approx(1.0) and got[1] == pytest.approx(1.75 / 0.75)
    assert math.isnan(got[2]) and got[3] == pytest.approx(3.375 / 0.875)
    assert plotting.ema([2.0, 4.0], 0.0) == [2.0, 4.0]
    with pytest.raises(ValueError):
        plotting.ema([1.0], 1.0)
    # The automatic weight: a window of 1/50th of the points; none for 100 or fewer.
    assert plotting.auto_smoothing(100) == 0.0
    assert plotting.auto_smoothing(1000) == pytest.approx(1 - 1 / 20)
    # A rollback's segment starts its own average.
    (xs1, _, s1), (xs2, _, s2) = plotting.smoothed_segments([(0, 1.0), (1, 3.0), (0, 10.0)], 0.5)
    assert xs1 == [0, 1] and xs2 == [0] and s2 == [pytest.approx(10.0)]


def test_lr_axis_and_iteration_ticks():
    low, high = plotting.lr_limits([0.1] * 5)
    assert (low, high) == (pytest.approx(0.1 / math.sqrt(10)), pytest.approx(0.1 * math.sqrt(10)))
    assert plotting.lr_limits([0.1, 0.001, 0, float("nan")]) == (pytest.approx(0.001 / 1.5),
                                                                pytest.approx(0.15))
    assert plotting.lr_limits([0, -1]) is None
    assert [plotting.iteration_label(v) for v in (0, 500, 1000, 2500, 40000, 2e6)] == \
        ["0", "500", "1k", "2.5k", "40k", "2M"]


def _events():
    """A `safe-layers train` event log: 30 iterations, a non-finite loss at 19 skipped then
    rolled back to 10, a test at 0 and 20 (NaN loss beside accuracy 1 at 20), stopped at 25."""
    events = [{"event": "run", "solver": "/x/lenet_solver.prototxt"},
              {"event": "start", "iteration": 0, "net": "LeNet"}]
    for it in range(20):
        events.append({"event": "iteration", "iteration": it, "loss": 2.0 / (it + 1), "lr": 0.01})
        if it == 0:
            events.append({"event": "test", "iteration": 0, "net": 0,
                           "outputs": {"accuracy": [0.1], "loss": [2.3]}})
    events[-1]["loss"] = "nan"
    events += [{"event": "watch", "kind": "skip", "iteration": 19},
               {"event": "fault", "action": "skip", "iteration": 19},
               {"event": "watch", "kind": "rollback", "iteration": 10, "from": 19}]
    for it in range(10, 26):
        events.append({"event": "iteration", "iteration": it, "loss": 0.5, "lr": 0.001})
        if it == 20:
            events.append({"event": "test", "iteration": 20, "net": 0,
                           "outputs": {"accuracy": [1.0], "loss": ["nan"]}})
    events.append({"event": "stopped", "iteration": 25, "line": "WATCH ..."})
    return events


def test_train_figure_data_and_png(tmp_path):
    data = train_plot.figure_data(_events(), smoothing=0.5)
    assert data["title"] == "lenet_solver.prototxt (net LeNet)"
    assert [(m.iteration, m.style) for m in data["marks"]] == [(19, "nonfinite"), (19, "rollback"),
                                                             (25, "stop")]
    assert data["marks"][1].label == "rolled back to 10"
    assert data["skips"] == [19]
    assert data["false_accuracies"] == [(20, "accuracy", 1.0)]
    assert data["tests"]["loss"][0] == (0, 2.3) and math.isnan(data["tests"]["loss"][1][1])
    first, second = data["smoothed"]
    assert first[0] == list(range(20)) and second[0] == list(range(10, 26))
    assert first[2][1] == pytest.approx((0.25 * 2.0 + 0.5 * 1.0) / 0.75)
    # Adding a mark kind is a Mark in the list, drawn like the others.
    data["marks"].append(plotting.Mark(12, "dead", "dead"))
    figure = train_plot.draw(data)
    loss_axis, lr_axis, test_axis = figure.axes[:3]
    assert lr_axis.get_yscale() == "log"
    assert lr_axis.get_ylim()[0] < 0.001 and lr_axis.get_ylim()[1] > 0.01
    assert loss_axis.get_xaxis().get_major_formatter()(2000, 0) == "2k"
    lines = [l.get_xdata()[0] for l in loss_axis.get_lines() if l.get_linestyle() in ("--", "-", ":")
             and len(l.get_xdata()) == 2 and l.get_xdata()[0] == l.get_xdata()[1]]
    assert {19, 25, 12} <= set(lines)
    assert len(figure.axes) == 4      # the test panel and its accuracy axis
    import matplotlib.pyplot
    matplotlib.pyplot.close(figure)
    png = tmp_path / "t.png"
    train_plot.write_plot(_events(), png)
    width, height, colours = read_png(png)
    assert (width, height) == (1000, 920) and colours > 20
    # A run without tests has two panels; constant lr: a decade around it.
    plain = [e for e in _events() if e["event"] != "test"]
    assert not train_plot.figure_data(plain)["tests"]
    train_plot.write_plot(plain, png)
    assert read_png(png)[1] < height


ACCURACY = """layer { name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy"
  include { phase: TEST } }
"""


@pytest.fixture
def nan_log(caffe_train, tmp_path):
    """A real `caffe train` log whose net is NaN from the first forward (AVE pooling past its
    input), tested at 0, 2, 4: Caffe prints accuracy 1 beside a -nan loss."""
    log, result = train_log(caffe_train, tmp_path, "nan.log", POOLING_NET + ACCURACY, max_iter=4,
                            display=1, test_iter=1, test_interval=2)
    assert result.returncode == 0
    return log


def test_diagnose_figure_data_of_a_nan_run(nan_log, tmp_path):
    d = read_log(str(nan_log))
    data = diagnose_plot.figure_data(d, smoothing=0.0)
    assert [(m.iteration, m.style) for m in data["marks"]] == [(0, "nonfinite")]
    assert data["false_accuracies"] == [(0, "accuracy", 1.0), (2, "accuracy", 1.0),
                                        (4, "accuracy", 1.0)]
    assert sorted(data["tests"]) == ["accuracy", "loss"]
    assert [x for x, _ in data["tests"]["loss"]] == [0, 2, 4]
    assert data["title"] == "nan.log (net pooling_nan)"
    figure = diagnose_plot.draw([d])
    assert figure.axes[1].get_yscale() == "log"
    import matplotlib.pyplot
    matplotlib.pyplot.close(figure)
    png = tmp_path / "nan.png"
    assert run_diagnose(nan_log, "--plot", png, "--smoothing", "0.9")[0] == 1
    width, height, colours = read_png(png)
    assert width == 1100 and colours > 20


def test_diagnose_overlays_several_logs(nan_log, tmp_path, caffe_train):
    from support.nets import DIVERGING_NET
    other, _ = train_log(caffe_train, tmp_path, "diverging.log", DIVERGING_NET.replace("LAYER", ""),
                         base_lr=0.1, max_iter=40, display=1)
    diagnoses = [read_log(str(nan_log)), read_log(str(other))]
    figure = diagnose_plot.draw(diagnoses)
    loss_axis = figure.axes[0]
    labels = loss_axis.get_legend_handles_labels()[1]
    assert any(l.startswith("nan.log") for l in labels) and any(l.startswith("diverging.log") for l in labels)
    colours = {l.get_label(): l.get_color() for l in loss_axis.get_lines() if l.get_label()[:1] != "_"}
    assert len(set(colours.values())) == 2
    assert "2 runs: nan.log, diverging.log" == loss_axis.get_title()
    import matplotlib.pyplot
    matplotlib.pyplot.close(figure)
    png = tmp_path / "both.png"
    status, out, _ = run_diagnose(nan_log, other, "--plot", png)
    assert status == 1 and "plot: %s" % png in out
    assert out.count("log: ") == 2           # each log's findings and summary
    assert read_png(png)[2] > 20
    status, out, _ = run_diagnose(nan_log, other, "--format", "json")
    import json
    doc = json.loads(out)
    assert [log["log"] for log in doc["logs"]] == [str(nan_log), str(other)]
    assert {f["path"] for f in doc["findings"]} == {str(nan_log), str(other)}
    with pytest.raises(SystemExit) as refused:      # argparse's error: exit 2
        run_diagnose(nan_log, other, "--smoothing", "1")
    assert refused.value.code == 2
