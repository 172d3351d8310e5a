"""`safe-layers train` loses nothing of the user's: outputs that name an input are
refused, an existing file that is not ours is never written into, the event log is
appended to (a resume keeps the first run's history), and the summary and the plot never
depend on where the event log went."""

import json
import os
import threading

from test_train import lenet, safe_layers_train  # noqa: F401 - the fixture and the runner

from safe_layers.core.errors import InputError
from safe_layers.readers import prototxt
from safe_layers.tools.train import run_files
from support.caffe_data import datum, write_lmdb


def test_an_output_naming_the_net_or_a_snapshot_is_refused_and_the_file_untouched(lenet, tmp_path):
    solver = lenet(max_iter=4)
    net = tmp_path / "lenet_train_test.prototxt"
    before = net.read_bytes()
    for flag, path, why in (("--plot", net, "is the net of this run"),
                            ("--events", solver, "is the solver of this run"),
                            ("--plot", tmp_path / "x_iter_4.caffemodel", "named like a Caffe snapshot")):
        run = safe_layers_train("-solver", solver, flag, path, cwd=tmp_path)
        assert run.returncode == 2 and why in run.stderr, run.stderr[-2000:]
        assert "Starting Optimization" not in run.stderr
    assert net.read_bytes() == before


def test_a_file_inside_a_data_source_is_an_input(tmp_path):
    import numpy as np
    db = write_lmdb(tmp_path / "train_lmdb", [(b"0", datum(np.zeros((1, 2, 2), np.uint8), 0))])
    net = tmp_path / "net.prototxt"
    net.write_text('layer { name: "data" type: "Data" top: "data" top: "label"\n'
                   '  data_param { source: "%s" backend: LMDB batch_size: 1 } }\n' % db)
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "%s"\nbase_lr: 0.1\nmax_iter: 1\nlr_policy: "fixed"\n' % net)
    document = prototxt.read_solver(str(solver))
    inputs = run_files.run_inputs(document, prototxt.solver_nets(document))
    data = db / "data.mdb"
    before = data.read_bytes()
    try:
        run_files.check_outputs({str(data): "the event log"}, inputs)
    except InputError as exc:
        assert "inside the data_param.source of layer 'data'" in str(exc)
    else:
        raise AssertionError("an output inside an LMDB was accepted")
    assert data.read_bytes() == before


def test_existing_files_that_are_not_ours_are_refused(lenet, tmp_path):
    solver = lenet(max_iter=4)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    for flag, why in (("--events", "is not a safe-layers event log"), ("--plot", "is not a PNG")):
        run = safe_layers_train("-solver", solver, flag, notes, cwd=tmp_path)
        assert run.returncode == 2 and why in run.stderr, run.stderr[-2000:]
    assert notes.read_text() == "my notes\n"


def test_the_event_log_is_appended_to_and_untouched_by_a_run_that_never_started(lenet, tmp_path):
    solver = lenet(max_iter=4)
    events = tmp_path / "lenet_events.jsonl"
    assert safe_layers_train("-solver", solver, cwd=tmp_path).returncode == 0
    first = events.read_text()
    assert safe_layers_train("-solver", solver, cwd=tmp_path).returncode == 0
    both = events.read_text()
    assert both.startswith(first) and len(both) > len(first)
    records = [json.loads(line) for line in both.splitlines()]
    assert [r["event"] for r in records].count("run") == 2
    # A run Caffe refuses to build (a bottom that does not exist) touches nothing.
    net = tmp_path / "lenet_train_test.prototxt"
    net.write_text(net.read_text().replace('bottom: "pool2"', 'bottom: "pool9"'))
    run = safe_layers_train("-solver", solver, "--no-lint", cwd=tmp_path)
    assert run.returncode == 2 and events.read_text() == both


