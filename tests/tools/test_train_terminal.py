"""`safe-layers train` on a terminal (a real pseudo-terminal): no line printed into the
progress bar's line, a status line while it starts, -q and GLOG_minloglevel for our
lines, Ctrl-C (SIGINT to the terminal's process group) at every phase ending in one line
with the summary and plot of what ran; options that would do nothing refused."""

import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
from test_train import diverging, env, lenet, safe_layers_train  # noqa: F401 - fixtures, runner


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# A glog line (Caffe's, or ours: tagged "safe_layers]" or with Caffe's file:line).
GLOG = re.compile(r"[IWEF]\d{8} \d\d:\d\d:\d\d\.\d{6} +\d+ \S+\] ")
BAR = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")  # tqdm's bar: "42%|####  | 42/100 ["


def on_terminal(args, cwd, watch=None, environ=None, timeout=240):
    """Run `safe-layers train ARGS` with a pseudo-terminal (100 columns) as its stdin,
    stdout and stderr, in a session of its own, as a shell runs a foreground job.
    ``watch(output_so_far, process)`` is called as output comes (and every 50 ms): it
    may send signals. Returns (exit status, the bytes the terminal got, decoded)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "safe_layers.tools.cli", "train",
                                *map(str, args)], stdin=slave, stdout=slave, stderr=slave,
                               cwd=cwd, env=environ or env(), start_new_session=True)
    os.close(slave)
    out, deadline = b"", time.time() + timeout
    try:
        while True:
            assert time.time() < deadline, out[-3000:]
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every process holding the terminal has exited
                    chunk = b""
                if not chunk:
                    break
                out += chunk
            if watch is not None:
                watch(out.decode("utf-8", "replace"), process)
        return process.wait(timeout=60), out.decode("utf-8", "replace")
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()


def interrupt(process):
    """A Ctrl-C: SIGINT to the terminal's foreground process group."""
    try:
        os.killpg(process.pid, signal.SIGINT)
    except ProcessLookupError:
        pass


def screen(raw):
    """The lines a terminal shows for ``raw``: a carriage return moves back to the first
    column and what follows overwrites what was there."""
    lines = []
    for physical in ANSI.sub("", raw.replace("\r\n", "\n")).split("\n"):
        shown, column = [], 0
        for ch in physical:
            if ch == "\r":
                column = 0
                continue
            shown[column:column + 1] = [ch]
            column += 1
        lines.append("".join(shown).rstrip())  # trailing blanks show as nothing
    return lines


def assert_no_line_in_the_bar(raw):
    for line in screen(raw):
        found = re.search(r"[IWEF]\d{8} \d\d:\d\d:\d\d", line)
        if found:
            assert GLOG.match(line) and not BAR.search(line), repr(line)


def test_no_line_shares_the_bars_line_and_a_status_line_while_it_starts(lenet, tmp_path):
    # Caffe's own glog lines (its C++ "Snapshotting to ...") during training, and ours.
    solver = lenet(max_iter=60, display=10, test_interval=30, snapshot=20)
    status, raw = on_terminal(["-solver", solver], tmp_path)
    assert status == 0, raw[-3000:]
    assert_no_line_in_the_bar(raw)
    assert BAR.search(raw) and "60/60" in raw
    shown = screen(raw)
    assert sum("sgd_solver.cpp:" in line and "Snapshotting solver state" in line
               for line in shown) == 3
    assert "safe-layers train: linting " in raw and "safe-layers train: building the net" in raw
    assert shown[-3].startswith("safe-layers train: WATCH summary:")
    # Not on a pipe: no status line, no bar.
    piped = safe_layers_train("-solver", solver, "--events", tmp_path / "e2.jsonl", "--plot",
                              tmp_path / "p2.png", cwd=tmp_path)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert "linting" not in piped.stderr and "\r" not in piped.stderr


def _run_levels(solver, tmp_path, *flags, **environ):
    values = env()
    values.pop("GLOG_minloglevel")
    values.update(environ)
    run = subprocess.run([sys.executable, "-m", "safe_layers.tools.cli", "train", "-solver",
                          str(solver), "--warn-growth", "10", *flags], cwd=tmp_path, env=values,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-3000:]
    lines = run.stderr.splitlines()
    ours_info = [l for l in lines if "solver.cpp:239] Iteration" in l]  # our INFO
    caffes_info = [l for l in lines if re.match(r"I\d+ .* net\.cpp:\d+\]", l)]  # Caffe's
    warning = [l for l in lines if "WATCH growth" in l]
    assert lines[-1].startswith("E") and "action=stop" in lines[-1]  # the fault: ERROR
    assert any(l.startswith("safe-layers train: WATCH summary:") for l in lines)
    return bool(ours_info), bool(caffes_info), bool(warning)


