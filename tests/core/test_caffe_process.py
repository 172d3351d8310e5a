"""safe_layers.core.caffe_process: the `caffe` binary's command line as the layers read it
(``-gpu``, ``-solver``, ``-snapshot``), and the iteration of the solverstates it writes.

A CPU_ONLY Caffe stops at `-gpu` before any layer is built, so the command lines are given
to the detection directly (the one place the layers read them: caffe_process.caffe_cli_argv)."""

import pytest

from safe_layers.core import backend, caffe_process
from support.nets import classifier_net


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


def test_cli_flag_reads_every_gflags_spelling():
    argv = ("caffe", "train", "-solver", "s.prototxt", "--snapshot=a.solverstate", "-gpu=0")
    assert caffe_process.cli_flag(argv, "solver") == "s.prototxt"
    assert caffe_process.cli_flag(argv, "snapshot") == "a.solverstate"
    assert caffe_process.cli_flag(argv, "gpu") == "0"
    assert caffe_process.cli_flag(argv, "weights") is None
    assert caffe_process.cli_flag(("caffe", "train", "--snapshot", "b"), "snapshot") == "b"


def test_solverstate_iteration_rejects_other_files(tmp_path):
    bad = tmp_path / "x.solverstate"
    bad.write_bytes(b"\x12\x03abc")  # field 2 (learned_net) only: no iteration
    with pytest.raises(ValueError, match="no iteration"):
        caffe_process.solverstate_iteration(str(bad))
    h5 = tmp_path / "lenet_iter_300.solverstate.h5"
    h5.write_bytes(b"not hdf5")
    try:
        import h5py  # noqa: F401
    except ImportError:  # the file name is the fallback
        assert caffe_process.solverstate_iteration(str(h5)) == 300


def test_solverstate_iteration_of_a_real_hdf5_state(make_solver, tmp_path):
    """Caffe writes an HDF5 state's iter as a one-element dataset (hdf5_save_int)."""
    pytest.importorskip("h5py")
    solver = make_solver(classifier_net(batch=2), snapshot_format="HDF5",
                         snapshot_prefix='"%s"' % (tmp_path / "s"))
    solver.step(3)
    solver.snapshot()
    assert caffe_process.solverstate_iteration(str(tmp_path / "s_iter_3.solverstate.h5")) == 3
