"""`safe-layers harden SOLVER -o DIR/`: the nets a solver names, hardened, and a copy of the
solver naming them, which `caffe train` trains as it is; nothing written over an input."""

import re

import pytest

from support.nets import POOLING_NET

SOLVER = """\
# the user's solver: every byte but the net paths is kept
train_net: "nets/net.prototxt"   # the training net
test_net: "nets/test.prototxt"
test_iter: 1
test_interval: 2
base_lr: 0.01
lr_policy: "fixed"
max_iter: 4
display: 1
iter_size: 2
random_seed: 1
solver_mode: CPU
snapshot_after_train: false
"""


@pytest.fixture
def harden(harden, tmp_path):
    """tests/tools/conftest.py's harden, in a tmp_path holding a solver and its two nets."""
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "net.prototxt").write_text(POOLING_NET)
    (tmp_path / "nets" / "test.prototxt").write_text(POOLING_NET.replace('"pooling_nan"', '"test"'))
    (tmp_path / "solver.prototxt").write_text(SOLVER)
    return harden


def losses(result):
    return [float(v) for v in re.findall(r"solver\.cpp:\d+\] Iteration \d+ .*, loss = (\S+)", result.stderr)]


def test_the_hardened_solver_trains_the_hardened_nets(harden, caffe_bin, tmp_path):
    untouched = {p: p.read_text() for p in tmp_path.rglob("*.prototxt")}
    dead = caffe_bin("train", "-solver", "solver.prototxt", cwd=tmp_path)
    assert dead.returncode == 0 and all(v != v for v in losses(dead))  # NaN from iteration 0
    status, out, err = harden("solver.prototxt", "-o", "out/", "--level", "repair")
    assert status == 0 and out == ""
    assert err.splitlines()[-1] == "wrote out/net.prototxt, out/test.prototxt, out/solver.prototxt"
    # The solver: only its net paths changed, to where `caffe train` run from here finds them.
    assert (tmp_path / "out" / "solver.prototxt").read_text() == SOLVER.replace(
        '"nets/net.prototxt"', '"out/net.prototxt"').replace('"nets/test.prototxt"', '"out/test.prototxt"')
    # Each net hardened as `harden NET --solver SOLVER` hardens it (the solver's iter_size).
    for name in ("net", "test"):
        status, _, _ = harden("nets/%s.prototxt" % name, "-o", "%s_alone.prototxt" % name,
                              "--level", "repair", "--solver", "solver.prototxt")
        assert (tmp_path / "out" / ("%s.prototxt" % name)).read_text() == \
            (tmp_path / ("%s_alone.prototxt" % name)).read_text()
    assert "iter_size: 2" in (tmp_path / "out" / "net.prototxt").read_text()
    trained = caffe_bin("train", "-solver", "out/solver.prototxt", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    found = losses(trained)
    assert len(found) == 4 and all(v == v for v in found), found  # iterations 0-3
    assert all(p.read_text() == text for p, text in untouched.items())


def test_a_missing_folder_is_made_and_the_solver_names_net(harden, tmp_path):
    (tmp_path / "solver.prototxt").write_text('net: "nets/net.prototxt"\nbase_lr: 0.1\n')
    status, _, err = harden("solver.prototxt", "-o", tmp_path / "a" / "b")
    assert status == 0, err
    assert (tmp_path / "a" / "b" / "solver.prototxt").read_text() == \
        'net: "%s"\nbase_lr: 0.1\n' % (tmp_path / "a" / "b" / "net.prototxt")


@pytest.mark.parametrize("args, message", [
    (["solver.prototxt", "-o", "nets"], "nets/net.prototxt is an input: harden never overwrites its input"),
    (["solver.prototxt", "-o", "."], "./solver.prototxt is an input: harden never overwrites its input"),
    (["solver.prototxt", "-o", "-"], "-o -: a solver gives several files"),
    (["solver.prototxt", "-o", "nets/net.prototxt"], "-o nets/net.prototxt: not a folder"),
    (["solver.prototxt", "--dry-run"], "-o DIR/ is required with a solver"),
    (["solver.prototxt", "-o", "out", "--solver", "solver.prototxt"], "--solver goes with a net"),
])
def test_refusals_write_nothing(harden, tmp_path, args, message):
    before = {p: p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    status, out, err = harden(*args)
    assert status == 2 and message in err, err
    assert {p: p.read_text() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_refusals_of_what_cannot_be_written_apart(harden, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "net.prototxt").write_text(POOLING_NET)
    (tmp_path / "solver.prototxt").write_text('train_net: "nets/net.prototxt"\ntest_net: "other/net.prototxt"\n')
    status, _, err = harden("solver.prototxt", "-o", "out")
    assert status == 2 and "two of the files harden would write are out/net.prototxt" in err
    (tmp_path / "solver.prototxt").write_text('net_param { name: "inline" }\nbase_lr: 0.1\n')
    status, _, err = harden("solver.prototxt", "-o", "out")
    assert status == 2 and "net_param holds the net inline" in err
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_diffs(harden, tmp_path):
    status, out, err = harden("solver.prototxt", "-o", "out", "--dry-run")
    assert status == 0 and not (tmp_path / "out").exists()
    assert "+++ out/net.prototxt" in out and "+++ out/solver.prototxt" in out
    assert '\n-train_net: "nets/net.prototxt"   # the training net\n' in out
    assert '\n+train_net: "out/net.prototxt"   # the training net\n' in out
