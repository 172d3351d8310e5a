"""`safe-layers harden`: on published nets, every level's output loads in caffe.Net, takes
the original's caffemodel and gives the original's outputs and gradients on finite input
(bit for bit at observe); only hardening shows in the diff; hardening twice changes nothing."""

import difflib
import itertools
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from google.protobuf import text_format

from safe_layers import reporting
from safe_layers.tools import cli
from safe_layers.readers import netshapes
from support.paths import DATA

# name -> (--input-shape for data tops, batch size to build with, swap batchnorm?)
PUBLISHED = {
    "lenet_train_test.prototxt": (["data=1,1,28,28"], 4),
    "cifar10_quick_train_test.prototxt": (["data=1,3,32,32"], 4),
    "cifar10_full_sigmoid_train_test_bn.prototxt": (["data=1,3,32,32"], 4),
    "resnet50_train_val.prototxt": ([], 1),
}
LEVELS = ("observe", "repair", "strict")


def buildable(caffe, tmp_path, text, name, shapes, batch):
    """``text`` with its data layers as Input layers (batch ``batch``), written to a file."""
    message = text_format.Parse(text, caffe.proto.caffe_pb2.NetParameter())
    for layer in message.layer:
        for field in ("data_param", "image_data_param", "hdf5_data_param"):
            if layer.HasField(field):
                getattr(layer, field).batch_size = batch
    # An --input-shape's N is the batch of its layer (what is given wins over batch_size).
    overrides = {top: (batch,) + shape[1:] for top, shape in netshapes.parse_input_shapes(shapes).items()}
    net, _ = netshapes.input_net(message, str(DATA / "x.prototxt"), overrides)
    path = tmp_path / name
    path.write_text(text_format.MessageToString(net))
    return str(path)


def feed(net, seed=0):
    rng = np.random.RandomState(seed)
    for name in net.inputs:
        blob = net.blobs[name]
        if name == "label":
            classes = 10 if blob.data.size and "fc1000" not in net.blobs else 1000
            blob.data[...] = rng.randint(0, classes, blob.data.shape)
        else:
            blob.data[...] = rng.uniform(-1, 1, blob.data.shape)


def randomize_statistics(net):
    """Trained-looking BatchNorm statistics, so TEST-phase comparisons mean something."""
    rng = np.random.RandomState(1)
    for layer_name, layer in zip(net._layer_names, net.layers):
        if layer.type == "BatchNorm":
            blobs = net.params[layer_name]
            blobs[0].data[...] = rng.uniform(-0.1, 0.1, blobs[0].data.shape)
            blobs[1].data[...] = rng.uniform(0.5, 1.5, blobs[1].data.shape)
            blobs[2].data[...] = 1


def compare(caffe, original_file, hardened_file, tmp_path, phase, exact, rtol=1e-4, atol=1e-5):
    phase_value = getattr(caffe, phase)
    original = caffe.Net(original_file, phase_value)
    randomize_statistics(original)
    weights = str(tmp_path / "original.caffemodel")
    original.save(weights)
    hardened = caffe.Net(hardened_file, phase_value, weights=weights)
    for net in (original, hardened):
        feed(net)
        net.forward()
        net.backward()
    check = (lambda a, b: np.array_equal(a, b)) if exact else \
        (lambda a, b: np.allclose(a, b, rtol=rtol, atol=atol))
    # Caffe names its own Split blobs after the consumers, which the guards change.
    named = [n for n in original.blobs if "_split_" not in n]
    assert set(named) <= set(hardened.blobs)
    for name in named:
        assert check(original.blobs[name].data, hardened.blobs[name].data), ("data", name)
    assert set(original.params) <= set(hardened.params)
    for name, blobs in original.params.items():
        for i, blob in enumerate(blobs):
            assert check(blob.data, hardened.params[name][i].data), ("weights", name, i)
            assert check(blob.diff, hardened.params[name][i].diff), ("gradient", name, i)
    return original, hardened


def only_insertions(before, after):
    ops = difflib.SequenceMatcher(None, before.splitlines(True), after.splitlines(True)).get_opcodes()
    return all(tag in ("equal", "insert") for tag, *_ in ops)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
