"""`safe-layers lint`: every rule fails on a bad case and passes on a good one; the seed
traps are confirmed in real Caffe where lint says they are; published nets lint clean."""

import json
import math
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from safe_layers.core import lr_policy
from safe_layers.tools import cli
from safe_layers.tools.lint.rules import RULES
from support.nets import regression_net
from support.paths import DATA, ROOT


@pytest.fixture
def lint(caffe, tmp_path, monkeypatch, capsys):
    """lint(*argv) -> (exit status, JSON document) run in tmp_path, in this process (a
    Caffe abort in the child that builds the net must not end it)."""
    monkeypatch.chdir(tmp_path)

    def run(*argv, fmt="json"):
        capsys.readouterr()
        status = cli.main(["lint", "--format", fmt] + [str(a) for a in argv])
        out, err = capsys.readouterr()
        return status, (json.loads(out) if fmt == "json" and status != 2 else out + err)

    return run


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def rules_of(document):
    return sorted({f["rule"] for f in document["findings"]})


def only(document, rule):
    found = [f for f in document["findings"] if f["rule"] == rule]
    assert len(found) == 1, document["findings"]
    return found[0]


INPUT = 'layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: %d dim: %d } } }\n'


def pooling_net(pool="AVE", kernel=3, stride=5, size=10, extra=""):
    return (INPUT % (size, size) +
            'layer { name: "pool" type: "Pooling" bottom: "x" top: "p"\n'
            '  pooling_param { pool: %s kernel_size: %d stride: %d %s } }\n' % (pool, kernel, stride, extra))


# --- the seed's pooling trap, confirmed in Caffe -------------------------------------------

@pytest.mark.parametrize("pool, kernel, stride, size, rows", [
    ("AVE", 3, 5, 10, [2]),   # the seed: 3x3 output, last row and column 0/0
    ("MAX", 2, 3, 6, [2]),    # caffe-internals §3: -FLT_MAX in the last row and column
    ("MAX", 1, 2, 6, [3]),    # BVLC issue #6881's 6x6, k1, s2
])
def test_pooling_windows_outside_input_are_where_caffe_puts_them(lint, tmp_path, make_net, pool, kernel,
                                                                 stride, size, rows):
    text = pooling_net(pool, kernel, stride, size)
    status, doc = lint(write(tmp_path, "net.prototxt", text))
    assert status == 1
    finding = only(doc, "SL201")
    assert finding["rows"] == rows and finding["cols"] == rows
    assert finding["line"] == 3 and finding["layer"] == "pool"
    if pool == "AVE":
        assert finding["nan_rows"] == rows and "NaN" in finding["message"]
    # Real Caffe, same geometry, finite input: the bad values sit exactly where lint said.
    net = make_net(text)
    net.blobs["x"].data[...] = np.random.RandomState(0).uniform(0.5, 1.0, net.blobs["x"].data.shape)
    out = net.forward()["p"]
    assert list(out.shape[2:]) == finding["output"]
    bad = np.isnan(out) if pool == "AVE" else (out == -np.float32(3.4028235e38))
    expected = np.zeros(out.shape[2:], bool)
    expected[rows, :] = True
    expected[:, rows] = True
    assert (bad == expected[None, None]).all()
    # The first suggested fix (round_mode: FLOOR) leaves Caffe no bad value, and lint quiet.
    assert finding["fix"].startswith("round_mode: FLOOR")
    fixed = pooling_net(pool, kernel, stride, size, "round_mode: FLOOR")
    status, doc = lint(write(tmp_path, "fixed.prototxt", fixed))
    assert status == 0 and doc["findings"] == []
    out = make_net(fixed).forward()["p"]
    assert np.isfinite(out).all() and (out > -1e38).all()


def test_same_pooling_on_a_fitting_input_is_clean_in_lint_and_caffe(lint, tmp_path, make_net):
    text = pooling_net("AVE", 3, 5, 7)  # the seed's 7x7: (7-3) mod 5 = 4 > 2
    status, doc = lint(write(tmp_path, "net.prototxt", text))
    assert status == 0 and doc["findings"] == []
    assert np.isfinite(make_net(text).forward()["p"]).all()


def test_without_shapes_stride_over_kernel_is_a_warning(lint, tmp_path):
    path = write(tmp_path, "net.prototxt", pooling_net("AVE", 3, 5, 10))
    status, doc = lint("--no-shapes", path)
    assert status == 0 and rules_of(doc) == ["SL202"]
    status, doc = lint("--no-shapes", write(tmp_path, "ok.prototxt", pooling_net("AVE", 3, 3, 10)))
    assert doc["findings"] == []


