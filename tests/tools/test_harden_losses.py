"""`safe-layers harden` below losses with several predictions, and below a loss with no top.

Every bottom a loss sends a gradient to gets its guard, and at level repair ONE
GradientClip over all of them (``<loss>_clip``, in place, right before the loss): one norm,
so the gradient keeps its direction. On Caffe's siamese layout (two branches sharing their
weights, ContrastiveLoss) the hardened net's parameter gradients are the original's bit for
bit with the clip inactive, and the original's times one scalar with it active, the shared
bias gradient the branches cancel staying exactly 0.
"""

import difflib

import numpy as np
import pytest
from google.protobuf import text_format

from safe_layers.readers.net_state import gradient_bottoms, is_loss
from safe_layers.tools import cli
from safe_layers.tools.harden.param_strings import clip_param_str
from safe_layers.tools.harden.text_edits import layer_block


@pytest.fixture
def harden(tmp_path, monkeypatch, capsys):
    """harden(in_path, *args) -> (status, stderr); runs in tmp_path, in process."""
    monkeypatch.chdir(tmp_path)

    def run(*argv):
        capsys.readouterr()
        status = cli.main(["harden"] + [str(a) for a in argv])
        return status, capsys.readouterr().err

    return run


def only_insertions(before, after):
    diff = [line for line in difflib.ndiff(before.splitlines(), after.splitlines()) if line[:1] in "+-"]
    return bool(diff) and all(line.startswith("+ ") for line in diff)


def layers(caffe, text):
    return list(text_format.Parse(text, caffe.proto.caffe_pb2.NetParameter()).layer)


def clips(caffe, text):
    return [l for l in layers(caffe, text) if l.python_param.layer == "GradientClip"]


# --- Caffe's siamese layout (examples/siamese/mnist_siamese_train_test.prototxt), smaller ------

SIAMESE_HEAD = '''name: "mnist_siamese_train_test"
layer {
  name: "pair_data"
  type: "Data"
  top: "pair_data"
  top: "sim"
  include {
    phase: TRAIN
  }
  transform_param {
    scale: 0.00390625
  }
  data_param {
    source: "examples/siamese/mnist_siamese_train_leveldb"
    batch_size: 64
  }
}
layer {
  name: "pair_data"
  type: "Data"
  top: "pair_data"
  top: "sim"
  include {
    phase: TEST
  }
  transform_param {
    scale: 0.00390625
  }
  data_param {
    source: "examples/siamese/mnist_siamese_test_leveldb"
    batch_size: 100
  }
}
layer {
  name: "slice_pair"
  type: "Slice"
  bottom: "pair_data"
  top: "data"
  top: "data_p"
  slice_param {
    slice_dim: 1
    slice_point: 1
  }
}
'''

SIAMESE_LOSS = '''layer {
  name: "loss"
  type: "ContrastiveLoss"
  bottom: "feat"
  bottom: "feat_p"
  bottom: "sim"
  top: "loss"
  contrastive_loss_param {
    margin: 1
  }
}
'''


def learned(name, kind, bottom, top, outputs, extra=""):
    """A Convolution or InnerProduct layer block whose two params are shared by name."""
    base = name.replace("_p", "")
    field = "convolution_param" if kind == "Convolution" else "inner_product_param"
    return ('layer {\n  name: "%s"\n  type: "%s"\n  bottom: "%s"\n  top: "%s"\n'
            '  param {\n    name: "%s_w"\n    lr_mult: 1\n  }\n  param {\n    name: "%s_b"\n    lr_mult: 2\n  }\n'
            '  %s {\n    num_output: %d\n%s    weight_filler {\n      type: "xavier"\n    }\n'
            '    bias_filler {\n      type: "constant"\n    }\n  }\n}\n'
            % (name, kind, bottom, top, base, base, field, outputs, extra))


def pooled(name, bottom):
    return ('layer {\n  name: "%s"\n  type: "Pooling"\n  bottom: "%s"\n  top: "%s"\n'
            '  pooling_param {\n    pool: MAX\n    kernel_size: 2\n    stride: 2\n  }\n}\n' % (name, bottom, name))