@pytest.mark.parametrize("level", ["observe", "repair", "strict"])
def test_published_net_hardened_keeps_outputs_and_gradients(harden, caffe, tmp_path, name, level):
    shapes, batch = PUBLISHED[name]
    source = DATA / name
    status, _, err = harden(source, "-o", "hard.prototxt", "--level", level)
    assert status == 0, err
    original_text, hardened_text = source.read_text(), (tmp_path / "hard.prototxt").read_text()
    assert hardened_text != original_text and only_insertions(original_text, hardened_text)
    if "}\nlayer" not in original_text:  # blocks apart by a blank line (ResNet): inserted ones too
        assert "}\nlayer" not in hardened_text
    assert "level %s" % level in err and "wrote hard.prototxt" in err
    # Hardening a hardened net changes nothing.
    status, _, err = harden("hard.prototxt", "-o", "again.prototxt", "--level", level)
    assert (tmp_path / "again.prototxt").read_text() == hardened_text and "nothing to change" in err
    original_file = buildable(caffe, tmp_path, original_text, "orig_in.prototxt", shapes, batch)
    hardened_file = buildable(caffe, tmp_path, hardened_text, "hard_in.prototxt", shapes, batch)
    for phase in ("TRAIN", "TEST"):
        compare(caffe, original_file, hardened_file, tmp_path, phase, exact=(level == "observe"))


@pytest.mark.parametrize("name", ["resnet50_train_val.prototxt", "cifar10_full_sigmoid_train_test_bn.prototxt"])
def test_batchnorm_swap_loads_the_caffemodel_and_matches(harden, caffe, tmp_path, name):
    shapes, batch = PUBLISHED[name]
    source = DATA / name
    status, _, err = harden(source, "-o", "swap.prototxt", "--swap", "batchnorm", "--solver",
                            DATA / "cifar10_full_sigmoid_solver_bn.prototxt")
    assert status == 0, err
    text = (tmp_path / "swap.prototxt").read_text()
    message = text_format.Parse(text, caffe.proto.caffe_pb2.NetParameter())
    swapped = [l for l in message.layer if l.python_param.layer == "StableBatchNorm"]
    assert swapped and not [l for l in message.layer if l.type == "BatchNorm"]
    for layer in swapped:
        assert [p.lr_mult for p in layer.param] == [0, 0, 0]
        assert "name: %s," % layer.name in layer.python_param.param_str
        assert "iter_size: 1" in layer.python_param.param_str
    # Idempotent with the swap too; lint finds no error in the result.
    status, _, _ = harden("swap.prototxt", "-o", "again.prototxt", "--swap", "batchnorm", "--solver",
                          DATA / "cifar10_full_sigmoid_solver_bn.prototxt")
    assert (tmp_path / "again.prototxt").read_text() == text
    original_file = buildable(caffe, tmp_path, source.read_text(), "orig_in.prototxt", shapes, batch)
    hardened_file = buildable(caffe, tmp_path, text, "swap_in.prototxt", shapes, batch)
    # StableBatchNorm takes its moments in float64, Caffe in float32: equal to float32 rounding,
    # amplified through the depth of the net.
    for phase in ("TRAIN", "TEST"):
        compare(caffe, original_file, hardened_file, tmp_path, phase, exact=False, rtol=2e-3, atol=2e-3)


def test_hardened_published_nets_lint_without_error(harden, caffe, tmp_path, capsys):
    for name, (shapes, _) in PUBLISHED.items():
        status, _, err = harden(DATA / name, "-o", "h.prototxt", "--level", "repair", "--swap", "batchnorm")
        assert status == 0, err
        args = ["lint", "--format", "json", "h.prototxt"] + sum((["--input-shape", s] for s in shapes), [])
        capsys.readouterr()
        status = cli.main(args)
        document = json.loads(capsys.readouterr().out)
        assert status == 0 and [f for f in document["findings"] if f["severity"] == "error"] == [], name


# --- what the guards do on non-finite input, on LeNet ----------------------------------------

def test_levels_on_a_nan_input(harden, caffe, tmp_path):
    source = DATA / "lenet_train_test.prototxt"
    # Every net runs on the same weights: whether stock LeNet's loss survives this NaN
    # depends on them (pool1's all-NaN windows give -FLT_MAX, which conv2 may turn into
    # inf - inf), so the observe level is compared with the unguarded net itself.
    original = caffe.Net(buildable(caffe, tmp_path, source.read_text(), "original_in.prototxt",
                                   ["data=1,1,28,28"], 4), caffe.TRAIN)
    weights = str(tmp_path / "lenet.caffemodel")
    original.save(weights)
    results = {}
    for level in ("original", "observe", "repair", "strict"):
        if level == "original":
            net = original
        else:
            harden(source, "-o", "%s.prototxt" % level, "--level", level)
            path = buildable(caffe, tmp_path, (tmp_path / ("%s.prototxt" % level)).read_text(),
                             "%s_in.prototxt" % level, ["data=1,1,28,28"], 4)
            net = caffe.Net(path, caffe.TRAIN, weights=weights)
        feed(net)
        net.blobs["data"].data[1, 0, 3, 3] = np.nan
        try:
            net.forward()
            net.backward()
            results[level] = (net.blobs["loss"].data.copy(), net.params["conv1"][0].diff.copy())
        except FloatingPointError as exc:
            results[level] = str(exc)
    loss, grad = results["observe"]
    # Warned only, so stock behaviour, bit for bit: conv1's weight gradient is NaN (it is
    # computed from the NaN input itself), whatever the loss shows.
    assert np.array_equal(loss, results["original"][0], equal_nan=True)
    assert np.array_equal(grad, results["original"][1], equal_nan=True)
    assert np.isnan(grad).any()
    loss, grad = results["repair"]
    assert np.isfinite(loss) and np.isfinite(grad).all()  # the guard on the data kept conv1 clean
    assert "mnist_guard" in results["strict"] and "nan=1" in results["strict"]


