"""The project's own Caffe build step: cache reuse and clear failures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.devices import gpu_build
from support.paths import ROOT

BUILD = ROOT / "caffe_build" / "build_caffe.sh"

if os.environ.get("SAFE_LAYERS_BUNDLE"):
    pytest.skip("the GPU bundle's Caffe is prebuilt (ci/gpu-check): the build is tested where "
                "the bundle is made", allow_module_level=True)


def test_second_build_reuses_the_cache(caffe):
    # The environment's Caffe is the CPU build or, after `make setup CUDA=1`, the CUDA one.
    env = dict(os.environ, CUDA="1" if gpu_build(caffe) else "0")
    result = subprocess.run([str(BUILD), sys.executable], capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert "reusing cached Caffe at" in result.stderr
    prefix = Path(result.stdout.strip().splitlines()[-1])
    assert (prefix / ".complete").is_file() and (prefix / "bin" / "caffe").is_file()
    # The environment's pycaffe is that cached build.
    assert prefix.resolve() in Path(caffe.__file__).resolve().parents


def test_a_python_without_numpy_is_a_clear_error(tmp_path):
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    result = subprocess.run([str(BUILD), str(venv / "bin" / "python")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert "build_caffe: error: cannot use %s to build pycaffe (it needs numpy" % (venv / "bin" / "python") \
        in result.stderr
    assert result.stdout == ""


def test_usage_without_arguments():
    result = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "usage: build_caffe.sh PYTHON" in result.stderr


@pytest.mark.parametrize("script", ["build_caffe.sh", "setup_env.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "caffe_build" / script)], check=True)