def branch(s, data):
    conv = "    kernel_size: %d\n    stride: 1\n"
    return (learned("conv1" + s, "Convolution", data, "conv1" + s, 4, conv % 5) + pooled("pool1" + s, "conv1" + s)
            + learned("conv2" + s, "Convolution", "pool1" + s, "conv2" + s, 6, conv % 3)
            + pooled("pool2" + s, "conv2" + s)
            + learned("ip1" + s, "InnerProduct", "pool2" + s, "ip1" + s, 16)
            + 'layer {\n  name: "relu1%s"\n  type: "ReLU"\n  bottom: "ip1%s"\n  top: "ip1%s"\n}\n' % (s, s, s)
            + learned("ip2" + s, "InnerProduct", "ip1" + s, "ip2" + s, 8)
            + learned("feat" + s, "InnerProduct", "ip2" + s, "feat" + s, 2))


SIAMESE = SIAMESE_HEAD + branch("", "data") + branch("_p", "data_p") + SIAMESE_LOSS
BATCH = 8


def buildable(caffe, tmp_path, text, name):
    """``text`` with its Data layers as Input layers (pairs of 16x16 images), in a file."""
    message = text_format.Parse(text, caffe.proto.caffe_pb2.NetParameter())
    for layer in message.layer:
        if layer.type == "Data":
            layer.type = "Input"
            layer.ClearField("data_param")
            layer.ClearField("transform_param")
            layer.input_param.shape.add().dim.extend([BATCH, 2, 16, 16])
            layer.input_param.shape.add().dim.extend([BATCH])
    path = tmp_path / name
    path.write_text(text_format.MessageToString(message))
    return str(path)


def gradients(caffe, path, weights=None):
    net = caffe.Net(path, caffe.TRAIN, weights=weights) if weights else caffe.Net(path, caffe.TRAIN)
    rng = np.random.RandomState(5)
    net.blobs["pair_data"].data[...] = rng.uniform(0, 1, net.blobs["pair_data"].data.shape)
    net.blobs["sim"].data[...] = [1, 0, 0, 1, 0, 1, 1, 0]
    net.forward()
    net.backward()
    grads = {(name, i): blob.diff.copy() for name, blobs in net.params.items() for i, blob in enumerate(blobs)}
    return net, grads


def test_siamese_one_clip_over_both_features_named_after_the_loss(harden, caffe, tmp_path):
    (tmp_path / "siamese.prototxt").write_text(SIAMESE)
    status, err = harden("siamese.prototxt", "-o", "repair.prototxt", "--level", "repair")
    assert status == 0, err
    text = (tmp_path / "repair.prototxt").read_text()
    assert only_insertions(SIAMESE, text)
    [clip] = clips(caffe, text)
    assert (clip.name, list(clip.bottom), list(clip.top)) == ("loss_clip", ["feat", "feat_p"], ["feat", "feat_p"])
    assert clip.python_param.param_str == "{name: loss_clip, follows: loss, mode: norm, max_norm: 1000}"
    names = [l.name for l in layers(caffe, text)]
    assert names[-3:] == ["feat_p_guard", "loss_clip", "loss"] and "feat_guard" in names
    assert "  + NaNGuard feat_p_guard after feat_p on feat_p: below loss 'loss'" in err.splitlines()
    assert ("  + GradientClip loss_clip before loss on feat, feat_p: one L2 norm <= 1000 over the 2 "
            "gradients the loss sends down (their direction kept)") in err.splitlines()
    assert "8 NaNGuard and 1 GradientClip inserted" in err  # sim, a data top, is in no clip

    # Re-hardening at repair changes nothing; observe and strict remove the clip, and each
    # level reached from another is the file hardening the original there gives.
    status, err = harden("repair.prototxt", "-o", "again.prototxt", "--level", "repair")
    assert (tmp_path / "again.prototxt").read_text() == text and "already hardened" in err
    status, err = harden("repair.prototxt", "-o", "ten.prototxt", "--level", "repair", "--max-norm", "10")
    assert "  ~ GradientClip loss_clip: max_norm 1000 -> 10" in err.splitlines()
    assert (tmp_path / "ten.prototxt").read_text() == text.replace("max_norm: 1000}", "max_norm: 10}")
    for level in ("observe", "strict"):
        harden("siamese.prototxt", "-o", "%s.prototxt" % level, "--level", level)
        status, err = harden("repair.prototxt", "-o", "back.prototxt", "--level", level)
        back = (tmp_path / "back.prototxt").read_text()
        assert back == (tmp_path / ("%s.prototxt" % level)).read_text() and not clips(caffe, back)
        assert "  - GradientClip loss_clip after loss removed: level %s has no clip" % level in err
        harden("%s.prototxt" % level, "-o", "up.prototxt", "--level", "repair")
        assert (tmp_path / "up.prototxt").read_text() == text


