"""The shared prototxt reader and the findings/exit-code convention of `safe-layers`."""

import io
import json
import subprocess
import sys

import pytest

from safe_layers.tools import findings, prototxt
from safe_layers.tools.findings import Finding, InputError

NET = '''name: "tiny"  # a comment with { braces }
layer {
  name: "data" type: "Input" top: "x"
  input_param { shape { dim: 2 dim: 3 dim: 10 dim: 10 } }
}
layer { name: "pool" type: "Pooling" bottom: "x" top: "p"
        pooling_param { pool: AVE kernel_size: 3 stride: 5 } }
layer {
  name: "g" type: "Python" bottom: "p" top: "p"
  python_param { module: "safe_layers" layer: "NaNGuard"
                 param_str: "{name: g," " action: warn}" }
}
'''


@pytest.fixture
def net_file(tmp_path, caffe):
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    return path


def test_layers_pair_with_their_positions(net_file):
    net = prototxt.read_prototxt(net_file)
    assert net.kind == "net"
    pairs = net.layers()
    assert [layer.name for layer, _ in pairs] == ["data", "pool", "g"]
    layer, node = pairs[1]
    assert (node.line, node.col) == (6, 1)
    stride = node.find("pooling_param.stride")
    assert (stride.line, stride.col, stride.value) == (7, 50, "5")
    assert NET.splitlines()[6][49:58] == "stride: 5"
    assert layer.pooling_param.stride == 5
    # The byte span of a block is exactly its text.
    assert net.text[node.start:node.end].startswith('layer { name: "pool"')
    assert net.text[node.start:node.end].endswith("stride: 5 } }")
    # Adjacent string literals join, as protobuf joins them.
    param_str = pairs[2][1].find("python_param.param_str")
    assert param_str.value == pairs[2][0].python_param.param_str == "{name: g, action: warn}"


def test_solver_is_detected_and_its_net_resolved(net_file, tmp_path, monkeypatch):
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text('net: "net.prototxt"\nbase_lr: 0.01\nlr_policy: "fixed"\n')
    monkeypatch.chdir(tmp_path)
    solver = prototxt.read_prototxt(solver_file)
    assert solver.kind == "solver" and solver.message.base_lr == pytest.approx(0.01)
    [(field, net)] = prototxt.solver_nets(solver)
    assert field == "net" and net.reference_note is None and len(net.layers()) == 3
    # Caffe opens `net:` relative to the working directory; from elsewhere it is found
    # beside the solver, with a note that says so.
    monkeypatch.chdir("/")
    [(field, net)] = prototxt.solver_nets(prototxt.read_prototxt(solver_file))
    assert "not in the working directory" in net.reference_note


def test_missing_net_of_a_solver_is_an_input_error(tmp_path, caffe):
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text('base_lr: 0.01\nnet: "nowhere.prototxt"\n')
    with pytest.raises(InputError, match=r"solver.prototxt:2:1: net: 'nowhere.prototxt' does not exist"):
        prototxt.solver_nets(prototxt.read_prototxt(solver_file))


@pytest.mark.parametrize("text, expected", [
    ('layer { name: "a" type: "Input" \n', r"bad.prototxt:\d+:\d+: "),
    ('layer { nmae: "a" }\n', r'bad.prototxt:1:9: .*no field named "nmae"'),
    ('layer { name: "a" type: "Input" top: }\n', r"bad.prototxt:1:\d+: "),
])
def test_malformed_prototxt_names_line_and_column(tmp_path, caffe, text, expected):
    path = tmp_path / "bad.prototxt"
    path.write_text(text)
    with pytest.raises(InputError, match=expected):
        prototxt.read_prototxt(path)


def test_missing_and_binary_files_are_input_errors(tmp_path, caffe):
    with pytest.raises(InputError, match="no such file"):
        prototxt.read_prototxt(tmp_path / "absent.prototxt")
    binary = tmp_path / "weights.caffemodel"
    binary.write_bytes(b"\x0a\x05\xff\xfe\x00")
    with pytest.raises(InputError, match="not UTF-8"):
        prototxt.read_prototxt(binary)


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
    code = ("import sys, safe_layers.schemas as s, safe_layers.tools.findings, safe_layers.tools.prototxt;"
            "assert 'caffe' not in sys.modules, 'caffe imported';"
            "print(sorted(s.SCHEMAS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['GradientClip', 'NaNGuard', 'SafeInfogainLoss', 'StableBatchNorm']"


def test_a_broken_solver_is_worded_as_a_solver(tmp_path, caffe):
    """Structure broken (an unclosed brace), kind unknown: the error comes from the message
    type that parsed further, not from NetParameter's 'no field named base_lr'."""
    path = tmp_path / "solver.prototxt"
    path.write_text('net: "n.prototxt"\nbase_lr: 0.01\nlr_policy: "fixed"\nmomentum: 0.9\n'
                    'max_iter: 10\nnet_param { name: "x" \n')
    with pytest.raises(InputError) as caught:
        prototxt.read_prototxt(path)
    assert "base_lr" not in str(caught.value)
    assert str(caught.value).endswith("solver.prototxt:6:19: Expected \"}\".")