def test_summary_and_plot_survive_an_event_log_on_a_full_device(lenet, tmp_path):
    plot = tmp_path / "p.png"
    run = safe_layers_train("-solver", lenet(max_iter=10), "--events", "/dev/full", "--plot", plot,
                            "--on-nonfinite", "skip", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "safe-layers train: WATCH summary" in run.stderr
    assert "safe-layers train: plot %s" % plot in run.stderr
    assert plot.read_bytes()[:8] == run_files.PNG_MAGIC


def test_a_fifo_no_one_reads_neither_hangs_nor_stops_the_run(lenet, tmp_path):
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    result = {}

    def train():
        result["run"] = safe_layers_train("-solver", lenet(max_iter=4), "--events", fifo,
                                          cwd=tmp_path, timeout=240)
    thread = threading.Thread(target=train)
    thread.start()
    thread.join(240)
    run = result["run"]
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr.count("a FIFO that no process is reading") == 1


def _signal_during_preflight(solver, number, tmp_path):
    """Send ``number`` while the run is still being checked (before training starts)."""
    import subprocess
    import sys
    import time
    from test_train import env
    temp = tmp_path / "tmp"
    temp.mkdir()
    values = dict(env(), TMPDIR=str(temp))
    child = subprocess.Popen([sys.executable, "-m", "safe_layers.tools.cli", "train", "-solver",
                              str(solver)], cwd=tmp_path, env=values, stderr=subprocess.PIPE, text=True)
    # Inside the checks: once the tool has started a process of its own (lint builds the
    # net in one), its handlers are in. A fixed sleep was either too short (a loaded
    # machine: still importing, Python's KeyboardInterrupt) or too long (training begun).
    children = "/proc/%d/task/%d/children" % (child.pid, child.pid)
    deadline = time.time() + 120
    while child.poll() is None and not open(children).read().split():
        assert time.time() < deadline, "the tool started no process of its own"
        time.sleep(0.01)
    child.send_signal(number)
    err = child.stderr.read()
    return child.wait(timeout=240), err, temp


def test_sigint_before_training_stops_cleanly_as_caffe_would(lenet, tmp_path):
    import signal as signals
    status, err, temp = _signal_during_preflight(lenet(max_iter=2000), signals.SIGINT, tmp_path)
    assert status == 0 and "Traceback" not in err, err[-2000:]
    assert "stopped by SIGINT (-sigint_effect stop) before training started" in err
    assert "Starting Optimization" not in err
    assert list(temp.iterdir()) == []


def test_sighup_before_training_does_not_kill_the_run(lenet, tmp_path):
    import signal as signals
    status, err, temp = _signal_during_preflight(lenet(max_iter=4), signals.SIGHUP, tmp_path)
    assert status == 0 and "Optimization Done." in err, err[-2000:]
    assert list(temp.iterdir()) == []


def test_a_corrupt_or_orphaned_snapshot_is_named_before_training(lenet, tmp_path):
    solver = lenet(max_iter=2, snapshot_after_train="true")
    assert safe_layers_train("-solver", solver, cwd=tmp_path).returncode == 0
    state = tmp_path / "lenet_iter_2.solverstate"
    model = tmp_path / "lenet_iter_2.caffemodel"
    good = state.read_bytes()
    longer = lenet(max_iter=4)
    cut = tmp_path / "cut.solverstate"
    cut.write_bytes(good[:len(good) - 7])
    run = safe_layers_train("-solver", longer, "-snapshot", cut, cwd=tmp_path)
    assert run.returncode == 2 and "-snapshot %s: not a Caffe solverstate" % cut in run.stderr, \
        run.stderr[-2000:]
    model.rename(tmp_path / "moved.caffemodel")
    run = safe_layers_train("-solver", longer, "-snapshot", state, cwd=tmp_path)
    assert run.returncode == 2 and "the weights it names, %s, do not exist" % model in run.stderr
    assert "Starting Optimization" not in run.stderr


def test_weights_that_copy_no_layer_are_warned_of(lenet, tmp_path):
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    run = safe_layers_train("-solver", lenet(max_iter=2), "-weights", empty, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert ("safe-layers train: warning: -weights %s is empty: it copies no layer" % empty) in run.stderr


def test_a_full_disk_skips_a_snapshot_and_never_kills_the_run(lenet, tmp_path):
    """Caffe's snapshot aborts the process when its write fails: on a 6 MiB tmpfs the
    first LeNet snapshot (about 3.4 MiB with its momentum) fits, the next would not, and
    is skipped with one warning naming the file; training ends normally."""
    import pytest
    import subprocess
    import sys
    from test_train import env
    from support.mounts import private_mount_command as _private_mount_command
    command = _private_mount_command()
    if command is None:
        pytest.skip("no mount namespace here to mount a small tmpfs in")
    disk = tmp_path / "disk"
    disk.mkdir()
    solver = lenet(max_iter=4, snapshot=2, snapshot_prefix='"%s"' % (disk / "lenet"))
    shell = 'mount -t tmpfs -o size=6m tmpfs "$1" && shift && exec "$@"'
    run = subprocess.run(command + ["sh", "-c", shell, "sh", str(disk), sys.executable, "-m",
                                    "safe_layers.tools.cli", "train", "-solver", str(solver),
                                    "--events", str(tmp_path / "e.jsonl"), "--plot",
                                    str(tmp_path / "p.png")],
                         capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    skipped = [l for l in run.stderr.splitlines() if "snapshot of iteration" in l]
    assert len(skipped) == 1 and skipped[0].startswith("W")
    assert "%s_iter_4.solverstate would not fit (ENOSPC" % (disk / "lenet") in skipped[0]
    assert "Optimization Done." in run.stderr


def test_a_state_cut_at_a_field_boundary_is_named(lenet, tmp_path):
    """A solverstate cut where protobuf still parses (its last fields lost: current_step,
    which Caffe writes last) would be restored as it is by Caffe: refused, saying why."""
    solver = lenet(max_iter=2, snapshot_after_train="true")
    assert safe_layers_train("-solver", solver, cwd=tmp_path).returncode == 0
    from safe_layers.readers import prototxt
    state = prototxt.caffe_pb2().SolverState()
    state.ParseFromString((tmp_path / "lenet_iter_2.solverstate").read_bytes())
    state.ClearField("current_step")
    cut = tmp_path / "cut.solverstate"
    cut.write_bytes(state.SerializeToString())
    run = safe_layers_train("-solver", lenet(max_iter=4), "-snapshot", cut, cwd=tmp_path)
    assert run.returncode == 2 and "it is cut short (no current_step" in run.stderr, run.stderr[-2000:]


def test_a_resumed_run_is_drawn_with_the_run_it_resumed(lenet, tmp_path):
    """-snapshot: the event log keeps the first run's records, and the plot is drawn
    from all of them (the whole history), not from the resumed run's alone."""
    from matplotlib import image
    from safe_layers.tools.train.command import write_plot
    assert safe_layers_train("-solver", lenet(max_iter=20, snapshot_after_train="true"),
                             cwd=tmp_path).returncode == 0
    events = tmp_path / "lenet_events.jsonl"
    first = events.read_text()
    run = safe_layers_train("-solver", lenet(max_iter=40), "-snapshot",
                            tmp_path / "lenet_iter_20.solverstate", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    both = events.read_text()
    assert both.startswith(first)
    records = [json.loads(line) for line in both.splitlines()]
    assert [r["iteration"] for r in records if r["event"] == "iteration"] == list(range(40))
    second = [json.loads(line) for line in both[len(first):].splitlines()]
    drawn = image.imread(str(tmp_path / "lenet_train.png"))
    assert (drawn == image.imread(write_plot(records, str(tmp_path / "all.png")))).all()
    assert drawn.shape != image.imread(write_plot(second, str(tmp_path / "second.png"))).shape or \
        (drawn != image.imread(str(tmp_path / "second.png"))).any()
