"""The tool's temporary folders: a folder whose process was killed (kill -9 gives no
chance to clean up) is removed by the next run; a live process's never is."""

import os
import subprocess
import sys

from safe_layers.core import scratch
from support.nets import classifier_net


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_folders_of_dead_processes_are_swept_and_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    dead = tmp_path / ("safe-layers-train-%d-abc123" % _dead_pid())
    (dead / "inner").mkdir(parents=True)
    live = tmp_path / ("safe-layers-train-%d-xyz789" % os.getpid())
    live.mkdir()
    not_ours = tmp_path / "safe-layers-notes"
    not_ours.mkdir()
    a_file = tmp_path / ("safe-layers-train-%d-file00" % _dead_pid())
    a_file.write_text("a file, not a folder of ours")
    with scratch.folder("shapes") as path:
        assert os.path.isdir(path) and os.path.basename(path).startswith(
            "safe-layers-shapes-%d-" % os.getpid())
    assert not dead.exists() and live.is_dir() and not_ours.is_dir() and a_file.is_file()
    assert not os.path.exists(path)


def test_a_killed_train_leaves_nothing_the_next_run_keeps(tmp_path):
    """kill -9 of `safe-layers train` while its child trains: its folder is swept by the
    next command that makes one."""
    import signal
    import time
    import threading
    # Our INFO lines (the "Starting Optimization" waited for) print at GLOG_minloglevel 0.
    env = dict(os.environ, TMPDIR=str(tmp_path), GLOG_minloglevel="0")
    solver = tmp_path / "solver.prototxt"
    net = tmp_path / "net.prototxt"
    net.write_text(classifier_net())
    solver.write_text('net: "%s"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 100000000\n'
                      'display: 0\nsnapshot_prefix: "%s"\n' % (net, tmp_path / "snap"))
    run = subprocess.Popen([sys.executable, "-m", "safe_layers.tools.cli", "train", "-solver",
                            str(solver), "--no-lint", "--progress", "never"], env=env, cwd=tmp_path,
                           stderr=subprocess.PIPE, text=True)
    guard = threading.Timer(120, run.kill)  # a line that never comes fails, never hangs
    guard.start()
    for line in run.stderr:
        if "Starting Optimization" in line:
            break
    guard.cancel()
    assert run.poll() is None, "the run ended before training started"
    folders = [p for p in tmp_path.iterdir() if p.name.startswith("safe-layers-train-%d-" % run.pid)]
    assert len(folders) == 1
    run.send_signal(signal.SIGKILL)
    run.wait()
    # The training process dies with its parent (PR_SET_PDEATHSIG), and its folder stays.
    deadline = time.time() + 30
    while subprocess.run(["pgrep", "-f", str(folders[0])], capture_output=True).returncode == 0:
        assert time.time() < deadline, "the training process outlived its killed parent"
        time.sleep(0.2)
    assert folders[0].exists()
    subprocess.run([sys.executable, "-c", "from safe_layers.core import scratch; scratch.make('x')"],
                   env=env, check=True)
    assert not folders[0].exists()