def test_siamese_hardened_gradients_are_the_originals_times_one_scalar(harden, caffe, tmp_path):
    (tmp_path / "siamese.prototxt").write_text(SIAMESE)
    original_file = buildable(caffe, tmp_path, SIAMESE, "original_in.prototxt")
    original, free = gradients(caffe, original_file)
    weights = str(tmp_path / "siamese.caffemodel")
    original.save(weights)
    # The branches cancel in the shared bias of feat: exactly 0; conv1's is not.
    assert not free[("feat", 1)].any() and np.abs(free[("conv1", 0)]).max() > 0
    norm = np.sqrt(sum((original.blobs[b].diff.astype(np.float64) ** 2).sum() for b in ("feat", "feat_p")))

    harden("siamese.prototxt", "-o", "inactive.prototxt", "--level", "repair", "--max-norm", "1e30")
    _, inactive = gradients(caffe, buildable(caffe, tmp_path, (tmp_path / "inactive.prototxt").read_text(),
                                             "inactive_in.prototxt"), weights)
    assert set(inactive) == set(free)
    for key, grad in free.items():
        np.testing.assert_array_equal(inactive[key], grad, err_msg=str(key))

    max_norm = 0.001
    assert norm > 10 * max_norm  # the clip acts
    harden("siamese.prototxt", "-o", "active.prototxt", "--level", "repair", "--max-norm", max_norm)
    hardened, active = gradients(caffe, buildable(caffe, tmp_path, (tmp_path / "active.prototxt").read_text(),
                                                  "active_in.prototxt"), weights)
    clip = next(layer for layer in hardened.layers if hasattr(layer, "stats"))
    assert clip.stats.clipped_total() == 1
    scale = max_norm / (norm + 1e-6)
    assert not active[("feat", 1)].any()  # still exactly 0
    for key, grad in free.items():
        np.testing.assert_allclose(active[key], grad * scale, rtol=1e-4, atol=1e-6 * np.abs(grad).max() * scale,
                                   err_msg=str(key))


def test_a_clip_on_the_first_feature_alone_is_replaced_by_the_one_over_both(harden, caffe, tmp_path):
    """The form harden wrote before (bottom 0 only: feat_clip after feat) is its own, so a
    repair run takes it out and puts the clip over both in, as hardening the original does."""
    (tmp_path / "siamese.prototxt").write_text(SIAMESE)
    harden("siamese.prototxt", "-o", "observe.prototxt")
    harden("siamese.prototxt", "-o", "repair.prototxt", "--level", "repair")
    observe = (tmp_path / "observe.prototxt").read_text()
    guard_end = observe.index("}\n", observe.index("}\n", observe.index('name: "feat_guard"')) + 2) + 2
    old_clip = layer_block("feat_clip", ["feat"], [], "GradientClip", clip_param_str("feat_clip", "feat", 1000.0),
                           "  ")
    old = observe[:guard_end] + old_clip + observe[guard_end:]
    (tmp_path / "old.prototxt").write_text(old.replace("action: warn", "action: clamp, backward_action: zero"))
    assert [list(c.bottom) for c in clips(caffe, old)] == [["feat"]]
    status, err = harden("old.prototxt", "-o", "new.prototxt", "--level", "repair")
    assert status == 0, err
    assert (tmp_path / "new.prototxt").read_text() == (tmp_path / "repair.prototxt").read_text()
    assert "  - GradientClip feat_clip after feat removed: loss 'loss' clips feat, feat_p with one norm" in err


# --- SSD's MultiBoxLoss (a type this Caffe lacks: harden only) ----------------------------------

