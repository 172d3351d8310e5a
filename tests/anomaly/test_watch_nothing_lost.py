"""The watch's checkpoints lose nothing (issue "Nothing lost"): one watch per
snapshot_prefix, only verified states restored, a full disk survived, a resume protected,
a killed watch's files cleaned up, and two watches of one process told apart. Real
caffe.SGDSolvers on small nets."""

import io
import json
import os
import subprocess
import sys

import pytest

from support.mounts import private_mount_command as _private_mount_command

import safe_layers
from safe_layers import reporting
from safe_layers.anomaly import NonFiniteError, checkpoint_files, parse_line, watch
from support.paths import TESTS
from support.weights import bit_equal, weights

# The folder holding the safe_layers under test (this checkout's, or an installed one).
PACKAGE_HOME = os.path.dirname(os.path.dirname(os.path.abspath(safe_layers.__file__)))

# Regression on random batches; "poison" writes a NaN into sample 1 at the forward calls
# CALLS (call k is iteration k - 1 of a fresh solver with no extra forward).
SMALL_NET = """
name: "NAME"
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 4 dim: WIDTH } shape { dim: 4 dim: 1 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "poison" type: "Python" bottom: "x" top: "xp"
  python_param { module: "support.poison" layer: "PoisonAtCall" param_str: "{calls: CALLS, sample: 1}" } }
layer { name: "fc" type: "InnerProduct" bottom: "xp" top: "h"
  inner_product_param { num_output: HIDDEN weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "fc2" type: "InnerProduct" bottom: "h" top: "y"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""

# Rollback on the second bad iteration in a row; any state good enough to return to.
ROLLBACK = dict(on_nonfinite="skip", rollback_after=2, checkpoint_loss_ratio=1e9, log_first=0)


def small_net(calls=(), name="small", width=3, hidden=4):
    return (SMALL_NET.replace("NAME", name).replace("CALLS", json.dumps(list(calls)))
            .replace("WIDTH", str(width)).replace("HIDDEN", str(hidden)))


def prefix_field(prefix):
    return '"%s"' % prefix


def rollbacks_seen(w):
    """[(to, weights at that moment)] of each rollback of ``w`` from now on."""
    seen = []
    w.listener = lambda item: item.kind == "rollback" and seen.append(
        (item.details["to"], weights(w.solver.net)))
    return seen


def warnings_in(stream):
    return [line for line in stream.getvalue().splitlines()
            if line.startswith("W") and "WATCH checkpoint" in line]


def child_env():
    env = dict(os.environ, GLOG_minloglevel="2")
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_HOME, str(TESTS)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


# ---------------------------------------------------------------------------------------
# a. Two runs on one snapshot_prefix.

def test_a_second_watch_of_a_prefix_is_refused_until_the_first_closes(caffe, write_solver, tmp_path):
    path = write_solver(small_net(), snapshot_prefix=prefix_field(tmp_path / "ck"))
    first = watch(str(path), **ROLLBACK)
    lock = tmp_path / "ck.safe_layers.lock"
    assert lock.read_text() == "%d\n" % os.getpid()
    with pytest.raises(ValueError, match=r"snapshot_prefix '%s' \(lock %s\) is in use by process %d "
                       r"\(this one: close\(\) its earlier watch first\): give this run its own "
                       r"snapshot_prefix" % (tmp_path / "ck", lock, os.getpid())):
        watch(str(path), **ROLLBACK)
    # A watch without rollback takes no checkpoint and needs no prefix.
    watch(str(path), on_nonfinite="skip").close()
    first.close()
    assert not lock.exists()
    second = watch(str(path), **ROLLBACK)
    second.close()


def test_the_lock_never_follows_a_link_nor_overwrites_a_file_not_ours(caffe, write_solver, tmp_path):
    path = write_solver(small_net(), snapshot_prefix=prefix_field(tmp_path / "ck"))
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    lock = tmp_path / "ck.safe_layers.lock"
    lock.symlink_to(target)
    with pytest.raises(ValueError, match="is a symbolic link"):
        watch(str(path), **ROLLBACK)
    lock.unlink()
    lock.write_text("somebody's notes\n")
    with pytest.raises(ValueError, match="holds something else than a process id"):
        watch(str(path), **ROLLBACK)
    assert target.read_text() == "keep me" and lock.read_text() == "somebody's notes\n"


def test_rollback_skips_a_checkpoint_another_run_rewrote(caffe, write_solver, tmp_path):
    """Run B (no watch, another base_lr) snapshots its iteration 5 over run A's checkpoint 5
    under the shared prefix. A's rollback must not restore B's weights: it says so and
    goes back to checkpoint 0, bit-exact; when A reaches 5 again it does not adopt B's
    file either."""
    prefix = tmp_path / "ck"
    path = write_solver(small_net(calls=[8, 9]), snapshot_prefix=prefix_field(prefix))
    stream = io.StringIO()
    w = watch(str(path), checkpoint_every=5, stream=stream, **ROLLBACK)
    restored = rollbacks_seen(w)
    at_zero = weights(w.solver.net)
    w.solver.step(6)
    assert [e.iteration for e in w.events if e.kind == "checkpoint"] == [0, 5]
    other = caffe.get_solver(str(write_solver(small_net(), base_lr=0.05,
                                              snapshot_prefix=prefix_field(prefix))))
    other.step(5)
    other.snapshot()  # writes ck_iter_5.caffemodel and .solverstate over A's
    w.solver.step(5)  # iterations 7 and 8 bad: rollback
    assert [to for to, _ in restored] == [0]
    assert bit_equal(restored[0][1], at_zero)
    warned = warnings_in(stream)
    assert any("not restored: %s_iter_5.caffemodel was changed since this run took it as a "
               "checkpoint; one checkpoint further back" % prefix in line for line in warned)
    assert any("not taken: %s_iter_5.solverstate: written during this run, not by this watch, and "
               "it holds weights of layer fc other than the solver's" % prefix in line
               for line in warned)
    assert w.solver.iter == 11 and (prefix.parent / "ck_iter_5.caffemodel").exists()
    w.close()
    assert (prefix.parent / "ck_iter_5.caffemodel").exists()  # B's file: never deleted


def test_rollback_skips_a_checkpoint_whose_files_are_gone(caffe, write_solver, tmp_path):
    """(Without the check Caffe's restore CHECK-fails on the missing file: the process dies.)"""
    prefix = tmp_path / "ck"
    path = write_solver(small_net(calls=[8, 9, 10, 11]), snapshot_prefix=prefix_field(prefix))
    stream = io.StringIO()
    w = watch(str(path), checkpoint_every=5, stream=stream, **ROLLBACK)
    restored = rollbacks_seen(w)
    at_zero = weights(w.solver.net)
    w.solver.step(6)
    os.remove("%s_iter_5.caffemodel" % prefix)
    w.step(5, until_rollback=True)  # 7 bad twice: back to 0, one further than the vanished 5
    assert [to for to, _ in restored] == [0] and bit_equal(restored[0][1], at_zero)
    assert any("not restored: %s_iter_5.caffemodel is gone" % prefix in line
               for line in warnings_in(stream))
    os.remove("%s_iter_0.solverstate" % prefix)
    with pytest.raises(NonFiniteError, match="no checkpoint to roll back to: the files of those "
                       "kept were changed or removed since they were taken"):
        w.solver.step(5)  # iteration 0 bad twice (calls 10, 11): 0's state is gone too
    w.close()


# ---------------------------------------------------------------------------------------
# b. A full disk during a checkpoint.

def test_no_checkpoint_where_the_disk_has_no_room_for_it(caffe, write_solver, tmp_path, monkeypatch):
    """Caffe aborts the process on a snapshot write that fails (measured below on a real
    full tmpfs): the watch takes no checkpoint that would not fit, says so once with the
    errno, and training goes on."""
    prefix = tmp_path / "ck"
    path = write_solver(small_net(), snapshot_prefix=prefix_field(prefix))
    monkeypatch.setattr(checkpoint_files, "free_bytes", lambda folder: 1000)
    stream = io.StringIO()
    w = watch(str(path), checkpoint_every=2, stream=stream, **ROLLBACK)
    w.solver.step(7)
    assert w.solver.iter == 7 and w.checkpoints.kept == [] and w.checkpoints.count == 0
    [line] = warnings_in(stream)
    assert ("WATCH checkpoint iteration 0: not taken: %s_iter_0.solverstate: %s has 1000 bytes free "
            "and a checkpoint takes about" % (prefix, tmp_path)) in line
    assert line.endswith("(ENOSPC); training goes on without this rollback point")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ck")) == \
        ["ck.safe_layers.lock"]
    w.close()


def test_a_snapshot_that_comes_out_cut_short_is_no_checkpoint(caffe, write_solver, tmp_path):
    """A snapshot whose state file is cut short (what a failed buffered write leaves) is
    removed and said once; the rollback goes to the last whole checkpoint."""
    prefix = tmp_path / "ck"
    path = write_solver(small_net(calls=[8, 9]), snapshot_prefix=prefix_field(prefix))
    stream = io.StringIO()
    w = watch(str(path), checkpoint_every=5, stream=stream, **ROLLBACK)
    snapshot = w.solver.snapshot

    def cut_short():
        snapshot()
        if w.solver.iter == 5:
            state = "%s_iter_5.solverstate" % prefix
            os.truncate(state, os.path.getsize(state) // 2)

    w.solver.snapshot = cut_short
    restored = rollbacks_seen(w)
    at_zero = weights(w.solver.net)
    w.solver.step(6)
    assert not os.path.exists("%s_iter_5.solverstate" % prefix)
    assert not os.path.exists("%s_iter_5.caffemodel" % prefix)
    assert [c.iteration for c in w.checkpoints.kept] == [0]
    [line] = warnings_in(stream)
    assert ("not taken: %s_iter_5.solverstate: %s_iter_5.solverstate is cut short" % (prefix, prefix)
            in line and "its files removed; training goes on without this rollback point" in line)
    w.solver.step(4)
    assert [to for to, _ in restored] == [0] and bit_equal(restored[0][1], at_zero)
    w.close()


FULL_DISK_CHILD = """
import io, json, os, sys
from safe_layers.anomaly import watch
stream = io.StringIO()
w = watch(sys.argv[1], on_nonfinite="skip", rollback_after=2, checkpoint_every=2,
          checkpoint_loss_ratio=1e9, log_first=0, stream=stream)
w.solver.step(12)
folder = sys.argv[2]
before = sorted(os.listdir(folder))
w.close()
print(json.dumps({"iter": int(w.solver.iter), "rollbacks": w.rollbacks, "lines": stream.getvalue(),
                  "before_close": before, "after_close": sorted(os.listdir(folder))}))
"""


def test_a_real_full_disk_does_not_kill_the_run(caffe, write_solver, tmp_path):
    """On a 700 KiB tmpfs the first checkpoint (about 245 KiB) fits, later ones would not:
    the watch skips them (one warning line), rolls back to the one it has, and the run
    ends normally with no half-written file. Without the check the third snapshot's write
    fails and Caffe aborts the process."""
    command = _private_mount_command()
    if command is None:
        pytest.skip("no mount namespace here to mount a small tmpfs in")
    disk = tmp_path / "disk"
    disk.mkdir()
    path = write_solver(small_net(calls=[8, 9], width=100, hidden=300),
                        snapshot_prefix=prefix_field(disk / "ck"), momentum=0.9)
    script = tmp_path / "child.py"
    script.write_text(FULL_DISK_CHILD)
    shell = 'mount -t tmpfs -o size=700k tmpfs "$1" && exec "$2" "$3" "$4" "$1"'
    run = subprocess.run(command + ["sh", "-c", shell, "sh", str(disk), sys.executable, str(script),
                                    str(path)], capture_output=True, text=True, env=child_env(),
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["iter"] == 12 and result["rollbacks"] == 1
    warned = [line for line in result["lines"].splitlines()
              if line.startswith("W") and "not taken" in line]
    assert len(warned) == 1 and "(ENOSPC); training goes on without this rollback point" in warned[0]
    assert "%s/ck_iter_2.solverstate: %s has" % (disk, disk) in warned[0]
    assert result["before_close"] == ["ck.safe_layers.checkpoints", "ck.safe_layers.lock",
                                      "ck_iter_0.caffemodel", "ck_iter_0.solverstate"]
    assert result["after_close"] == []


# ---------------------------------------------------------------------------------------
# c. A run resumed from a snapshot.

@pytest.mark.parametrize("how", ["guessed", "given", "guessed-hdf5"])
def test_the_state_a_run_resumed_from_is_its_first_checkpoint(caffe, write_solver, tmp_path, how):
    """Resumed at 20, the run's first rollback point is the state it resumed from (bit-
    exact, never deleted): a divergence at 23 rolls back to it instead of stopping with
    "no checkpoint yet". Given as resumed_from, the state may lie under another prefix."""
    first_prefix = tmp_path / ("earlier" if how == "given" else "ck")
    fields = {"snapshot_format": "HDF5"} if how.endswith("hdf5") else {}
    h5 = ".h5" if fields else ""
    first = caffe.get_solver(str(write_solver(small_net(), snapshot_prefix=prefix_field(first_prefix),
                                              **fields)))
    first.step(20)
    first.snapshot()
    state = "%s_iter_20.solverstate%s" % (first_prefix, h5)
    path = write_solver(small_net(calls=[4, 5]), snapshot_prefix=prefix_field(tmp_path / "ck"),
                        **fields)
    solver = caffe.get_solver(str(path))
    solver.restore(state)
    at_20 = weights(solver.net)
    w = watch(solver, solver_file=path, checkpoint_every=100,
              resumed_from=state if how == "given" else None, **ROLLBACK)
    restored = rollbacks_seen(w)
    solver.step(1)
    first_loss = w.loss
    solver.step(9)
    assert [to for to, _ in restored] == [20] and bit_equal(restored[0][1], at_20)
    assert solver.iter == 30
    assert w.checks.losses.start == first_loss  # the gate's reference: the resumed run's
    w.close()
    assert os.path.exists(state) and os.path.exists("%s_iter_20.caffemodel%s" % (first_prefix, h5))


def test_a_snapshot_of_the_same_name_from_another_run_is_no_resume_point(caffe, write_solver,
                                                                          tmp_path):
    prefix = tmp_path / "ck"
    other = caffe.get_solver(str(write_solver(small_net(), base_lr=0.05,
                                              snapshot_prefix=prefix_field(prefix))))
    other.step(20)
    other.snapshot()
    solver = caffe.get_solver(str(write_solver(small_net(), snapshot_prefix=prefix_field(prefix))))
    solver.step(20)  # at 20 too, never restored from that file
    stream = io.StringIO()
    w = watch(solver, solver_file=str(write_solver(small_net(), snapshot_prefix=prefix_field(prefix))),
              stream=stream, checkpoint_every=100, **ROLLBACK)
    assert w.checkpoints.kept == []
    [line] = warnings_in(stream)
    assert ("not a rollback point: %s_iter_20.solverstate holds weights of layer fc other than the "
            "solver's; the first checkpoint is taken at iteration 100" % prefix) in line
    w.close()


# ---------------------------------------------------------------------------------------
# d. A watch killed with -9.

HOLDER_CHILD = """
import sys
from safe_layers.anomaly import watch
w = watch(sys.argv[1], on_nonfinite="skip", rollback_after=2, checkpoint_every=2,
          checkpoint_loss_ratio=1e9, log_first=0)
w.solver.step(7)
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_watch_killed_with_9_leaves_no_lock_and_its_files_are_removed(caffe, write_solver,
                                                                       tmp_path):
    """A watch killed with -9 holds the prefix while it lives (the refusal names its
    pid); dead, it leaves its checkpoints 2, 4 and 6 but no lock. The next watch of the
    prefix removes exactly those and says so in one line; the user's own snapshot of
    iteration 3 under the same prefix stays."""
    prefix = tmp_path / "ck"
    path = write_solver(small_net(), snapshot_prefix=prefix_field(prefix))
    users = caffe.get_solver(str(path))
    users.step(3)
    users.snapshot()
    child = subprocess.Popen([sys.executable, "-c", HOLDER_CHILD, str(path)], env=child_env(),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        with pytest.raises(ValueError, match=r"is in use by process %d: give this run its own "
                           r"snapshot_prefix" % child.pid):
            watch(str(path), **ROLLBACK)
    finally:
        child.kill()
        child.wait()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ck_iter_"))
    theirs = ["ck_iter_%d.%s" % (i, ext) for i in (2, 4, 6) for ext in ("caffemodel", "solverstate")]
    assert left == sorted(theirs + ["ck_iter_3.caffemodel", "ck_iter_3.solverstate"])
    stream = io.StringIO()
    w = watch(str(path), stream=stream, **ROLLBACK)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ck_iter_"))
    assert left == ["ck_iter_3.caffemodel", "ck_iter_3.solverstate"]
    [line] = warnings_in(stream)
    assert ("removed 6 checkpoint files that the watch of process %d left under this "
            "snapshot_prefix when it ended without closing (killed?): " % child.pid) in line
    assert line.endswith(", ".join(str(tmp_path / name) for name in sorted(theirs)))
    w.close()
    assert not (tmp_path / "ck.safe_layers.checkpoints").exists()


KILLED_IN_SNAPSHOT_CHILD = """
import os, signal, sys
from safe_layers.anomaly import watch
w = watch(sys.argv[1], on_nonfinite="skip", rollback_after=2, checkpoint_every=2,
          checkpoint_loss_ratio=1e9, log_first=0)
snapshot = w.solver.snapshot

def dies_inside():
    snapshot()
    if w.solver.iter == 4:  # as if killed while the state was half written
        state = sys.argv[2] + "_iter_4.solverstate"
        os.truncate(state, os.path.getsize(state) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

w.solver.snapshot = dies_inside
w.solver.step(10)
"""


def test_a_watch_killed_inside_a_snapshot_leaves_no_half_written_file(caffe, write_solver,
                                                                      tmp_path):
    """The manifest names a snapshot's files before Caffe writes them: killed in the middle,
    the watch leaves a half-written checkpoint 4 that the next watch removes with its
    whole checkpoints 0 and 2."""
    prefix = tmp_path / "ck"
    path = write_solver(small_net(), snapshot_prefix=prefix_field(prefix))
    run = subprocess.run([sys.executable, "-c", KILLED_IN_SNAPSHOT_CHILD, str(path), str(prefix)],
                         env=child_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr[-3000:]
    names = ["ck_iter_%d.%s" % (i, ext) for i in (0, 2, 4) for ext in ("caffemodel", "solverstate")]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ck_iter_")) == names
    stream = io.StringIO()
    w = watch(str(path), stream=stream, **ROLLBACK)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ck_iter_")]
    [line] = warnings_in(stream)
    assert "removed 6 checkpoint files that the watch of process" in line
    w.close()


# ---------------------------------------------------------------------------------------
# e. Two watched solvers in one process.

def _watch_lines(stream):
    return [line for line in stream.getvalue().splitlines() if "WATCH " in line]


def test_two_watches_of_one_process_name_their_lines(caffe, write_solver):
    alpha = write_solver(small_net(calls=[2], name="alpha"))
    beta = write_solver(small_net(calls=[2], name="beta"))
    alone = io.StringIO()
    w = watch(str(alpha), on_nonfinite="skip", stream=alone)
    w.solver.step(3)
    written = [line.split("safe_layers] ", 1)[1] for line in _watch_lines(alone)]
    assert written == [item.line() for item in w.faults + w.events
                       if item.kind != "replay"] and written  # a replay that named it: unprinted
    w.close()

    streams = {name: io.StringIO() for name in ("alpha", "beta", "alpha2")}
    watches = {name: watch(str(alpha if name != "beta" else beta), on_nonfinite="skip",
                           stream=streams[name]) for name in streams}
    for _ in range(3):
        for each in watches.values():
            each.solver.step(1)
    tags = {}
    for name, each in watches.items():
        lines = _watch_lines(streams[name])
        # A replay that named the producer is kept among the events, not printed.
        items = each.faults + [e for e in each.events if e.kind != "replay"]
        assert len(lines) == len(items) == 3  # the producer, the bad gradients, the skip
        for line, item in zip(lines, items):
            fields = parse_line(line)
            tags.setdefault(name, fields.pop("tag"))
            assert json.dumps(fields, sort_keys=True) == json.dumps(parse_line(item.line()),
                                                                    sort_keys=True)  # NaN too
            assert reporting.parse_line(line).watch["tag"] == tags[name]
            assert line.split("safe_layers] ", 1)[1] == item.line().replace(
                "WATCH ", "WATCH [%s] " % tags[name], 1)
        each.close()
    assert tags["alpha"] == "alpha" and tags["beta"] == "beta"
    assert tags["alpha2"].startswith("alpha#")