# --- the seed's learning-rate trap, confirmed with solver.step ------------------------------

TINY_NET = regression_net()


def solver_file(tmp_path, name, **fields):
    net = write(tmp_path, "tiny.prototxt", TINY_NET)
    lines = ['net: "%s"' % net.name] + ["%s: %s" % kv for kv in fields.items()]
    return write(tmp_path, name, "\n".join(lines) + "\n")


def caffe_rates(caffe, solver_path, steps):
    """solver.lr at iterations 0..steps-1, read from a real SGDSolver as it steps."""
    solver = caffe.SGDSolver(str(solver_path))
    rates = []
    for _ in range(steps):
        rates.append(solver.lr)
        solver.step(1)
    return np.array(rates, np.float32)


def test_poly_without_max_iter_is_nan_at_iteration_0_as_in_caffe(lint, tmp_path, caffe):
    path = solver_file(tmp_path, "solver.prototxt", base_lr=0.01, lr_policy='"poly"', power=0.9,
                       display=0)
    status, doc = lint(path)
    assert status == 1
    finding = only(doc, "SL102")
    assert finding["iteration"] == 0 and finding["lr"] == "nan" and finding["kind"] == "NaN"
    assert "SL101" in rules_of(doc) and "SL104" in rules_of(doc)
    rates = caffe_rates(caffe, path, 3)
    assert math.isnan(rates[0]) and np.isposinf(rates[1:]).all()
    message = caffe.proto.caffe_pb2.SolverParameter()
    message.lr_policy, message.base_lr, message.power = "poly", 0.01, 0.9
    np.testing.assert_array_equal(lr_policy.rates(message, 0, 3), rates)


def test_poly_past_max_iter_is_nan_where_lint_says(lint, tmp_path, caffe):
    path = solver_file(tmp_path, "solver.prototxt", base_lr=0.01, lr_policy='"poly"', power=0.9,
                       max_iter=5, display=0)
    status, doc = lint(path)
    assert status == 0 and rules_of(doc) == ["SL109"]
    status, doc = lint("--iterations", 8, path)
    finding = only(doc, "SL102")
    assert (finding["iteration"], finding["kind"]) == (5, "zero")  # 1 - 5/5 = 0
    rates = caffe_rates(caffe, path, 8)
    assert rates[5] == 0 and np.isnan(rates[6:]).all() and (rates[:5] > 0).all()


def test_exp_with_gamma_over_1_overflows_where_caffe_does(lint, tmp_path, caffe):
    path = solver_file(tmp_path, "solver.prototxt", base_lr=0.01, lr_policy='"exp"', gamma=2.0,
                       max_iter=140, display=0)
    status, doc = lint(path)
    finding = only(doc, "SL102")
    assert finding["kind"] == "infinite" and finding["lr"] == "inf"
    rates = caffe_rates(caffe, path, finding["iteration"] + 1)
    assert np.isposinf(rates[-1]) and np.isfinite(rates[:-1]).all()


# --- one failing and one passing case for every rule -----------------------------------------

SOLVER_CASES = {
    "SL101": (dict(lr_policy='"step"', gamma=0.1), dict(lr_policy='"step"', gamma=0.1, stepsize=10)),
    "SL102": (dict(lr_policy='"fixed"', base_lr=-0.01), dict(lr_policy='"fixed"')),
    "SL103": (dict(lr_policy='"cosine"'), dict(lr_policy='"fixed"')),
    "SL104": (dict(lr_policy='"fixed"', max_iter=0), dict(lr_policy='"fixed"')),
    "SL105": (dict(lr_policy='"fixed"', momentum=1.0), dict(lr_policy='"fixed"', momentum=0.9)),
    "SL106": (dict(lr_policy='"fixed"', weight_decay=-0.0005), dict(lr_policy='"fixed"', weight_decay=0.0005)),
    "SL107": (dict(lr_policy='"fixed"', clip_gradients=0), dict(lr_policy='"fixed"', clip_gradients=10)),
    "SL109": (dict(lr_policy='"poly"', power=0.9), dict(lr_policy='"poly"', power=2)),
    "SL110": (dict(lr_policy='"fixed"', type='"Adam"', delta=0), dict(lr_policy='"fixed"', type='"Adam"', delta=1e-8)),
}