def test_guard_before_max_pooling_keeps_other_samples_gradients(harden, caffe, tmp_path):
    """A NaN window makes stock MAX pooling write its gradient one element before the
    channel (into the previous sample); the repair guard on the pooling input prevents it."""
    text = textwrap.dedent("""\
        force_backward: true
        layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 1 dim: 4 dim: 4 } } }
        layer { name: "target" type: "Input" top: "p2" input_param { shape { dim: 2 dim: 1 dim: 2 dim: 2 } } }
        layer { name: "sqrt" type: "Power" bottom: "x" top: "r" power_param { power: 0.5 } }
        layer { name: "pool" type: "Pooling" bottom: "r" top: "p" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
        layer { name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "p2" top: "loss" }
        """)
    (tmp_path / "net.prototxt").write_text(text)
    harden("net.prototxt", "-o", "hard.prototxt", "--level", "repair")
    hardened = (tmp_path / "hard.prototxt").read_text()
    assert "sqrt_guard" in hardened  # on the pooling input, after the Power that makes the NaN

    def sample0_gradient(path, poison):
        net = caffe.Net(str(path), caffe.TRAIN)
        net.blobs["x"].data[...] = 1.0 + np.arange(32).reshape(2, 1, 4, 4)
        net.blobs["p2"].data[...] = 0
        if poison:
            net.blobs["x"].data[1, 0, :2, :2] = -1.0  # sqrt(-1): one all-NaN window in sample 1
        net.forward()
        net.backward()
        return net.blobs["x"].diff[0].copy()

    clean = sample0_gradient(tmp_path / "net.prototxt", False)
    stock = sample0_gradient(tmp_path / "net.prototxt", True)
    assert not np.array_equal(stock, clean)  # sample 0's gradient changed by sample 1's NaN
    guarded = sample0_gradient(tmp_path / "hard.prototxt", True)
    assert np.array_equal(guarded, clean)


def test_guard_after_outside_window_pooling_keeps_the_next_weights_finite(harden, caffe, tmp_path):
    """The seed's AVE pooling (kernel 3, stride 5 on 10x10) divides 0 by 0 in its last row
    and column; that NaN is the *bottom data* of the next layer, so the next layer's weight
    gradient is NaN before any guard after it can act. harden puts a guard on the pooling's
    output; trained with SGD, the weights after the pooling stay finite only with it."""
    text = textwrap.dedent("""\
        layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 4 dim: 1 dim: 10 dim: 10 } } }
        layer { name: "label" type: "Input" top: "y" input_param { shape { dim: 4 } } }
        layer { name: "conv" type: "Convolution" bottom: "x" top: "c"
                convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "xavier" } } }
        layer { name: "pool" type: "Pooling" bottom: "c" top: "p" pooling_param { pool: AVE kernel_size: 3 stride: 5 } }
        layer { name: "fc" type: "InnerProduct" bottom: "p" top: "fc"
                inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "y" top: "loss" }
        """)
    (tmp_path / "net.prototxt").write_text(text)
    status, _, err = harden("net.prototxt", "-o", "hard.prototxt", "--level", "repair")
    assert status == 0 and "pool_guard after pool on p: output of pooling 'pool'" in err

    def fc_weights_after_training(net_file):
        solver_file = tmp_path / ("solver_" + net_file)
        solver_file.write_text('net: "%s"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 3\n'
                               'display: 0\nrandom_seed: 1\nsnapshot_after_train: false\n'
                               % (tmp_path / net_file))
        solver = caffe.SGDSolver(str(solver_file))
        solver.net.blobs["x"].data[...] = np.random.RandomState(0).rand(4, 1, 10, 10)
        solver.net.blobs["y"].data[...] = [0, 1, 2, 0]
        solver.step(3)
        return solver.net.params["fc"][0].data.copy()

    stock = fc_weights_after_training("net.prototxt")
    assert np.isnan(stock).any()  # the pooling's NaN went into fc's own weight gradient
    guarded = fc_weights_after_training("hard.prototxt")
    assert np.isfinite(guarded).all()