SSD = '''name: "MobileNet-SSD"
layer { name: "data" type: "AnnotatedData" top: "data" top: "label" include { phase: TRAIN }
  data_param { source: "trainval_lmdb" batch_size: 24 backend: LMDB }
  annotated_data_param { label_map_file: "labelmap.prototxt" } }
layer { name: "conv0" type: "Convolution" bottom: "data" top: "conv0" convolution_param { num_output: 32 kernel_size: 3 } }
layer { name: "conv0_mbox_loc" type: "Convolution" bottom: "conv0" top: "conv0_mbox_loc"
  convolution_param { num_output: 12 kernel_size: 1 } }
layer { name: "conv0_mbox_loc_perm" type: "Permute" bottom: "conv0_mbox_loc" top: "conv0_mbox_loc_perm"
  permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "conv0_mbox_loc_flat" type: "Flatten" bottom: "conv0_mbox_loc_perm" top: "conv0_mbox_loc_flat" }
layer { name: "conv0_mbox_conf" type: "Convolution" bottom: "conv0" top: "conv0_mbox_conf"
  convolution_param { num_output: 63 kernel_size: 1 } }
layer { name: "conv0_mbox_conf_flat" type: "Flatten" bottom: "conv0_mbox_conf" top: "conv0_mbox_conf_flat" }
layer { name: "conv0_mbox_priorbox" type: "PriorBox" bottom: "conv0" bottom: "data" top: "conv0_mbox_priorbox"
  prior_box_param { min_size: 60 aspect_ratio: 2 flip: true clip: false } }
layer { name: "mbox_loc" type: "Concat" bottom: "conv0_mbox_loc_flat" top: "mbox_loc" concat_param { axis: 1 } }
layer { name: "mbox_conf" type: "Concat" bottom: "conv0_mbox_conf_flat" top: "mbox_conf" concat_param { axis: 1 } }
layer { name: "mbox_priorbox" type: "Concat" bottom: "conv0_mbox_priorbox" top: "mbox_priorbox" concat_param { axis: 2 } }
layer { name: "mbox_loss" type: "MultiBoxLoss" bottom: "mbox_loc" bottom: "mbox_conf" bottom: "mbox_priorbox"
  bottom: "label" top: "mbox_loss" include { phase: TRAIN }
  loss_param { normalization: VALID }
  multibox_loss_param { loc_loss_type: SMOOTH_L1 conf_loss_type: SOFTMAX num_classes: 21 } }
'''


def test_multibox_loss_clips_locations_and_confidences_with_one_norm(harden, caffe, tmp_path):
    (tmp_path / "ssd.prototxt").write_text(SSD)
    status, err = harden("ssd.prototxt", "-o", "repair.prototxt", "--level", "repair")
    assert status == 0, err
    text = (tmp_path / "repair.prototxt").read_text()
    assert only_insertions(SSD, text)
    assert "  + NaNGuard mbox_conf_guard after mbox_conf on mbox_conf: below loss 'mbox_loss'" in err.splitlines()
    assert "  + NaNGuard mbox_loc_guard after mbox_loc on mbox_loc: below loss 'mbox_loss'" in err.splitlines()
    message = text_format.Parse(text, caffe.proto.caffe_pb2.NetParameter(), allow_unknown_field=True)
    [clip] = [l for l in message.layer if l.python_param.layer == "GradientClip"]
    assert (clip.name, list(clip.bottom), list(clip.top)) == ("mbox_loss_clip", ["mbox_loc", "mbox_conf"],
                                                              ["mbox_loc", "mbox_conf"])
    assert [r.phase for r in clip.include] == [caffe.TRAIN]  # the loss's phase rules
    names = [l.name for l in message.layer]
    assert names.index("mbox_loss_clip") == names.index("mbox_loss") - 1
    status, _ = harden("repair.prototxt", "-o", "again.prototxt", "--level", "repair")
    assert (tmp_path / "again.prototxt").read_text() == text
    harden("repair.prototxt", "-o", "observe.prototxt")
    assert "GradientClip" not in (tmp_path / "observe.prototxt").read_text()


# --- a loss with no top: R-CNN's fine-tuning net ------------------------------------------------

TOPLESS = '''layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 6 } shape { dim: 4 } } }
layer { name: "fc8_pascal" type: "InnerProduct" bottom: "data" top: "fc8_pascal"
  inner_product_param { num_output: 21 weight_filler { type: "gaussian" std: 1 } } }
layer {
  name: "loss"
  type: "SoftmaxWithLoss"
  bottom: "fc8_pascal"
  bottom: "label"
}
'''


