"""V1 nets (`layers { type: CONVOLUTION }`), as old published models are written: lint
builds them as Caffe does, upgraded first, with their data layers replaced like any
other's; --input-shape knows their data tops."""

import json
import subprocess
import sys

V1_NET = '''name: "LeNet"
layers {
  name: "mnist"
  type: DATA
  top: "data"
  top: "label"
  data_param { source: "examples/mnist/mnist_train_lmdb" backend: LMDB batch_size: 64 }
  transform_param { scale: 0.00390625 }
  include: { phase: TRAIN }
}
layers {
  name: "conv1"
  type: CONVOLUTION
  bottom: "data"
  top: "conv1"
  blobs_lr: 1
  blobs_lr: 2
  convolution_param { num_output: 20 kernel_size: 5 weight_filler { type: "xavier" } }
}
layers {
  name: "ip2"
  type: INNER_PRODUCT
  bottom: "conv1"
  top: "ip2"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } }
}
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip2" bottom: "label" top: "loss" }
'''


def lint_json(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "safe_layers.tools.cli", "lint", "--format",
                             "json"] + [str(a) for a in args], capture_output=True, text=True,
                            cwd=cwd, timeout=300)
    return result.returncode, json.loads(result.stdout) if result.stdout else None, result.stderr


def test_a_v1_net_whose_lmdb_is_absent_is_no_caffe_refusal(caffe, tmp_path):
    (tmp_path / "v1.prototxt").write_text(V1_NET)
    status, doc, err = lint_json("v1.prototxt", cwd=tmp_path)
    assert status == 0, err
    rules = sorted(f["rule"] for f in doc["findings"])
    assert "SL001" not in rules and rules == ["SL002", "SL005"]
    v1 = next(f for f in doc["findings"] if f["rule"] == "SL005")
    assert "upgrade_net_proto_text v1.prototxt NEW.prototxt" in v1["fix"]


def test_input_shape_names_a_v1_data_top_and_the_net_builds(caffe, tmp_path):
    (tmp_path / "v1.prototxt").write_text(V1_NET)
    status, doc, err = lint_json("v1.prototxt", "--input-shape", "data=64,1,28,28", cwd=tmp_path)
    assert status == 0, err
    assert sorted(f["rule"] for f in doc["findings"]) == ["SL005"]
