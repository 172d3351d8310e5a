"""safe_layers.readers.prototxt, the one reader of every command: nets and solvers told
apart, errors that name the file, line and column."""

import pytest

from safe_layers.readers import prototxt
from safe_layers.core.errors import InputError
from support.paths import DATA

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


def test_a_broken_solver_is_worded_as_a_solver(tmp_path, caffe):
    """Structure broken (an unclosed brace), kind unknown: the error comes from the message
    type that parsed further, not from NetParameter's 'no field named base_lr'."""
    path = tmp_path / "solver.prototxt"
    path.write_text('net: "n.prototxt"\nbase_lr: 0.01\nlr_policy: "fixed"\nmomentum: 0.9\n'
                    'max_iter: 10\nnet_param { name: "x" \n')
    with pytest.raises(InputError) as caught:
        prototxt.read_prototxt(path)
    assert "base_lr" not in str(caught.value)
    assert str(caught.value).endswith("solver.prototxt:6:19: the file ends here, inside 'net_param "
                                      "{ ...' (1 closing '}' missing): is it cut short? (protobuf: "
                                      "Expected \"}\".)")


@pytest.mark.parametrize("cut, expected", [
    # LeNet as published, cut after line 70 ("    stride: 2" of pool1's pooling_param)
    (("lines", 70), r"lenet.prototxt:70:13: the file ends here, inside 'layer \{ pooling_param \{ \.\.\.' "
                    r"\(2 closing '\}' missing\): is it cut short\? \(protobuf: Expected \"\}\"\.\)$"),
    # ... in the middle of a string literal (bias_filler's type: "constant")
    (("bytes", 1500), r"lenet.prototxt:92:13: the file ends here, in the middle of a string \(no closing "
                      r"quote\), inside 'layer \{ convolution_param \{ bias_filler \{ \.\.\.' \(3 closing"),
    # ... after a field name and its colon
    (("suffix", "layer {\n  name: \"x\"\n  type: \"ReLU\"\n  bottom:"),
     r"lenet.prototxt:\d+:\d+: the file ends here, in the middle of field 'bottom' \(no value\), "
     r"inside 'layer \{ \.\.\.' \(1 closing '\}' missing\)"),
])
def test_a_file_cut_short_is_said_to_end_there(tmp_path, caffe, cut, expected):
    text = (DATA / "lenet_train_test.prototxt").read_text()
    how, where = cut
    text = ("".join(text.splitlines(True)[:where]) if how == "lines" else
            text[:where] if how == "bytes" else text + where)
    path = tmp_path / "lenet.prototxt"
    path.write_text(text)
    with pytest.raises(InputError, match=expected):
        prototxt.read_prototxt(path)


def test_a_bad_last_value_is_not_called_cut_short(tmp_path, caffe):
    path = tmp_path / "solver.prototxt"
    path.write_text('base_lr: 0.01\nmax_iter: abc\n')
    with pytest.raises(InputError) as caught:
        prototxt.read_prototxt(path)
    assert str(caught.value) == "%s:2:11: 'max_iter: abc': Couldn't parse integer: abc" % path


def test_a_net_where_a_solver_is_expected_says_so(tmp_path, caffe, capsys):
    from safe_layers.tools import cli
    net = DATA / "lenet_train_test.prototxt"
    with pytest.raises(InputError) as caught:
        prototxt.read_solver(net)
    assert str(caught.value).startswith("%s is a net prototxt, not a solver: " % net)
    assert "no field named" not in str(caught.value)
    assert cli.main(["train", "-solver", str(net)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("safe-layers train: error: %s is a net prototxt, not a solver" % net)
    assert "Traceback" not in err
    # A solver named where a net is expected: the solver's net: line is named.
    solver = tmp_path / "solver.prototxt"
    solver.write_text('base_lr: 0.01\nnet: "%s"\n' % (DATA / "lenet_solver.prototxt"))
    with pytest.raises(InputError, match=r"solver.prototxt:2:1: net: .*lenet_solver.prototxt is a "
                                         r"solver prototxt, not a net"):
        prototxt.solver_nets(prototxt.read_prototxt(solver))
    # A file broken in itself is still worded by protobuf, whatever kind was asked for.
    broken = tmp_path / "broken.prototxt"
    broken.write_text('layer { nmae: "a" }\n')
    with pytest.raises(InputError, match=r'broken.prototxt:1:9: .*no field named "nmae"'):
        prototxt.read_net(broken)
    with pytest.raises(InputError, match=r'broken.prototxt:1:1: .*SolverParameter" has no field named '
                                         r'"layer"'):
        prototxt.read_solver(broken)
