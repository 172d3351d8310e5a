"""The true iteration in every report: the caffe binary after -snapshot, the context."""

import os
import re
from pathlib import Path

import pytest

from safe_layers.core import solver_iteration, caffe_process
from safe_layers import reporting

TESTS = Path(__file__).resolve().parent

# A NaN placed at a chosen forward call of the train net; a NaNGuard that aborts names it.
POISONED_NET = """
name: "poisoned"
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 1 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "poison" type: "Python" bottom: "x" top: "xp"
  python_param { module: "poison" layer: "PoisonAtCall" param_str: "{calls: CALLS, sample: 2}" } }
layer { name: "guard" type: "Python" bottom: "xp" top: "xp"
  python_param { module: "safe_layers" layer: "NaNGuard"
                 param_str: "{name: guard, follows: poison, action: abort}" } }
layer { name: "fc" type: "InnerProduct" bottom: "xp" top: "y"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""


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


def test_active_watch_iteration_wins_over_the_call_count():
    class Source:
        def iteration(self):
            return 41

    source = Source()
    assert reporting.iteration(0, call=3) == 2
    solver_iteration.activate(source)
    try:
        assert reporting.iteration(0, call=3) == 41
        assert reporting.iteration(1, call=3) is None  # TEST has no iteration
    finally:
        solver_iteration.deactivate(source)
    assert reporting.iteration(0, call=3) == 2


def test_caffe_binary_resume_reports_the_true_iteration(caffe_bin, write_solver, tmp_path,
                                                        monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(TESTS)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    prefix = tmp_path / "snap"
    first = write_solver(POISONED_NET.replace("CALLS", "[]"), max_iter=20, snapshot=20,
                         snapshot_prefix='"%s"' % prefix)
    run = caffe_bin("train", "-solver", first, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    state = tmp_path / "snap_iter_20.solverstate"
    assert caffe_process.solverstate_iteration(str(state)) == 20

    # Resumed at 20, the 18th forward call of this process is iteration 37.
    second = write_solver(POISONED_NET.replace("CALLS", "[18]"), max_iter=40,
                          snapshot_prefix='"%s"' % prefix)
    run = caffe_bin("train", "-solver", second, "-snapshot", state, cwd=tmp_path)
    assert run.returncode != 0
    abort = [line for line in run.stderr.splitlines() if "ABORT NaNGuard guard" in line]
    assert abort, run.stderr[-3000:]
    assert re.search(r"iteration 37 \(call 18\)", abort[0]), abort[0]


def test_solverstate_iteration_of_a_real_hdf5_state(make_solver, tmp_path):
    """Caffe writes an HDF5 state's iter as a one-element dataset (hdf5_save_int)."""
    pytest.importorskip("h5py")
    net = ('layer { name: "data" type: "DummyData" top: "data" top: "label"\n'
           '  dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }\n'
           'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"\n'
           '  inner_product_param { num_output: 2 } }\n'
           'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }\n')
    solver = make_solver(net, snapshot_format="HDF5", snapshot_prefix='"%s"' % (tmp_path / "s"))
    solver.step(3)
    solver.snapshot()
    assert caffe_process.solverstate_iteration(str(tmp_path / "s_iter_3.solverstate.h5")) == 3
