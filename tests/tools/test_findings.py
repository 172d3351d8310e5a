"""safe_layers.tools.findings, the findings/exit-code convention of `safe-layers`, and the
modules every command shares importing without Caffe."""

import io
import json
import subprocess
import sys

from safe_layers.tools import findings
from safe_layers.core.errors import InputError
from safe_layers.tools.findings import Finding


def test_finding_text_and_json_shapes():
    found = [Finding("n.prototxt", 7, 50, "SL101", "error", "pooling 'pool' ...", fix="pad: 1",
                     layer="pool", data={"rows": [2], "value": float("nan")}),
             Finding("n.prototxt", 1, 1, "SL900", "warning", "w")]
    out = io.StringIO()
    assert findings.emit(found, "text", out) == 1
    assert out.getvalue().splitlines()[0] == "n.prototxt:7:50: SL101 error pooling 'pool' ... — fix: pad: 1"
    out = io.StringIO()
    assert findings.emit(found[1:], "json", out, extra={"checked": 1}) == 0
    document = json.loads(out.getvalue())
    assert document["checked"] == 1 and document["findings"][0]["rule"] == "SL900"
    assert findings.jsonable({"v": [float("inf"), -float("inf")]}) == {"v": ["inf", "-inf"]}
    assert [f.rule for f in findings.select(found, ["SL1"], None)] == ["SL101"]
    assert [f.rule for f in findings.select(found, None, ["SL1"])] == ["SL900"]


def test_schemas_import_without_caffe():
    code = ("import sys, safe_layers.core.schemas as s, safe_layers.tools.findings, safe_layers.readers.prototxt;"
            "assert 'caffe' not in sys.modules, 'caffe imported';"
            "print(sorted(s.SCHEMAS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['GradientClip', 'NaNGuard', 'SafeInfogainLoss', 'StableBatchNorm']"


def test_a_plot_is_written_whole_and_never_through_a_link(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    figure = pyplot.figure(figsize=(2, 2))
    target = tmp_path / "keep.txt"
    target.write_text("keep me\n")
    link = tmp_path / "plot.png"
    link.symlink_to(target)
    try:
        findings.save_png(figure, str(link))
    except InputError as exc:
        assert str(link) in str(exc)
    else:
        raise AssertionError("a plot was written through a symbolic link")
    assert target.read_text() == "keep me\n" and link.is_symlink()
    findings.save_png(figure, str(tmp_path / "plot.prototxt"))  # any suffix: PNG bytes
    assert (tmp_path / "plot.prototxt").read_bytes().startswith(b"\x89PNG")
    pyplot.close(figure)
