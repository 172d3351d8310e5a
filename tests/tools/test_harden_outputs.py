"""`harden -o` never replaces what is not a regular file, never writes through a link, and
never leaves a temporary file: the user's mistakes (an output flag pointing at a device, a
link planted at a predictable name) cost nothing."""

import os
import stat
import subprocess
import sys

import pytest

from support.paths import DATA

NET = DATA / "lenet_train_test.prototxt"


def harden(*args, cwd):
    return subprocess.run([sys.executable, "-m", "safe_layers.tools.cli", "harden", str(NET)]
                          + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def null_device(tmp_path):
    """A character device like /dev/null (1, 3) at a path of this test's own: what
    `harden -o /dev/null` meets, without risking the machine's /dev/null."""
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    path = tmp_path / "null"
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return path


def test_a_device_output_is_written_into_never_replaced(null_device, tmp_path):
    result = harden("-o", null_device, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert stat.S_ISCHR(os.lstat(null_device).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["null"]


def test_a_link_at_the_output_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious.prototxt"
    target.write_text("keep me\n")
    link = tmp_path / "hardened.prototxt"
    link.symlink_to(target)
    result = harden("-o", link, cwd=tmp_path)
    assert result.returncode == 2 and "it is a symbolic link" in result.stderr
    assert target.read_text() == "keep me\n" and link.is_symlink()


def test_a_fifo_no_one_reads_is_refused_at_once(tmp_path):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    result = harden("-o", fifo, cwd=tmp_path)
    assert result.returncode == 2 and "no process is reading" in result.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_replaced_output_keeps_its_mode_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "hardened.prototxt"
    out.write_text("old\n")
    out.chmod(0o640)
    result = harden("-o", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "NaNGuard" in out.read_text() and stat.S_IMODE(out.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hardened.prototxt"]


CONTROL_NAMES = r'''name: "control"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv\n1" type: "Convolution" bottom: "data" top: "c\t1"
  convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "pool\001" type: "Pooling" bottom: "c\t1" top: "p"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
'''


def test_names_with_control_characters_are_written_so_caffe_and_yaml_read_them_back(caffe, tmp_path):
    """A line end or a control character escaped in a layer name: the guard's prototxt
    literal parses, its YAML names the layer exactly, and re-hardening changes nothing."""
    from safe_layers import reporting
    source = tmp_path / "control.prototxt"
    source.write_text(CONTROL_NAMES)
    command = [sys.executable, "-m", "safe_layers.tools.cli", "harden", str(source), "--level",
               "strict", "--guard", "Convolution,Pooling", "-o"]
    result = subprocess.run(command + [str(tmp_path / "hard.prototxt")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    net = caffe.Net(str(tmp_path / "hard.prototxt"), caffe.TEST)
    guards = {log.layer for log in reporting.fault_logs(net=net)}
    assert {"conv\n1_guard", "pool\x01_guard", "data_guard"} <= guards
    result = subprocess.run([sys.executable, "-m", "safe_layers.tools.cli", "harden",
                             str(tmp_path / "hard.prototxt"), "--level", "strict", "--guard",
                             "Convolution,Pooling", "-o", str(tmp_path / "twice.prototxt")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "twice.prototxt").read_text() == (tmp_path / "hard.prototxt").read_text()