# --- swaps of InfogainLoss -------------------------------------------------------------------

def infogain_net(h_name, softmax=False):
    head = textwrap.dedent("""\
        layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 4 dim: 5 } } }
        layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 4 } } }
        layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc"
                inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
        """)
    if softmax:
        head += 'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n'
    return head + ('layer { name: "loss" type: "InfogainLoss" bottom: "%s" bottom: "label" top: "loss"\n'
                   '        infogain_loss_param { source: "%s" }\n'
                   '        loss_param { ignore_label: 2 normalization: BATCH_SIZE } }\n'
                   % ("prob" if softmax else "fc", h_name))


def write_h(caffe, path, matrix):
    blob = caffe.proto.caffe_pb2.BlobProto()
    blob.shape.dim.extend([1, 1, 3, 3])
    blob.data.extend(np.asarray(matrix, np.float32).ravel().tolist())
    path.write_bytes(blob.SerializeToString())


def test_infogain_swap_matches_caffes_loss_and_gradient(harden, caffe, tmp_path):
    write_h(caffe, tmp_path / "H.binaryproto", [[1, 0.2, 0], [0, 1, 0.5], [0.1, 0, 1]])
    (tmp_path / "net.prototxt").write_text(infogain_net("H.binaryproto"))
    status, _, err = harden("net.prototxt", "-o", "swap.prototxt", "--swap", "infogain", "--no-default-guards")
    assert status == 0 and "InfogainLoss -> SafeInfogainLoss" in err
    text = (tmp_path / "swap.prototxt").read_text()
    layer = text_format.Parse(text, caffe.proto.caffe_pb2.NetParameter()).layer[-1]
    assert list(layer.loss_weight) == [1.0]
    assert layer.python_param.param_str == ("{name: loss, follows: fc, source: H.binaryproto, "
                                            "ignore_label: 2, normalization: BATCH_SIZE}")
    nets = []
    for path in ("net.prototxt", "swap.prototxt"):
        net = caffe.Net(str(tmp_path / path), caffe.TRAIN)
        nets.append(net)
    nets[1].params["fc"][0].data[...] = nets[0].params["fc"][0].data
    nets[1].params["fc"][1].data[...] = nets[0].params["fc"][1].data
    for net in nets:
        net.blobs["x"].data[...] = np.random.RandomState(3).uniform(-2, 2, (4, 5))
        net.blobs["label"].data[...] = [0, 1, 2, 1]
        net.forward()
        net.backward()
    assert np.allclose(nets[0].blobs["loss"].data, nets[1].blobs["loss"].data, rtol=1e-5)
    assert np.allclose(nets[0].params["fc"][0].diff, nets[1].params["fc"][0].diff, rtol=1e-4, atol=1e-6)


def test_infogain_after_softmax_reads_probabilities(harden, caffe, tmp_path):
    write_h(caffe, tmp_path / "H.binaryproto", np.eye(3))
    (tmp_path / "net.prototxt").write_text(infogain_net("H.binaryproto", softmax=True))
    status, _, err = harden("net.prototxt", "-o", "swap.prototxt", "--swap", "infogain")
    assert "input: probabilities" in err and "softmax twice" in err
    net = caffe.Net(str(tmp_path / "swap.prototxt"), caffe.TRAIN)
    net.blobs["x"].data[...] = np.random.RandomState(3).uniform(-2, 2, (4, 5))
    net.blobs["label"].data[...] = [0, 1, 0, 1]
    net.forward()
    p = net.blobs["prob"].data
    expected = -np.log(p[np.arange(4), [0, 1, 0, 1]]).sum() / 4  # one softmax, as written before 2017
    assert np.isclose(float(net.blobs["loss"].data), expected, rtol=1e-5)


# --- options and refusals --------------------------------------------------------------------

def test_guard_option_types_and_globs(harden, tmp_path):
    source = DATA / "cifar10_quick_train_test.prototxt"
    status, out, err = harden(source, "-o", "-", "--no-default-guards", "--guard", "ReLU", "--guard", "ip*")
    assert status == 0
    names = [l.split('"')[1] for l in out.splitlines() if l.strip().startswith("name:") and "_guard" in l]
    assert names == ["relu1_guard", "relu2_guard", "relu3_guard", "ip1_guard", "ip2_guard"]
    assert "wrote stdout" in err


