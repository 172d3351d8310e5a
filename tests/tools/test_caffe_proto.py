"""--caffe-proto: a fork's own schema, compiled at run time with protoc, reads the fields
it adds (also ones no published fork has); the installed Caffe's schema is left as it is."""

import json
import shutil
import subprocess
import sys

import pytest

from support.paths import DATA

NET = '''name: "fork"
layer { name: "data" type: "Input" top: "data" top: "rois"
  input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } shape { dim: 2 dim: 5 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "frob" type: "Frobnicate" bottom: "conv1" top: "conv1" frobnicate_param { level: 2 } }
layer { name: "roi_pool5" type: "ROIPooling" bottom: "conv1" bottom: "rois" top: "pool5"
  roi_pooling_param { pooled_w: 2 pooled_h: 2 spatial_scale: 0.0625 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool5" top: "fc" inner_product_param { num_output: 3 } }
'''

pytestmark = pytest.mark.skipif(shutil.which("protoc") is None, reason="no protoc here")


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "safe_layers.tools.cli"] + [str(a) for a in args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_a_field_no_published_fork_has_needs_the_forks_schema(caffe, tmp_path):
    (tmp_path / "net.prototxt").write_text(NET)
    result = run("lint", "net.prototxt", cwd=tmp_path)
    assert result.returncode == 2 and 'no field named "frobnicate_param"' in result.stderr
    result = run("lint", "net.prototxt", "--caffe-proto", DATA / "caffe-fork.proto", "--format", "json",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    notes = [f for f in json.loads(result.stdout)["findings"] if f["rule"] == "SL006"]
    assert len(notes) == 1
    for name in ("frobnicate_param", "roi_pooling_param", "Frobnicate", "ROIPooling"):
        assert name in notes[0]["message"]


def test_harden_with_the_forks_schema_edits_only_around_its_blocks(caffe, tmp_path):
    (tmp_path / "net.prototxt").write_text(NET)
    result = run("harden", "net.prototxt", "--caffe-proto", DATA / "caffe-fork.proto", "-o",
                 "hard.prototxt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    hard = (tmp_path / "hard.prototxt").read_text()
    assert "frobnicate_param { level: 2 }" in hard and "data_guard" in hard


@pytest.mark.parametrize("proto, why", [("missing.proto", "no such file"),
                                        ("broken.proto", "protoc refuses it"),
                                        ("other.proto", "defines no caffe.NetParameter")])
def test_a_schema_that_cannot_serve_is_exit_2_saying_why(caffe, tmp_path, proto, why):
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "broken.proto").write_text('syntax = "proto2";\nmessage X { optional int32 a = ; }\n')
    (tmp_path / "other.proto").write_text('syntax = "proto2";\npackage other;\nmessage X { optional int32 a = 1; }\n')
    result = run("lint", "net.prototxt", "--caffe-proto", proto, cwd=tmp_path)
    assert result.returncode == 2 and why in result.stderr and "Traceback" not in result.stderr