def test_glog_minloglevel_and_quiet_for_our_lines(diverging, tmp_path):
    # (ours INFO, Caffe's INFO, our WARNING)
    assert _run_levels(diverging, tmp_path) == (True, True, True)
    assert _run_levels(diverging, tmp_path, GLOG_minloglevel="1") == (False, False, True)
    assert _run_levels(diverging, tmp_path, GLOG_minloglevel="2") == (False, False, False)
    assert _run_levels(diverging, tmp_path, "-q") == (False, False, False)
    # -q is for our lines; Caffe's follow the user's own GLOG_minloglevel.
    assert _run_levels(diverging, tmp_path, "-q", GLOG_minloglevel="0") == (False, True, False)


def test_options_that_would_do_nothing_exit_2_naming_the_fix(lenet, tmp_path):
    solver = lenet(max_iter=10)
    for flags, fix in ((["--rollback-after", "3"], "--on-nonfinite skip"),
                       (["--lr-factor", "0.1", "--on-nonfinite", "skip"], "without rollback_after"),
                       (["--max-skips", "4"], "without on_nonfinite: skip")):
        run = safe_layers_train("-solver", solver, *flags, cwd=tmp_path)
        assert run.returncode == 2 and fix in run.stderr, run.stderr[-2000:]
        assert "Traceback" not in run.stderr and "Starting Optimization" not in run.stderr
    assert not (tmp_path / "lenet_events.jsonl").exists()


# -- Ctrl-C ------------------------------------------------------------------------------

def _ended_like_caffe(status, raw):
    assert status == 0, raw[-3000:]
    assert "Traceback" not in raw and "KeyboardInterrupt" not in raw, raw[-4000:]


def _what_ran_is_kept(raw, tmp_path):
    shown = [l for l in screen(raw) if l.strip()]
    assert shown[-2].startswith("safe-layers train: WATCH summary:"), shown[-6:]
    assert shown[-1].startswith("safe-layers train: events ") and "plot " in shown[-1]
    assert (tmp_path / "lenet_train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = [json.loads(l) for l in (tmp_path / "lenet_events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "summary"
    return events


SLOW_LAYER = '''
import os, time
import caffe

class SlowSetup(caffe.Layer):
    """Its setup takes a minute: what a slow net build looks like."""

    def setup(self, bottom, top):
        open(os.path.join(os.path.dirname(__file__), "setup_%d" % os.getpid()), "w").close()
        time.sleep(60)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        pass
'''


def test_ctrl_c_while_lint_builds_the_net(tmp_path):
    # lint builds the net (its Python layers too) in a Caffe process of its own.
    (tmp_path / "slow_setup.py").write_text(SLOW_LAYER)
    net = tmp_path / "net.prototxt"
    net.write_text('layer { name: "data" type: "DummyData" top: "x"\n'
                   '  dummy_data_param { shape { dim: 2 dim: 3 } } }\n'
                   'layer { name: "slow" type: "Python" bottom: "x" top: "x2"\n'
                   '  python_param { module: "slow_setup" layer: "SlowSetup" } }\n'
                   'layer { name: "fc" type: "InnerProduct" bottom: "x2" top: "y"\n'
                   '  inner_product_param { num_output: 1 } }\n'
                   'layer { name: "loss" type: "Reduction" bottom: "y" top: "loss" '
                   'loss_weight: 1 }\n')
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "%s"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 10\n'
                      'solver_mode: CPU\nsnapshot_prefix: "%s"\n' % (net, tmp_path / "slow"))
    seen = {}

    def watch(out, process):
        if "sent" not in seen and list(tmp_path.glob("setup_*")):
            seen["sent"] = out
            interrupt(process)

    started = time.time()
    status, raw = on_terminal(["-solver", solver], tmp_path, watch)
    assert "linting" in seen["sent"] and "building the net" not in seen["sent"]
    assert time.time() - started < 40  # the Ctrl-C ended it, not the minute of setup
    _ended_like_caffe(status, raw)
    shown = [l for l in screen(raw) if l.strip()]
    assert shown == ["safe-layers train: stopped by SIGINT (-sigint_effect stop) before training "
                     "started"], shown