def test_dry_run_prints_the_diff_and_writes_nothing(harden, tmp_path):
    status, out, err = harden(DATA / "lenet_train_test.prototxt", "--dry-run")
    assert status == 0 and out.startswith("--- ") and "\n+  name: \"conv1_guard\"\n" in out
    assert "dry run: nothing written" in err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["net.prototxt"], "-o OUT.prototxt is required"),
    (["net.prototxt", "-o", "net.prototxt"], "harden never overwrites its input"),
    (["net.prototxt", "-o", "x", "--swap", "dropout"], "--swap dropout: allowed: batchnorm, infogain"),
    (["solver.prototxt", "-o", "-"], "-o -: a solver gives several files"),
    (["bad.prototxt", "-o", "x"], "bad.prototxt:2:1: "),
    (["absent.prototxt", "-o", "x"], "absent.prototxt: no such file"),
    (["v1.prototxt", "-o", "x"], "V1 'layers' format"),
])
def test_refusals_exit_2_and_leave_the_input(harden, tmp_path, args, message):
    net = 'layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 1 } } }\n'
    (tmp_path / "net.prototxt").write_text(net)
    (tmp_path / "solver.prototxt").write_text('net: "net.prototxt"\nbase_lr: 0.1\n')
    (tmp_path / "bad.prototxt").write_text("layer { name: \n")
    (tmp_path / "v1.prototxt").write_text('layers { name: "r" type: RELU bottom: "x" top: "x" }\n')
    status, out, err = harden(*args)
    assert status == 2 and message in err, err
    assert (tmp_path / "net.prototxt").read_text() == net
    assert not (tmp_path / "x").exists()


def test_empty_file_and_a_guard_matching_nothing_exit_2(harden, tmp_path):
    (tmp_path / "empty.prototxt").write_text("# nothing yet\n")
    status, _, err = harden("empty.prototxt", "-o", "x.prototxt")
    assert status == 2 and err == "safe-layers harden: error: no layers in empty.prototxt: nothing to harden\n"
    status, _, err = harden(DATA / "lenet_train_test.prototxt", "-o", "x.prototxt",
                            "--guard", "Convolution", "--guard", "nomatch*", "--no-default-guards")
    assert status == 2 and len(err.splitlines()) == 1, err
    assert "--guard 'nomatch*' matches no layer of" in err
    # What exists, shortened: every type, the first names.
    assert "types: Accuracy, Convolution, Data, InnerProduct, Pooling, ReLU, SoftmaxWithLoss;" in err
    assert "names: mnist, conv1, pool1, conv2, pool2, ip1, relu1, ip2, ... (10 in all)" in err
    assert not (tmp_path / "x.prototxt").exists()


def test_nothing_to_change_says_why(harden, tmp_path):
    source = DATA / "lenet_train_test.prototxt"
    harden(source, "-o", "h.prototxt", "--level", "strict")
    status, _, err = harden("h.prototxt", "-o", "again.prototxt", "--level", "strict")
    assert status == 0 and "nothing to change (already hardened at level strict)" in err
    status, _, err = harden(source, "-o", "none.prototxt", "--no-default-guards")
    assert status == 0 and "nothing to change (--no-default-guards and no --guard: no guard asked for)" in err
    assert "already hardened" not in err


# --- the output file -------------------------------------------------------------------------

def no_temporary_files(folder):
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name] == []


@pytest.mark.parametrize("output, message", [
    ("missing/x.prototxt", "cannot write the hardened net missing/x.prototxt: folder {tmp}/missing does not exist"),
    ("adir", "cannot write the hardened net adir: it is a folder"),
])
def test_output_path_is_checked_before_any_work(harden, tmp_path, output, message):
    (tmp_path / "adir").mkdir()
    status, out, err = harden(DATA / "lenet_train_test.prototxt", "-o", output)
    # One line naming the path; no summary, no "wrote", no traceback; nothing left behind.
    assert status == 2 and err == "safe-layers harden: error: %s\n" % message.format(tmp=tmp_path), err
    assert out == "" and list((tmp_path / "adir").iterdir()) == [] and no_temporary_files(tmp_path)