@pytest.mark.parametrize("rule", sorted(SOLVER_CASES))
def test_solver_rule_fails_and_passes(lint, tmp_path, rule):
    bad, good = SOLVER_CASES[rule]
    for fields, expect in ((bad, True), (good, False)):
        values = dict(base_lr=0.01, max_iter=100, display=0)
        values.update(fields)
        status, doc = lint(solver_file(tmp_path, "solver.prototxt", **values))
        assert (rule in rules_of(doc)) == expect, (fields, doc["findings"])
        if not expect:
            assert status == 0, doc["findings"]
    assert RULES[rule].id == rule


def test_iter_size_of_our_layers_against_the_solver(lint, tmp_path):
    for iter_size, expect in ((1, True), (4, False)):
        net = write(tmp_path, "net.prototxt", TINY_NET + """
layer { name: "g" type: "Python" bottom: "y" top: "y"
  python_param { module: "safe_layers" layer: "NaNGuard" param_str: "{name: g, iter_size: %d}" } }
""" % iter_size)
        solver = write(tmp_path, "solver.prototxt", 'net: "%s"\nbase_lr: 0.01\nlr_policy: "fixed"\n'
                       'max_iter: 10\niter_size: 4\n' % net.name)
        status, doc = lint(solver)
        assert ("SL108" in rules_of(doc)) == expect, doc["findings"]
        if expect:
            line = next(i for i, text in enumerate(net.read_text().splitlines(), 1) if "param_str" in text)
            assert only(doc, "SL108")["line"] == line


LOGITS = INPUT % (1, 1) + """
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 2 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc" inner_product_param { num_output: 3 } }
"""


def h_file(tmp_path, caffe, matrix, name="H.binaryproto"):
    blob = caffe.proto.caffe_pb2.BlobProto()
    matrix = np.asarray(matrix, np.float32)
    blob.shape.dim.extend([1, 1, 3, 3])
    blob.data.extend(matrix.ravel().tolist())
    (tmp_path / name).write_bytes(blob.SerializeToString())
    return name


def stable_bn(params=3, extra="", param_str="{name: bn}"):
    return (INPUT % (4, 4) + 'layer { name: "bn" type: "Python" bottom: "x" top: "x" %s %s\n'
            '  python_param { module: "safe_layers" layer: "StableBatchNorm" param_str: "%s" } }\n'
            % ("param { lr_mult: 0 } " * params, extra, param_str))


