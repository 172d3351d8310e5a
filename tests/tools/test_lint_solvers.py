"""lint on production solvers: their own rules whatever their nets, a pycaffe loop's
--iterations, one finding where harden wrote many layers."""

import json
import subprocess
import sys

import pytest


def lint_json(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "safe_layers.tools.cli", "lint", "--format",
                             "json"] + [str(a) for a in args], capture_output=True, text=True,
                            cwd=cwd, timeout=300)
    return result.returncode, json.loads(result.stdout), result.stderr


FRCNN_SOLVER = '''train_net: "models/pascal_voc/VGG16/faster_rcnn_end2end/train.prototxt"
base_lr: 0.001
lr_policy: "step"
gamma: 0.1
stepsize: 50000
display: 20
average_loss: 100
momentum: 0.9
weight_decay: 0.0005
snapshot: 0
snapshot_prefix: "vgg16_faster_rcnn"
iter_size: 2
'''


def test_a_solver_whose_net_cannot_be_read_gets_its_own_rules(caffe, tmp_path):
    """py-faster-rcnn's solver has no max_iter (its pycaffe loop gives the count): SL104
    is reported though the net it names is not there, and the missing net exits 2."""
    (tmp_path / "solver.prototxt").write_text(FRCNN_SOLVER)
    status, doc, err = lint_json("solver.prototxt", cwd=tmp_path)
    assert status == 2 and "does not exist" in err
    assert [f["rule"] for f in doc["findings"]] == ["SL104"]
    assert doc["unreadable"][0]["path"] == "solver.prototxt"


def test_iterations_declares_a_pycaffe_loop(caffe, tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text('layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
                   'layer { name: "fc" type: "InnerProduct" bottom: "x" top: "y" '
                   'inner_product_param { num_output: 2 } }\n')
    (tmp_path / "solver.prototxt").write_text('net: "net.prototxt"\nbase_lr: 0.01\n'
                                              'lr_policy: "fixed"\n')
    status, doc, _ = lint_json("solver.prototxt", "--no-shapes", cwd=tmp_path)
    assert status == 1 and [(f["rule"], f["severity"]) for f in doc["findings"]] == [("SL104", "error")]
    status, doc, _ = lint_json("solver.prototxt", "--no-shapes", "--iterations", "500", cwd=tmp_path)
    assert status == 0 and [(f["rule"], f["severity"]) for f in doc["findings"]] == [("SL104", "info")]
    assert "the pycaffe loop of 500 iterations" in doc["findings"][0]["message"]


def test_one_iter_size_finding_for_every_layer_harden_wrote(caffe, tmp_path):
    layers = "".join(
        'layer { name: "g%d" type: "Python" bottom: "x" top: "x" python_param { module: '
        '"safe_layers" layer: "NaNGuard" param_str: "{name: g%d, follows: data, action: warn}" } }\n'
        % (i, i) for i in range(8))
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n' + layers)
    (tmp_path / "solver.prototxt").write_text('net: "net.prototxt"\nbase_lr: 0.01\n'
                                              'lr_policy: "fixed"\nmax_iter: 10\niter_size: 4\n')
    status, doc, _ = lint_json("solver.prototxt", "--no-shapes", cwd=tmp_path)
    found = [f for f in doc["findings"] if f["rule"] == "SL108"]
    assert len(found) == 1, found
    assert found[0]["message"].startswith("8 safe_layers layers ('g0', 'g1', 'g2', 'g3', 'g4', ...) "
                                          "have iter_size 1 but the solver")
    assert found[0]["layers"] == ["g%d" % i for i in range(8)]