def with_sitecustomize(code, tmp_path):
    """The tool's environment with ``code`` as a sitecustomize on its PYTHONPATH: run by
    every Python it starts, before that Python's own code."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(code)
    environ = env()
    environ["PYTHONPATH"] = os.pathsep.join([str(site), environ["PYTHONPATH"]])
    return environ


# Run by the training process's Python at its start (a sitecustomize on its PYTHONPATH):
# it says so and takes two seconds, before any of its own code runs.
SLOW_START = '''
import os, time
with open("/proc/self/cmdline", "rb") as f:
    command = f.read().split(b"\\0")
if b"safe_layers.tools.train.child" in command:
    open(os.path.join(%r, "child_started"), "w").close()
    time.sleep(2)
'''


@pytest.mark.parametrize("phase", ["starting the training process", "building the net",
                                   "training"])
def test_ctrl_c_while_the_net_is_built_or_trains(lenet, tmp_path, phase):
    solver = lenet(max_iter=100000, display=10, test_interval=100000)
    environ = with_sitecustomize(SLOW_START % str(tmp_path), tmp_path)
    seen = {}

    def watch(out, process):
        if phase == "starting the training process":
            due = (tmp_path / "child_started").exists()
        else:
            due = ("safe-layers train: building the net" if phase == "building the net" else
                   "sgd_solver.cpp:112] Iteration 20,") in out
        if "sent" not in seen and due:
            seen["sent"] = True
            interrupt(process)

    status, raw = on_terminal(["-solver", solver], tmp_path, watch, environ)
    _ended_like_caffe(status, raw)
    assert_no_line_in_the_bar(raw)
    assert raw.count("Optimization stopped early.") == 1
    events = _what_ran_is_kept(raw, tmp_path)
    done = [e["iteration"] for e in events if e["event"] == "iteration"]
    assert len(done) < 1000 and (phase != "training" or len(done) > 20)


def test_ctrl_c_while_the_plot_is_written(lenet, tmp_path):
    """SIGINT again and again from the training's last line to the end: the plot and the
    summary are written all the same."""
    solver = lenet(max_iter=20, display=10)
    sent = []

    def watch(out, process):
        # Until the summary, printed once the plot is written.
        if ("caffe.cpp:250] Optimization Done." in out and "WATCH summary" not in out
                and process.poll() is None):
            if not sent or time.time() - sent[-1] > 0.05:
                sent.append(time.time())
                interrupt(process)

    status, raw = on_terminal(["-solver", solver], tmp_path, watch)
    assert len(sent) >= 3  # the signals kept coming while the run ended
    _ended_like_caffe(status, raw)
    _what_ran_is_kept(raw, tmp_path)


# The state the race above can leave: a SIGINT sent to the terminal's process group
# reaches the training process after fork, before it is in a group of its own and before
# its handlers, where SIGINT's action is the default (kill). Made certain here: the
# training process's Python, at its start, puts back the default action and sends
# itself a SIGINT.
SIGINT_BEFORE_HANDLERS = '''
import os, signal
with open("/proc/self/cmdline", "rb") as f:
    command = f.read().split(b"\\0")
if b"safe_layers.tools.train.child" in command:
    with open("/proc/self/status") as f:
        blocked = int(next(l for l in f if l.startswith("SigBlk:")).split()[1], 16)
    with open(os.path.join(%r, "sigblk"), "w") as f:
        f.write(str(blocked))
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
'''


def test_a_ctrl_c_before_the_training_process_has_its_handlers_stops_it_as_caffe_would(
        lenet, tmp_path):
    solver = lenet(max_iter=100000, display=10, test_interval=100000)
    environ = with_sitecustomize(SIGINT_BEFORE_HANDLERS % str(tmp_path), tmp_path)
    run = subprocess.run([sys.executable, "-m", "safe_layers.tools.cli", "train", "-solver",
                          str(solver)], cwd=tmp_path, env=environ, capture_output=True,
                         text=True, timeout=300)
    blocked = int((tmp_path / "sigblk").read_text())
    assert blocked & (1 << (signal.SIGINT - 1)) and blocked & (1 << (signal.SIGHUP - 1))
    # Not killed: stopped after its first iteration, the weights snapshotted, as
    # `caffe train -sigint_effect stop` does.
    assert run.returncode == 0, run.stderr[-3000:]
    assert "killed by signal" not in run.stderr and "Traceback" not in run.stderr
    assert run.stderr.count("Optimization stopped early.") == 1, run.stderr[-3000:]
    events = [json.loads(l) for l in (tmp_path / "lenet_events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "summary"
    assert len([e for e in events if e["event"] == "iteration"]) <= 1
    assert list(tmp_path.glob("*.caffemodel")), sorted(p.name for p in tmp_path.iterdir())