def net_cases(tmp_path, caffe):
    identity_h = h_file(tmp_path, caffe, np.eye(3), "I.binaryproto")
    nan_h = h_file(tmp_path, caffe, [[1, 0, 0], [0, float("nan"), 0], [0, 0, 1]], "nan.binaryproto")
    heavy_h = h_file(tmp_path, caffe, 2 * np.eye(3), "heavy.binaryproto")
    infogain = LOGITS + ('layer { name: "loss" type: "InfogainLoss" bottom: "%s" bottom: "label" '
                         'top: "loss" infogain_loss_param { source: "%s" } }\n')
    softmax = 'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n'
    conv = INPUT % (4, 4) + ('layer { name: "conv" type: "Convolution" bottom: "x" top: "c" '
                             'convolution_param { num_output: 2 kernel_size: 1 } }\n')
    bn = INPUT % (4, 4) + ('layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" %s }\n'
                           'layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "y" top: "loss" }\n')
    guard = INPUT % (4, 4) + ('layer { name: "g" type: "Python" bottom: "x" top: "x" python_param { '
                              'module: "safe_layers" layer: "%s" param_str: "%s" } }\n')
    safe_loss = LOGITS + ('layer { name: "loss" type: "Python" bottom: "fc" bottom: "label" top: "loss" %s '
                          'python_param { module: "safe_layers" layer: "SafeInfogainLoss" '
                          'param_str: "{name: loss, source: %s}" } }\n')
    two_losses = LOGITS + ('layer { name: "l1" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "l1" }\n'
                           'layer { name: "l2" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "l2" '
                           'loss_weight: %g }\n')
    return {
        "SL001": (pooling_net("MAX", 2, 2, 10, "pad: 2"), pooling_net("MAX", 2, 2, 10, "pad: 1")),
        "SL002": (INPUT.replace('"Input"', '"Data"').split(" input_param")[0] + " }\n", INPUT % (4, 4)),
        "SL003": (INPUT % (4, 4) + 'layer { name: "py" type: "Python" bottom: "x" top: "y" '
                  'python_param { module: "no_such_module_here" layer: "L" } }\n',
                  guard % ("NaNGuard", "{name: g}")),
        "SL301": ((LOGITS + softmax + infogain[len(LOGITS):]) % ("prob", identity_h),
                  infogain % ("fc", identity_h)),
        "SL302": (infogain % ("fc", nan_h), infogain % ("fc", identity_h)),
        "SL303": (infogain % ("fc", heavy_h), infogain % ("fc", identity_h)),
        "SL304": (safe_loss % ("", identity_h), safe_loss % ("loss_weight: 1", identity_h)),
        "SL305": (two_losses % 1000, two_losses % 1),
        "SL401": (bn % "batch_norm_param { use_global_stats: true }", bn % ""),
        "SL402": (bn % "param { lr_mult: 1 } param { lr_mult: 0 } param { lr_mult: 0 }",
                  bn % "param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 }"),
        "SL403": (bn % "batch_norm_param { eps: 0 }", bn % "batch_norm_param { eps: 1e-5 }"),
        "SL404": (stable_bn(params=0), stable_bn()),
        "SL501": (stable_bn(extra="batch_norm_param { use_global_stats: true }"),
                  stable_bn(param_str="{name: bn, use_global_stats: true}")),
        "SL601": (guard % ("NaNGuard", "{name: g, acton: clamp}"), guard % ("NaNGuard", "{name: g, action: clamp}")),
        "SL602": (guard % ("NaNGaurd", "{name: g}"), guard % ("NaNGuard", "{name: g}")),
        "SL701": (conv + 'layer { name: "log" type: "Log" bottom: "c" top: "l" }\n',
                  conv + 'layer { name: "sm" type: "Softmax" bottom: "c" top: "s" }\n'
                  'layer { name: "log" type: "Log" bottom: "s" top: "l" log_param { shift: 1e-6 } }\n'),
        "SL702": (conv + 'layer { name: "pw" type: "Power" bottom: "c" top: "p" power_param { power: 0.5 } }\n',
                  conv + 'layer { name: "relu" type: "ReLU" bottom: "c" top: "c" }\n'
                  'layer { name: "pw" type: "Power" bottom: "c" top: "p" power_param { power: 0.5 } }\n'),
        "SL703": (conv + 'layer { name: "ex" type: "Exp" bottom: "c" top: "e" }\n',
                  conv + 'layer { name: "sg" type: "Sigmoid" bottom: "c" top: "s" }\n'
                  'layer { name: "ex" type: "Exp" bottom: "s" top: "e" }\n'),
    }


NET_RULES = ["SL001", "SL002", "SL003", "SL301", "SL302", "SL303", "SL304", "SL305", "SL401", "SL402",
             "SL403", "SL404", "SL501", "SL601", "SL602", "SL701", "SL702", "SL703"]


@pytest.mark.parametrize("rule", NET_RULES)
def test_net_rule_fails_and_passes(lint, tmp_path, caffe, rule):
    bad, good = net_cases(tmp_path, caffe)[rule]
    status, doc = lint(write(tmp_path, "bad.prototxt", bad))
    assert rule in rules_of(doc), doc["findings"]
    assert status == (0 if RULES[rule].severity != "error" else 1)
    status, doc = lint(write(tmp_path, "good.prototxt", good))
    assert rule not in rules_of(doc), doc["findings"]
    assert status == 0, doc["findings"]


def test_caffe_refusal_names_the_layer_and_caffes_words(lint, tmp_path):
    status, doc = lint(write(tmp_path, "net.prototxt", pooling_net("MAX", 2, 2, 10, "pad: 2")))
    finding = only(doc, "SL001")
    assert status == 1 and finding["layer"] == "pool" and finding["line"] == 2
    assert "Check failed: pad_h_ < kernel_h_ (2 vs. 2)" in finding["message"]
    assert finding["location"].startswith("pooling_layer.cpp:")


def test_param_str_error_is_the_layers_own(lint, tmp_path, caffe, make_net):
    bad, _ = net_cases(tmp_path, caffe)["SL601"]
    _, doc = lint(write(tmp_path, "net.prototxt", bad))
    message = only(doc, "SL601")["message"]
    with pytest.raises(Exception) as raised:
        make_net(bad)
    assert str(raised.value).split("\n")[-1].strip() in message or "unknown key 'acton'" in message
    assert "unknown key 'acton'; allowed keys: action" in message


def test_ignored_batch_norm_param_names_the_key_to_move(lint, tmp_path):
    _, doc = lint(write(tmp_path, "net.prototxt",
                        stable_bn(extra="batch_norm_param { use_global_stats: true eps: 0.001 }")))
    finding = only(doc, "SL501")
    assert finding["keys"] == ["use_global_stats", "eps"]
    assert 'param_str: "{use_global_stats: true, eps: 0.001}"' in finding["fix"]