def test_a_loss_with_no_top_is_guarded_and_clipped(harden, caffe, tmp_path):
    """Caffe gives a loss layer written without a top one automatic top of weight 1 (the
    R-CNN fine-tuning example's SoftmaxWithLoss): it is a loss like any other."""
    (tmp_path / "rcnn.prototxt").write_text(TOPLESS)
    status, err = harden("rcnn.prototxt", "-o", "repair.prototxt", "--level", "repair", "--max-norm", "0.01")
    assert status == 0, err
    assert "  + GradientClip fc8_pascal_clip after fc8_pascal on fc8_pascal: L2 norm <= 0.01 below the loss" \
        in err.splitlines()
    assert "  + NaNGuard fc8_pascal_guard after fc8_pascal on fc8_pascal: below loss 'loss'" in err.splitlines()
    net = caffe.Net(str(tmp_path / "repair.prototxt"), caffe.TRAIN)
    net.blobs["data"].data[...] = np.random.RandomState(0).uniform(-1, 1, (4, 6))
    net.blobs["label"].data[...] = [0, 3, 7, 20]
    net.forward()
    net.backward()
    assert np.linalg.norm(net.blobs["fc8_pascal"].diff) == pytest.approx(0.01, rel=1e-4)  # the clip acted


@pytest.mark.parametrize("text, loss", [
    ('name: "l" type: "SoftmaxWithLoss" bottom: "s" bottom: "y"', True),
    ('name: "l" type: "SoftmaxWithLoss" bottom: "s" bottom: "y" loss_weight: 0', False),
    ('name: "l" type: "SoftmaxWithLoss" bottom: "s" bottom: "y" top: "l" loss_weight: 0', False),
    ('name: "a" type: "Accuracy" bottom: "s" bottom: "y"', False),
    ('name: "r" type: "Reduction" bottom: "s" top: "r" loss_weight: 2', True),
])
def test_is_loss(caffe, text, loss):
    assert is_loss(text_format.Parse(text, caffe.proto.caffe_pb2.LayerParameter())) is loss


@pytest.mark.parametrize("text, bottoms", [
    ('type: "SoftmaxWithLoss" bottom: "s" bottom: "y"', [0]),
    ('type: "InfogainLoss" bottom: "s" bottom: "y" bottom: "h"', [0]),
    ('type: "EuclideanLoss" bottom: "a" bottom: "b"', [0, 1]),
    ('type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "sim"', [0, 1]),
    ('type: "SmoothL1Loss" bottom: "p" bottom: "t" bottom: "w_in" bottom: "w_out"', [0]),
    ('type: "MultiBoxLoss" bottom: "loc" bottom: "conf" bottom: "prior" bottom: "label"', [0, 1]),
    ('type: "MyLoss" bottom: "a" bottom: "b"', [0]),
    ('type: "EuclideanLoss" bottom: "a" bottom: "b" propagate_down: false propagate_down: true', [1]),
])
def test_gradient_bottoms(caffe, text, bottoms):
    assert gradient_bottoms(text_format.Parse(text, caffe.proto.caffe_pb2.LayerParameter())) == bottoms


# --- EuclideanLoss: two predictions, or a prediction and its data target -------------------------

def euclidean(target_layer, extra=""):
    return ('layer { name: "data" type: "Input" top: "x" top: "t" input_param { shape { dim: 4 dim: 3 } '
            'shape { dim: 4 dim: 2 } } }\n'
            'layer { name: "fc" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 } }\n'
            + target_layer
            + 'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "%s" top: "loss"%s }\n'
            % ("z" if target_layer else "t", extra))


@pytest.mark.parametrize("target, extra, expected", [
    ("", "", [["y"]]),  # t is the data's: the clip of y alone, as before
    ('layer { name: "fc2" type: "InnerProduct" bottom: "x" top: "z" inner_product_param { num_output: 2 } }\n',
     "", [["y", "z"]]),
    ('layer { name: "fc2" type: "InnerProduct" bottom: "x" top: "z" inner_product_param { num_output: 2 } }\n',
     " propagate_down: true propagate_down: false", [["y"]]),
])
def test_euclidean_loss_clips_what_learns(harden, caffe, tmp_path, target, extra, expected):
    (tmp_path / "net.prototxt").write_text(euclidean(target, extra))
    status, err = harden("net.prototxt", "-o", "repair.prototxt", "--level", "repair")
    assert status == 0, err
    assert [list(c.bottom) for c in clips(caffe, (tmp_path / "repair.prototxt").read_text())] == expected
