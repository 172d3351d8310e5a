"""Production nets written for a Caffe fork (py-faster-rcnn, SSD, SegNet, DenseNet's
Caffe): read whatever fields and layer types they carry, the unknown kept as written and
named once; every rule that needs neither runs; harden edits only around its own blocks."""

import difflib
import json
import subprocess
import sys

import pytest

# Written here in each fork's published layout, with its own fields and layer types.
FORK_NETS = {
    "py-faster-rcnn": '''name: "VGG_CNN_M_1024"
layer { name: "input-data" type: "Python" top: "data" top: "im_info" top: "gt_boxes"
  python_param { module: "roi_data_layer.layer" layer: "RoIDataLayer" param_str: "'num_classes': 21" } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 0 decay_mult: 0 } param { lr_mult: 0 decay_mult: 0 }
  convolution_param { num_output: 96 kernel_size: 7 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "roi_pool5" type: "ROIPooling" bottom: "conv1" bottom: "rois" top: "pool5"
  roi_pooling_param { pooled_w: 6 pooled_h: 6 spatial_scale: 0.0625 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool5" top: "fc6" inner_product_param { num_output: 1024 } }
layer { name: "cls_score" type: "InnerProduct" bottom: "fc6" top: "cls_score" inner_product_param { num_output: 21 } }
layer { name: "bbox_pred" type: "InnerProduct" bottom: "fc6" top: "bbox_pred" inner_product_param { num_output: 84 } }
layer { name: "loss_cls" type: "SoftmaxWithLoss" bottom: "cls_score" bottom: "labels" top: "loss_cls"
  loss_weight: 1 propagate_down: 1 propagate_down: 0 }
layer { name: "loss_bbox" type: "SmoothL1Loss" bottom: "bbox_pred" bottom: "bbox_targets"
  bottom: "bbox_inside_weights" bottom: "bbox_outside_weights" top: "loss_bbox" loss_weight: 1
  smooth_l1_loss_param { sigma: 3.0 } }
''',
    "ssd": '''name: "MobileNet-SSD"
layer { name: "data" type: "AnnotatedData" top: "data" top: "label"
  include { phase: TRAIN }
  transform_param { scale: 0.007843 mirror: true mean_value: 127.5
    resize_param { prob: 1.0 resize_mode: WARP height: 300 width: 300 interp_mode: LINEAR } }
  data_param { source: "trainval_lmdb" batch_size: 24 backend: LMDB }
  annotated_data_param { batch_sampler { max_sample: 1 max_trials: 1 } label_map_file: "labelmap.prototxt" } }
layer { name: "conv0" type: "Convolution" bottom: "data" top: "conv0"
  convolution_param { num_output: 32 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "conv0/relu" type: "ReLU" bottom: "conv0" top: "conv0" }
layer { name: "conv0_mbox_loc" type: "Convolution" bottom: "conv0" top: "conv0_mbox_loc"
  convolution_param { num_output: 12 kernel_size: 1 } }
layer { name: "conv0_mbox_loc_perm" type: "Permute" bottom: "conv0_mbox_loc" top: "conv0_mbox_loc_perm"
  permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "conv0_mbox_conf" type: "Convolution" bottom: "conv0" top: "conv0_mbox_conf"
  convolution_param { num_output: 63 kernel_size: 1 } }
layer { name: "mbox_loss" type: "MultiBoxLoss" bottom: "conv0_mbox_loc_perm" bottom: "conv0_mbox_conf"
  bottom: "mbox_priorbox" bottom: "label" top: "mbox_loss"
  include { phase: TRAIN } propagate_down: true propagate_down: true propagate_down: false propagate_down: false
  loss_param { normalization: VALID }
  multibox_loss_param { loc_loss_type: SMOOTH_L1 conf_loss_type: SOFTMAX num_classes: 21 } }
''',
    "segnet": '''name: "segnet"
layer { name: "data" type: "DenseImageData" top: "data" top: "label"
  dense_image_data_param { source: "train.txt" batch_size: 4 shuffle: true } }
layer { name: "conv1_1" type: "Convolution" bottom: "data" top: "conv1_1"
  convolution_param { num_output: 64 kernel_size: 3 pad: 1 } }
layer { name: "conv1_1_bn" type: "BN" bottom: "conv1_1" top: "conv1_1"
  bn_param { scale_filler { type: "constant" value: 1 } shift_filler { type: "constant" value: 0.001 } } }
layer { name: "relu1_1" type: "ReLU" bottom: "conv1_1" top: "conv1_1" }
layer { name: "conv_classifier" type: "Convolution" bottom: "conv1_1" top: "conv_classifier"
  convolution_param { num_output: 11 kernel_size: 1 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "conv_classifier" bottom: "label" top: "loss"
  softmax_param { engine: CAFFE } loss_param: { ignore_label: 11 weight_by_label_freqs: true } }
''',
    "densenet": '''name: "DenseNet_121"
input: "data"
input_dim: 1
input_dim: 3
input_dim: 224
input_dim: 224
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 64 bias_term: false pad: 3 kernel_size: 7 stride: 2 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 ceil_mode: false } }
layer { name: "fc6" type: "Convolution" bottom: "pool1" top: "fc6" convolution_param { num_output: 1000 kernel_size: 1 } }
''',
}