def test_data_layer_shape_from_the_command_line(lint, tmp_path):
    net = INPUT.replace('"Input"', '"Data"').split(" input_param")[0] + " data_param { batch_size: 2 } }\n"
    net += ('layer { name: "pool" type: "Pooling" bottom: "x" top: "p" '
            'pooling_param { pool: AVE kernel_size: 3 stride: 5 } }\n')
    path = write(tmp_path, "net.prototxt", net)
    _, doc = lint(path)
    assert rules_of(doc) == ["SL002", "SL202"]
    status, doc = lint("--input-shape", "x=7,3,10,10", path)
    finding = only(doc, "SL201")
    assert finding["bottom_shape"] == [7, 3, 10, 10]  # what the user gives wins, N included


# --- where a data top's shape comes from: --input-shape > the declaration > the source -------

def shapes_of(text, tmp_path, *given, phase="TRAIN", name="net.prototxt"):
    """Shapes real Caffe gives ``text``'s net with ``given`` --input-shape values."""
    from safe_layers.readers import netshapes, prototxt
    net = prototxt.read_net(write(tmp_path, name, text))
    built = netshapes.infer(net.message, net.path, phase, netshapes.parse_input_shapes(given))
    assert built.known, (built.unknown, built.failure)
    return built


def lmdb_of_10x10(tmp_path, caffe, name="train_lmdb"):
    import lmdb
    env = lmdb.open(str(tmp_path / name), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(4):
            datum = caffe.proto.caffe_pb2.Datum(channels=1, height=10, width=10, label=i,
                                                data=bytes(range(100)))
            txn.put(b"%08d" % i, datum.SerializeToString())
    env.close()
    return tmp_path / name


def test_input_shape_beats_declaration_beats_first_record(tmp_path, caffe):
    source = lmdb_of_10x10(tmp_path, caffe)
    data = ('layer { name: "data" type: "Data" top: "x" top: "label" %s'
            'data_param { source: "%s" backend: LMDB batch_size: 2 } }\n'
            'layer { name: "r" type: "ReLU" bottom: "x" top: "y" }\n')
    plain, cropped = data % ("", source), data % ("transform_param { crop_size: 8 } ", source)
    # The first record of the source: 1x10x10, N from batch_size.
    built = shapes_of(plain, tmp_path)
    assert built.top_shape("r") == (2, 1, 10, 10) and built.top_shape("data", 1) == (2,)
    # The declaration (crop_size) over the record.
    assert shapes_of(cropped, tmp_path).top_shape("r") == (2, 1, 8, 8)
    # --input-shape over both, its N included; the label takes that N (tops share a batch).
    for text in (plain, cropped):
        built = shapes_of(text, tmp_path, "x=3,1,12,12")
        assert built.top_shape("r") == (3, 1, 12, 12) and built.top_shape("data", 1) == (3,)
        assert built.data_shapes["x"] == ((3, 1, 12, 12), "--input-shape")
    # By the name of a one-top data layer, too; and over an Input layer's declared shape.
    one_top = INPUT % (10, 10) + 'layer { name: "r" type: "ReLU" bottom: "x" top: "y" }\n'
    assert shapes_of(one_top, tmp_path).top_shape("r") == (2, 3, 10, 10)
    assert shapes_of(one_top, tmp_path, "data=1,3,7,7").top_shape("r") == (1, 3, 7, 7)
    # A DummyData layer's label takes the N given for its data, as a Data layer's does.
    dummy = ('layer { name: "d" type: "DummyData" top: "x" top: "label" dummy_data_param { '
             'shape { dim: 64 dim: 1 dim: 4 dim: 4 } shape { dim: 64 } } }\n'
             'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" '
             'inner_product_param { num_output: 2 } }\n'
             'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n')
    built = shapes_of(dummy, tmp_path, "x=8,1,4,4")
    assert built.top_shape("ip") == (8, 2) and built.top_shape("d", 1) == (8,)


@pytest.mark.parametrize("given, conv1", [((), (1, 64, 112, 112)), (("data=2,3,448,448",), (2, 64, 224, 224))])
def test_input_shape_over_the_legacy_net_input(tmp_path, caffe, given, conv1):
    """ResNet-50 deploy declares its input at net level (input: + input_dim)."""
    text = (DATA / "resnet50_deploy.prototxt").read_text()
    assert "\ninput_dim: 224" in text
    assert shapes_of(text, tmp_path, *given).top_shape("conv1") == conv1


def test_input_shape_the_net_refuses_is_named_as_a_possible_cause(lint, tmp_path):
    # ResNet-50 deploy at 32x32: res5 is 1x1, where pool5's 7x7 window does not fit.
    status, doc = lint("--input-shape", "data=2,3,32,32", DATA / "resnet50_deploy.prototxt")
    finding = only(doc, "SL001")
    assert status == 1 and finding["layer"] == "pool5" and finding["input_shapes"] == {"data": [2, 3, 32, 32]}
    assert finding["message"].endswith("; the net was built with the shape given by --input-shape "
                                       "data=2,3,32,32, which may be the cause")
    # A shape of 3 axes is a blob shape Caffe accepts; LeNet's conv1 then has no room for
    # its 5x5 kernel, and the finding says where the shape came from.
    shutil.copy(DATA / "lenet_train_test.prototxt", tmp_path)
    status, doc = lint("--input-shape", "data=1,2,3", tmp_path / "lenet_train_test.prototxt")
    finding = only(doc, "SL001")
    assert status == 1 and finding["layer"] == "conv1"
    assert "Check failed: shape[i] >= 0 (-1 vs. 0)" in finding["message"]
    assert "--input-shape data=1,2,3, which may be the cause" in finding["message"]
    assert finding["fix"].startswith("check --input-shape data=1,2,3 (N,C,H,W for an image net); "
                                     "if it is right, fix layer 'conv1'")
    # Without --input-shape the refusal is Caffe's alone.
    status, doc = lint(write(tmp_path, "net.prototxt", pooling_net("MAX", 2, 2, 10, "pad: 2")))
    assert "--input-shape" not in only(doc, "SL001")["message"] + only(doc, "SL001")["fix"]


@pytest.mark.parametrize("value, ok", [("data=1,2,3", True), ("data=5", True), ("data=" + ",".join(["1"] * 32), True),
                                       ("data=" + ",".join(["1"] * 33), False), ("data=1,0,3", False),
                                       ("data=", False), ("=1,2", False), ("data=1,x", False)])
def test_input_shape_values(value, ok):
    from safe_layers.readers import netshapes
    if ok:
        assert netshapes.parse_input_shapes([value]) == {"data": tuple(map(int, value[5:].split(",")))}
    else:
        with pytest.raises(ValueError, match=r"expected NAME=N,C,H,W \(a blob shape: 1 to 32 positive"):
            netshapes.parse_input_shapes([value])


def test_input_shape_naming_no_data_top_exits_2(lint, tmp_path):
    shutil.copy(DATA / "lenet_train_test.prototxt", tmp_path)
    net = write(tmp_path, "net.prototxt", pooling_net())
    status, output = lint("--input-shape", "foo=1,2,3,4", "--input-shape", "data=1,3,10,10",
                          tmp_path / "lenet_train_test.prototxt", net)
    assert status == 2 and "Traceback" not in output and output.count("\n") == 1
    assert output == ("safe-layers lint: error: --input-shape foo: no data top or data layer of that "
                      "name in the nets linted (data tops: %s: data, label; %s: x)\n"
                      % (tmp_path / "lenet_train_test.prototxt", net))
    # The name of a one-top data layer is a name --input-shape takes.
    status, doc = lint("--input-shape", "data=2,3,10,10", net)
    assert status == 1 and only(doc, "SL201")["bottom_shape"] == [2, 3, 10, 10]


# --- select, ignore, formats, exit 2 ---------------------------------------------------------

def test_select_ignore_and_text_format(lint, tmp_path):
    path = solver_file(tmp_path, "solver.prototxt", base_lr=0.01, lr_policy='"poly"', power=0.9)
    path = path.name
    status, doc = lint("--select", "SL102", path)
    assert rules_of(doc) == ["SL102"] and status == 1
    status, doc = lint("--ignore", "SL1", path)
    assert doc["findings"] == [] and status == 0
    status, text = lint("--select", "SL102", path, fmt="text")
    line = text.splitlines()[0]
    assert line.startswith("solver.prototxt:3:1: SL102 error lr_policy 'poly'")
    assert " — fix: set max_iter" in line
    assert text.splitlines()[-1].startswith("lint: 1 error, 0 warnings, 0 notes")


@pytest.mark.parametrize("option, ids, bad", [
    ("--select", "SL999", "SL999"), ("--select", "SL102,SL91", "SL91"), ("--ignore", "SL9", "SL9"),
    ("--ignore", "sl1", "sl1"),
])
def test_select_or_ignore_of_no_rule_exits_2(lint, tmp_path, option, ids, bad):
    """A typo in --select would select nothing and report a clean run: it is refused."""
    path = solver_file(tmp_path, "solver.prototxt", base_lr=0.01, lr_policy='"poly"', power=0.9)
    status, output = lint(option, ids, path)
    assert status == 2 and "Traceback" not in output
    assert "safe-layers lint: error: %s %s: no such rule (this command's rules: SL001, " % (option, bad) in output
    assert "SL703" in output  # the ids come from the rule registry, the last rule included


@pytest.mark.parametrize("text, expected", [
    ('layer { name: "a" type: "Input" \n', r"bad.prototxt:\d+:\d+: "),
    ('layer { name: "a" type: "Frobnicate" top: "x" }\n',
     "bad.prototxt:1:19: layer 'a' has type 'Frobnicate', which this Caffe does not know"),
    ('net: "missing.prototxt"\nbase_lr: 0.1\n', "bad.prototxt:1:1: net: 'missing.prototxt' does not exist"),
])
def test_unreadable_input_exits_2_with_a_clear_message(lint, tmp_path, text, expected):
    import re
    path = write(tmp_path, "bad.prototxt", text)
    status, output = lint(path)
    assert status == 2
    assert re.search(expected, output), output
    assert path.read_text() == textwrap.dedent(text)


@pytest.mark.parametrize("order", ["good first", "bad first"])
def test_an_unreadable_file_does_not_hide_the_others(tmp_path, caffe, monkeypatch, capsys, order):
    monkeypatch.chdir(tmp_path)
    good = write(tmp_path, "a.prototxt", pooling_net())
    bad = write(tmp_path, "b.prototxt", 'layer { name: "a" type: "Input" \n')
    solver = write(tmp_path, "s.prototxt", 'net: "gone.prototxt"\nbase_lr: 0.1\n')
    files = [good.name, bad.name, solver.name]
    files = files if order == "good first" else files[::-1]
    for fmt in ("text", "json"):
        assert cli.main(["lint", "--format", fmt] + files) == 2
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        assert sorted(err.splitlines()) == [
            "safe-layers lint: error: b.prototxt:1:25: the file ends here, inside 'layer { ...' "
            "(1 closing '}' missing): is it cut short? (protobuf: Expected \"}\".)",
            "safe-layers lint: error: s.prototxt:1:1: net: 'gone.prototxt' does not exist (Caffe "
            "opens it relative to the working directory, %s)" % tmp_path]
        if fmt == "text":
            # The solver whose net is gone still gets its own rules (no max_iter, no
            # lr_policy), and is listed as unreadable for its net.
            lines = out.splitlines()
            assert len(lines) == 4 and sorted(l.split(": ")[0].split(":")[0] for l in lines[:3]) == [
                "a.prototxt", "s.prototxt", "s.prototxt"]
            assert any(l.startswith("a.prototxt:3:3: SL201 error") for l in lines)
            assert lines[3] == ("lint: 3 errors, 0 warnings, 0 notes in %s; 2 unreadable: %s"
                                % (", ".join(f for f in files if f != "b.prototxt"),
                                   ", ".join(f for f in files if f != "a.prototxt")))
        else:
            doc = json.loads(out)
            assert sorted(rules_of(doc)) == ["SL103", "SL104", "SL201"]
            assert sorted(doc["checked"]) == ["a.prototxt", "s.prototxt"]
            unreadable = {u["file"]: (u["path"], u["line"], u["col"]) for u in doc["unreadable"]}
            assert unreadable == {"b.prototxt": ("b.prototxt", 1, 25), "s.prototxt": ("s.prototxt", 1, 1)}
            assert all(u["error"].startswith(u["path"] + ":") for u in doc["unreadable"])
    assert bad.read_text() == 'layer { name: "a" type: "Input" \n'


def test_missing_file_exits_2(lint, tmp_path):
    status, output = lint(tmp_path / "absent.prototxt")
    assert status == 2 and "no such file" in output


def test_solver_net_beside_the_solver_is_a_warning(lint, tmp_path, monkeypatch):
    path = solver_file(tmp_path, "solver.prototxt", base_lr=0.01, lr_policy='"fixed"', max_iter=10)
    monkeypatch.chdir("/")
    status, doc = lint(path)
    assert status == 0 and rules_of(doc) == ["SL004"]


def test_v1_layers_are_noted(lint, tmp_path):
    path = write(tmp_path, "v1.prototxt", 'input: "x"\ninput_dim: 1\ninput_dim: 1\ninput_dim: 4\n'
                 'input_dim: 4\nlayers { name: "r" type: RELU bottom: "x" top: "y" }\n')
    status, doc = lint(path)
    assert status == 0 and rules_of(doc) == ["SL005"]


# --- published nets: no false error ----------------------------------------------------------

PUBLISHED = [
    ("lenet_solver.prototxt", "examples/mnist", ["lenet_train_test.prototxt"], ["data=64,1,28,28"]),
    ("cifar10_quick_solver.prototxt", "examples/cifar10", ["cifar10_quick_train_test.prototxt"],
     ["data=100,3,32,32"]),
    ("cifar10_full_sigmoid_solver_bn.prototxt", "examples/cifar10",
     ["cifar10_full_sigmoid_train_test_bn.prototxt"], ["data=100,3,32,32"]),
]


@pytest.mark.parametrize("solver, folder, nets, shapes", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_solvers_lint_without_error(lint, tmp_path, solver, folder, nets, shapes):
    # Caffe's examples run from the Caffe root: lay the files out as there.
    (tmp_path / folder).mkdir(parents=True)
    for name in [solver] + nets:
        shutil.copy(DATA / name, tmp_path / folder / name)
    args = sum((["--input-shape", s] for s in shapes), [])
    status, doc = lint(*args, Path(folder) / solver)
    assert [f for f in doc["findings"] if f["severity"] == "error"] == []
    assert status == 0
    assert "SL002" not in rules_of(doc)  # shapes came from Caffe


@pytest.mark.parametrize("net", ["resnet50_train_val.prototxt", "resnet50_deploy.prototxt"])
def test_published_resnet_lints_clean_with_shapes_from_its_declaration(lint, tmp_path, net):
    status, doc = lint(DATA / net)
    assert status == 0 and doc["findings"] == [], doc["findings"]


# --- data shapes from the first record of the source -----------------------------------------

POOL_AFTER = ('layer { name: "pool" type: "Pooling" bottom: "x" top: "p" '
              'pooling_param { pool: AVE kernel_size: 3 stride: 5 } }\n')


def test_shape_from_the_first_lmdb_record_and_caffe_agrees(lint, tmp_path, caffe, make_net):
    lmdb_of_10x10(tmp_path, caffe)
    text = ('layer { name: "data" type: "Data" top: "x" top: "label" '
            'data_param { source: "%s" backend: LMDB batch_size: 2 } }\n' % (tmp_path / "train_lmdb")) + POOL_AFTER
    status, doc = lint(write(tmp_path, "net.prototxt", text))
    finding = only(doc, "SL201")
    assert finding["bottom_shape"] == [2, 1, 10, 10] and finding["nan_rows"] == [2]
    # Caffe's own Data layer reading that LMDB: NaN exactly in row 2 and column 2.
    out = make_net(text).forward()["p"]
    assert np.isnan(out[:, :, 2, :]).all() and np.isnan(out[:, :, :, 2]).all()
    assert np.isfinite(out[:, :, :2, :2]).all()


def test_shape_from_the_first_hdf5_file(lint, tmp_path, make_net):
    import h5py
    with h5py.File(tmp_path / "train.h5", "w") as h5:
        h5["x"] = np.ones((5, 3, 10, 10), np.float32)
    (tmp_path / "train_h5.txt").write_text("%s\n" % (tmp_path / "train.h5"))
    text = ('layer { name: "data" type: "HDF5Data" top: "x" '
            'hdf5_data_param { source: "%s" batch_size: 2 } }\n' % (tmp_path / "train_h5.txt")) + POOL_AFTER
    status, doc = lint(write(tmp_path, "net.prototxt", text))
    assert only(doc, "SL201")["bottom_shape"] == [2, 3, 10, 10]
    out = make_net(text).forward()["p"]
    assert np.isnan(out[:, :, 2, :]).all() and np.isfinite(out[:, :, :2, :2]).all()


def test_readme_rule_table_is_the_rule_list():
    """The rule table the README links to (docs/lint.md) is `lint --list-rules`."""
    from safe_layers.tools.lint.command import list_rules
    text = (ROOT / "docs" / "lint.md").read_text()
    table = text.split("<!-- lint rules:")[1].split("<!-- end lint rules -->")[0]
    rows = [line for line in table.splitlines() if line.startswith("| SL")]
    assert rows == ["| %s | %s | %s |" % (r.id, r.severity, r.summary) for r in list_rules()]
