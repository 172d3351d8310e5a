"""The `caffe train -gpu N` flag, as the layers see it from inside the `caffe` binary.

A CPU_ONLY Caffe stops at `-gpu` before any layer is built, so the command lines are given
to the detection directly (the one place the layers read them: caffe_process.caffe_cli_argv)."""

import pytest

from safe_layers.core import backend, caffe_process


@pytest.mark.parametrize("argv, mode", [
    (("caffe", "train", "-solver", "s.prototxt", "-gpu", "0"), "gpu"),
    (("/opt/caffe/bin/caffe.bin", "train", "--gpu", "all", "-solver", "s.prototxt"), "gpu"),
    (("caffe", "train", "-gpu=1"), "gpu"),
    (("caffe", "train", "--gpu=0,1"), "gpu"),
    (("caffe", "train", "-solver", "s.prototxt"), "cpu"),
    (("caffe", "train", "-solver", "s.prototxt", "-gpu"), "cpu"),  # no value: Caffe's flag parser fails
    (("caffe", "train", "-gpu="), "cpu"),
    (("caffe", "train", "-weights", "gpu.caffemodel"), "cpu"),
    (None, "cpu"),  # not inside the caffe binary
])
def test_caffe_train_gpu_flag_selects_gpu_mode(monkeypatch, tmp_path, argv, mode):
    # Without -gpu the layers read solver_mode from the -solver file (as caffe.cpp does).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.prototxt").write_text('net: "n.prototxt"\n')
    backend._solver_mode.cache_clear()
    monkeypatch.delenv("SAFE_LAYERS_MODE", raising=False)
    monkeypatch.setattr(backend, "_explicit_mode", None)
    monkeypatch.setattr(caffe_process, "caffe_cli_argv", lambda: argv)
    assert backend.mode() == mode


def test_the_command_line_is_read_from_the_process():
    # Inside pytest this process is not the caffe binary.
    assert caffe_process.caffe_cli_argv() is None