SSD_SOLVER = '''train_net: "ssd.prototxt"
base_lr: 0.0005
display: 10
max_iter: 120000
lr_policy: "multistep"
gamma: 0.5
momentum: 0.9
weight_decay: 5e-05
snapshot: 1000
snapshot_prefix: "mobilenet"
solver_mode: GPU
type: "RMSProp"
eval_type: "detection"
ap_version: "11point"
'''

EXPECTED = {
    "py-faster-rcnn": (["roi_pooling_param", "smooth_l1_loss_param"], ["ROIPooling", "SmoothL1Loss"]),
    "ssd": (["resize_param", "annotated_data_param", "permute_param", "multibox_loss_param"],
            ["Permute", "MultiBoxLoss"]),  # AnnotatedData is a known data layer type
    "segnet": (["dense_image_data_param", "bn_param", "weight_by_label_freqs"], ["BN"]),
    "densenet": (["ceil_mode"], []),
}


def run(command, *args, cwd):
    return subprocess.run([sys.executable, "-m", "safe_layers.tools.cli", command] + [str(a) for a in args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("fork", sorted(FORK_NETS))
def test_lint_reads_a_fork_net_and_names_what_it_did_not_know_once(caffe, tmp_path, fork):
    net = tmp_path / ("%s.prototxt" % fork)
    net.write_text(FORK_NETS[fork])
    result = run("lint", net, "--format", "json", cwd=tmp_path)
    assert result.returncode in (0, 1), result.stderr
    findings = json.loads(result.stdout)["findings"]
    notes = [f for f in findings if f["rule"] == "SL006"]
    assert len(notes) == 1 and notes[0]["severity"] == "info"
    fields, types = EXPECTED[fork]
    for name in fields + types:
        assert name in notes[0]["message"], (name, notes[0]["message"])
    assert not [f for f in findings if f["rule"] == "SL001"]


def test_a_fork_solver_is_read(caffe, tmp_path):
    (tmp_path / "ssd.prototxt").write_text(FORK_NETS["ssd"])
    (tmp_path / "solver.prototxt").write_text(SSD_SOLVER)
    result = run("lint", "solver.prototxt", "--format", "json", cwd=tmp_path)
    assert result.returncode in (0, 1), result.stderr
    notes = [f for f in json.loads(result.stdout)["findings"] if f["rule"] == "SL006"]
    assert {n["path"] for n in notes} == {"solver.prototxt", str(tmp_path / "ssd.prototxt")} or \
        len(notes) == 2
    solver_note = next(n for n in notes if n["path"] == "solver.prototxt")
    assert "eval_type" in solver_note["message"] and "ap_version" in solver_note["message"]


@pytest.mark.parametrize("fork", sorted(FORK_NETS))
@pytest.mark.parametrize("level", ["observe", "repair"])
def test_harden_changes_a_fork_net_only_by_its_own_blocks(caffe, tmp_path, fork, level):
    source = tmp_path / ("%s.prototxt" % fork)
    source.write_text(FORK_NETS[fork])
    out = tmp_path / "hard.prototxt"
    result = run("harden", source, "-o", out, "--level", level, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    before, after = source.read_text().splitlines(), out.read_text().splitlines()
    diff = [line for line in difflib.ndiff(before, after) if line[:1] in "+-"]
    assert diff and all(line.startswith("+ ") for line in diff), "\n".join(diff)
    # Re-hardening at the same level changes nothing.
    again = run("harden", out, "-o", tmp_path / "again.prototxt", "--level", level, cwd=tmp_path)
    assert again.returncode == 0 and (tmp_path / "again.prototxt").read_text() == out.read_text()


@pytest.mark.parametrize("text, expected", [
    ('layer { name: "p" type: "Pooling" bottom: "d" top: "e"\n'
     '  pooling_param { ceil_mode: true kernel_sise: 2 } }\n',
     'bad.prototxt:2:35: no field named "layer.pooling_param.kernel_sise" (not a field of this '
     "Caffe's caffe.proto, nor of the forks safe-layers knows (py-faster-rcnn, SSD, SegNet): a typo?)"),
    ('layer { name: "c" type: "Convolutin" bottom: "d" top: "e" }\n',
     "bad.prototxt:1:19: layer 'c' has type 'Convolutin', which this Caffe does not know, nor a "
     "fork safe-layers knows (close: Convolution"),
])
def test_a_name_no_fork_has_is_still_refused_as_caffe_would(caffe, tmp_path, text, expected):
    (tmp_path / "bad.prototxt").write_text(text)
    result = run("lint", "bad.prototxt", cwd=tmp_path)
    assert result.returncode == 2 and expected in result.stderr, result.stderr


def test_shape_rules_check_a_fork_net_up_to_its_first_unknown_layer(caffe, tmp_path):
    """Caffe builds the layers before ROIPooling: the pooling trap there is found."""
    (tmp_path / "net.prototxt").write_text('''name: "fork_pool"
layer { name: "data" type: "Input" top: "data" top: "rois"
  input_param { shape { dim: 2 dim: 3 dim: 10 dim: 10 } shape { dim: 2 dim: 5 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: AVE kernel_size: 3 stride: 5 } }
layer { name: "roi_pool5" type: "ROIPooling" bottom: "pool1" bottom: "rois" top: "pool5"
  roi_pooling_param { pooled_w: 2 pooled_h: 2 spatial_scale: 0.0625 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool5" top: "fc" inner_product_param { num_output: 3 } }
''')
    result = run("lint", "net.prototxt", "--format", "json", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    rules = sorted(f["rule"] for f in json.loads(result.stdout)["findings"])
    assert rules == ["SL006", "SL201"]


def test_harden_guards_a_forks_data_and_normalization_layers(caffe, tmp_path):
    """SegNet's DenseImageData is a data layer and its BN a normalization: both guarded."""
    (tmp_path / "segnet.prototxt").write_text(FORK_NETS["segnet"])
    result = run("harden", "segnet.prototxt", "-o", "hard.prototxt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "+ NaNGuard data_guard after data on data, label: data layer tops" in result.stderr
    assert "+ NaNGuard conv1_1_bn_guard after conv1_1_bn on conv1_1" in result.stderr, result.stderr


def test_harden_names_the_command_that_upgrades_a_v1_net(caffe, tmp_path):
    (tmp_path / "v1.prototxt").write_text('layers { name: "ip" type: INNER_PRODUCT bottom: "x" '
                                          'top: "y" inner_product_param { num_output: 2 } }\n')
    result = run("harden", "v1.prototxt", "-o", "out.prototxt", cwd=tmp_path)
    assert result.returncode == 2
    assert "upgrade_net_proto_text v1.prototxt NEW.prototxt), then harden" in result.stderr


def test_harden_names_a_bottomless_layer_of_a_type_it_does_not_know(caffe, tmp_path):
    """A fork's data layer harden has no list for is left alone, and said so."""
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "feed" type: "MyForkData" top: "data" top: "label" }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 } }\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n')
    result = run("harden", "net.prototxt", "-o", "hard.prototxt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("  = left alone: 'feed', without bottoms, of a type no Caffe or fork harden knows (a "
            "fork's data layer?): its tops are not guarded; --guard NAME guards them") in result.stderr
    result = run("harden", "net.prototxt", "-o", "hard2.prototxt", "--guard", "feed", cwd=tmp_path)
    assert result.returncode == 0 and "feed_guard" in (tmp_path / "hard2.prototxt").read_text()
    assert "left alone" not in result.stderr