def test_a_failed_write_leaves_no_file_and_says_so(caffe, tmp_path):
    """The real CLI with a file size limit of 1000 bytes (the hardened LeNet is larger): the
    write fails after the checks, as on a full disk."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))

    command = [os.path.join(os.path.dirname(sys.executable), "safe-layers"), "harden",
               str(DATA / "lenet_train_test.prototxt"), "-o", "out.prototxt"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, preexec_fn=limit)
    assert done.returncode == 2, done.stderr
    assert done.stderr == "safe-layers harden: error: could not write the hardened net out.prototxt: File too large\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the file nor its temporary


# --- incremental hardening: observe first, repair later -----------------------------------

@pytest.mark.parametrize("name", sorted(PUBLISHED) + ["resnet50_deploy.prototxt"])
def test_rehardening_at_another_level_equals_hardening_the_original_there(harden, tmp_path, name):
    """For every pair of levels A -> B: harden at A, then harden that at B, gives the bytes
    hardening the original at B gives (A == B: nothing changes). The same with options given
    only to the second run (a swap, --guard, --solver, --max-norm) or to both."""
    source = DATA / name
    (tmp_path / "solver.prototxt").write_text('net: "x"\nbase_lr: 0.01\nmax_iter: 10\niter_size: 2\n')
    options = ["--swap", "batchnorm", "--guard", "Convolution", "--solver", "solver.prototxt",
               "--max-norm", "50"]

    def hardened(path, level, *more):
        status, _, err = harden(path, "-o", "out.prototxt", "--level", level, *more)
        assert status == 0, err
        return (tmp_path / "out.prototxt").read_text(), err

    for first_options, second_options in (([], []), ([], options), (options, options)):
        direct = {}
        for level in LEVELS:
            direct[level] = hardened(source, level, *second_options)[0]
            (tmp_path / ("%s.prototxt" % level)).write_text(hardened(source, level, *first_options)[0])
        for a, b in itertools.product(LEVELS, LEVELS):
            again, err = hardened("%s.prototxt" % a, b, *second_options)
            assert again == direct[b], (a, b, first_options, second_options)
            if a == b and first_options == second_options:
                assert "nothing to change (already hardened at level %s)" % b in err


def test_level_change_summary_and_edits(harden, tmp_path):
    source = DATA / "lenet_train_test.prototxt"
    harden(source, "-o", "observe.prototxt")
    status, _, err = harden("observe.prototxt", "-o", "repair.prototxt", "--level", "repair")
    assert status == 0
    lines = err.splitlines()
    assert lines[0] == ("harden observe.prototxt: level repair: 0 NaNGuard and 1 GradientClip inserted, "
                        "5 NaNGuard warn -> clamp/zero, no swap")
    assert "  ~ NaNGuard mnist_guard, mnist_guard_2, conv1_guard, conv2_guard, ip2_guard: warn -> clamp/zero" in lines
    assert "  + GradientClip ip2_clip after ip2 on ip2: L2 norm <= 1000 below the loss" in lines
    assert lines[-1] == "wrote repair.prototxt"
    before, after = (tmp_path / "observe.prototxt").read_text(), (tmp_path / "repair.prototxt").read_text()
    # Only each guard's param_str changed (its action keys); the clip's lines are the one insertion.
    relevelled = before.replace("action: warn}", "action: clamp, backward_action: zero}")
    assert relevelled.count("action: clamp") == 5
    ops = difflib.SequenceMatcher(None, relevelled.splitlines(True), after.splitlines(True)).get_opcodes()
    assert [tag for tag, *_ in ops if tag != "equal"] == ["insert"]
    inserted = [after.splitlines()[j1:j2] for tag, i1, i2, j1, j2 in ops if tag == "insert"][0]
    assert len(inserted) == 11 and '  name: "ip2_clip"' in inserted  # one layer block of 11 lines
    status, _, err = harden("repair.prototxt", "-o", "back.prototxt", "--level", "observe")
    assert "5 NaNGuard clamp/zero -> warn, 1 GradientClip removed" in err.splitlines()[0]
    assert "  - GradientClip ip2_clip after ip2 removed: level observe has no clip" in err
    assert (tmp_path / "back.prototxt").read_text() == before
    # --max-norm given resets harden's clips; not given, they keep their bound.
    harden(source, "-o", "r50.prototxt", "--level", "repair", "--max-norm", "50")
    status, _, err = harden("r50.prototxt", "-o", "same.prototxt", "--level", "repair")
    assert "already hardened" in err and "max_norm: 50}" in (tmp_path / "same.prototxt").read_text()
    status, _, err = harden("r50.prototxt", "-o", "r10.prototxt", "--level", "repair", "--max-norm", "10")
    assert "1 GradientClip max_norm 50 -> 10" in err and "max_norm: 10}" in (tmp_path / "r10.prototxt").read_text()


def test_guards_written_by_hand_are_left_alone_and_named(harden, tmp_path):
    hand = ('    python_param { module: "safe_layers" layer: "NaNGuard"\n'
            '                   param_str: "{name: %s, follows: %s, action: warn%s}" } }\n')
    text = textwrap.dedent("""\
        layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
        layer { name: "label" type: "Input" top: "y" input_param { shape { dim: 2 } } }
        layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc" inner_product_param { num_output: 3 } }
        layer { name: "my_guard" type: "Python" bottom: "fc" top: "fc"
        """) + hand % ("my_guard", "fc", ", max_abs: 100") + textwrap.dedent("""\
        layer { name: "exp" type: "Exp" bottom: "fc" top: "e" }
        layer { name: "exp_guard" type: "Python" bottom: "e" top: "e"
        """) + hand % ("exp_guard", "exp", ", bound: 5") + \
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "e" bottom: "y" top: "loss" }\n'
    (tmp_path / "net.prototxt").write_text(text)
    status, _, err = harden("net.prototxt", "-o", "hard.prototxt", "--level", "strict")
    assert status == 0, err
    hardened = (tmp_path / "hard.prototxt").read_text()
    # The hand-written guards are untouched, and no second guard joins them on their blobs.
    assert hardened.count("action: warn") == 2 and "fc_guard" not in hardened
    assert hardened.count("action: abort") == 2  # data_guard and label_guard
    assert ("  = left as written (not in the form harden writes, so not harden's to move to level "
            "strict): NaNGuard my_guard, NaNGuard exp_guard") in err.splitlines()
    # A guard harden wrote and the user then edited is the user's too: exp_guard above is one.


# --- net-level inputs (published deploy nets) ------------------------------------------------

def he_weights(net, seed=0):
    rng = np.random.RandomState(seed)
    for blobs in net.params.values():
        blob = blobs[0]
        if blob.data.ndim >= 2:
            blob.data[...] = rng.normal(0, np.sqrt(2.0 / np.prod(blob.data.shape[1:])), blob.data.shape)


def test_legacy_net_inputs_are_guarded(harden, caffe, tmp_path):
    """resnet50_deploy declares `input: "data"` + four `input_dim`: its data gets a guard
    like an Input layer's tops, before the first layer."""
    source = DATA / "resnet50_deploy.prototxt"
    status, _, err = harden(source, "-o", "observe.prototxt")
    assert status == 0 and ("  + NaNGuard input_guard before the first layer on data: the net's inputs "
                            "(input + input_dim; Caffe builds them as Input layer 'input')") in err.splitlines()
    original_text, text = source.read_text(), (tmp_path / "observe.prototxt").read_text()
    assert only_insertions(original_text, text)
    first = text_format.Parse(text, caffe.proto.caffe_pb2.NetParameter()).layer[0]
    assert (first.name, list(first.bottom), list(first.top)) == ("input_guard", ["data"], ["data"])
    assert first.python_param.param_str == "{name: input_guard, follows: input, action: warn}"
    harden(source, "-o", "strict.prototxt", "--level", "strict")

    original = caffe.Net(str(source), caffe.TEST)
    he_weights(original)
    randomize_statistics(original)
    weights = str(tmp_path / "resnet50.caffemodel")
    original.save(weights)
    image = np.random.RandomState(2).uniform(-1, 1, original.blobs["data"].data.shape)
    outputs = {}
    for name in ("original", "observe"):
        net = original if name == "original" else caffe.Net(str(tmp_path / "observe.prototxt"), caffe.TEST,
                                                            weights=weights)
        net.blobs["data"].data[...] = image
        net.forward()
        outputs[name] = {blob: net.blobs[blob].data.copy() for blob in original.blobs}
    assert np.isfinite(outputs["original"]["prob"]).all()
    for blob, value in outputs["original"].items():
        assert np.array_equal(value, outputs["observe"][blob]), blob  # bit for bit
    strict = caffe.Net(str(tmp_path / "strict.prototxt"), caffe.TEST, weights=weights)
    strict.blobs["data"].data[...] = image
    strict.blobs["data"].data[0, 1, 100, 7] = np.nan
    with pytest.raises(FloatingPointError, match="input_guard"):
        strict.forward()


ODD_NAMES = r'''name: "odd"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv, 1" type: "Convolution" bottom: "data" top: "c: 1"
  convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "2" type: "Pooling" bottom: "c: 1" top: "p\"q"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "it's" type: "InnerProduct" bottom: "p\"q" top: "fc"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "true" type: "Softmax" bottom: "fc" top: "prob" }
'''


def test_layer_names_yaml_or_prototxt_would_misread(harden, caffe, tmp_path):
    """Caffe allows any string as a layer or blob name: a comma or colon (YAML flow
    syntax), a name YAML reads as a number or a bool, a quote. The guards harden writes
    name them exactly (quoted where needed), load in Caffe, and a second run leaves them."""
    (tmp_path / "odd.prototxt").write_text(ODD_NAMES)
    status, _, err = harden("odd.prototxt", "-o", "hard.prototxt", "--level", "strict",
                            "--guard", "Convolution,Pooling,InnerProduct,Softmax")
    assert status == 0, err
    text = (tmp_path / "hard.prototxt").read_text()
    assert "param_str: \"{name: 'conv, 1_guard', follows: 'conv, 1', action: abort}\"" in text
    assert "{name: '2_guard', follows: '2', action: abort}" in text
    net = caffe.Net(str(tmp_path / "hard.prototxt"), caffe.TEST)
    guards = {log.layer: log for log in reporting.fault_logs(net=net)}
    assert {"conv, 1_guard", "2_guard", "it's_guard", "true_guard", "data_guard"} <= set(guards)
    net.blobs["data"].data[...] = 1
    net.forward()
    net.blobs["data"].data[0, 0, 0, 0] = np.nan
    with pytest.raises(FloatingPointError, match="NaNGuard data_guard"):
        net.forward()
    status, _, err = harden("hard.prototxt", "-o", "again.prototxt", "--level", "strict",
                            "--guard", "Convolution,Pooling,InnerProduct,Softmax")
    assert status == 0 and (tmp_path / "again.prototxt").read_text() == text, err
    status, _, err = harden("hard.prototxt", "-o", "repair.prototxt", "--level", "repair",
                            "--guard", "Convolution,Pooling,InnerProduct,Softmax")
    assert status == 0 and "5 NaNGuard abort -> clamp/zero" in err, err


@pytest.mark.parametrize("blank_lines", [False, True])
def test_a_file_with_windows_line_ends_keeps_them(harden, tmp_path, blank_lines):
    """Byte-preserving means the inserted lines end like the file's own: the CRLF file's
    hardened output is the LF file's with every line end CRLF (blank lines between blocks
    kept as in the LF file), and relevelling it matches hardening the original."""
    text = (DATA / "lenet_train_test.prototxt").read_text()
    if blank_lines:
        text = text.replace("}\nlayer {", "}\n\nlayer {")
    (tmp_path / "lf.prototxt").write_text(text)
    (tmp_path / "crlf.prototxt").write_bytes(text.replace("\n", "\r\n").encode())
    for name in ("lf", "crlf"):
        assert harden("%s.prototxt" % name, "-o", "%s_repair.prototxt" % name, "--level", "repair")[0] == 0
    lf, crlf = ((tmp_path / ("%s_repair.prototxt" % n)).read_bytes() for n in ("lf", "crlf"))
    assert crlf.count(b"\n") == crlf.count(b"\r\n") and crlf.replace(b"\r\n", b"\n") == lf
    assert harden("crlf_repair.prototxt", "-o", "back.prototxt", "--level", "observe")[0] == 0
    assert harden("crlf.prototxt", "-o", "direct.prototxt", "--level", "observe")[0] == 0
    assert (tmp_path / "back.prototxt").read_bytes() == (tmp_path / "direct.prototxt").read_bytes()


@pytest.mark.parametrize("net", ["cifar10_full_sigmoid_train_test_bn.prototxt", "resnet50_train_val.prototxt"])
def test_swap_first_then_harden_gives_the_file_of_both_at_once(harden, tmp_path, net):
    """Incremental hardening: swapping BatchNorm alone, then adding guards later, ends with
    the same file as doing both in one run (the StableBatchNorms are guarded as the
    BatchNorms they replace would be)."""
    source = DATA / net
    assert harden(source, "-o", "swapped.prototxt", "--swap", "batchnorm", "--no-default-guards")[0] == 0
    for level in ("observe", "repair"):
        assert harden(source, "-o", "once.prototxt", "--swap", "batchnorm", "--level", level)[0] == 0
        assert harden("swapped.prototxt", "-o", "later.prototxt", "--level", level)[0] == 0
        assert (tmp_path / "later.prototxt").read_text() == (tmp_path / "once.prototxt").read_text()


def test_a_max_norm_is_written_as_given_and_rehardening_with_it_changes_nothing(harden, tmp_path):
    source = DATA / "lenet_train_test.prototxt"
    status, _, err = harden(source, "-o", "m1.prototxt", "--level", "repair", "--max-norm", "1234567")
    assert status == 0 and "L2 norm <= 1234567.0 below the loss" in err
    assert "max_norm: 1234567.0}" in (tmp_path / "m1.prototxt").read_text()
    status, _, err = harden("m1.prototxt", "-o", "m2.prototxt", "--level", "repair", "--max-norm", "1234567")
    assert status == 0 and "nothing to change" in err and "->" not in err, err
    status, _, err = harden(source, "-o", "m3.prototxt", "--level", "repair", "--max-norm", "50")
    assert "max_norm: 50}" in (tmp_path / "m3.prototxt").read_text()
