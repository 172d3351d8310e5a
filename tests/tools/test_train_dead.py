"""`safe-layers train` and a net that stops learning without a NaN: the digits net at base_lr
10 recovers with the default rollback settings; a run that ends dead says so (exit 1)."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from safe_layers.anomaly import parse_line
from safe_layers.reporting import watch_lines
from safe_layers.tools.train import plot
from support.nets import dead_relu
from support.paths import ROOT, TESTS

def env():
    values = dict(os.environ, GLOG_minloglevel="0")
    values["PYTHONPATH"] = os.pathsep.join([str(TESTS)] + [p for p in os.environ.get(
        "PYTHONPATH", "").split(os.pathsep) if p])
    return values


def train(*args, cwd):
    return subprocess.run([sys.executable, "-m", "safe_layers.tools.cli", "train", *map(str, args),
                           "--progress", "never"], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=300)


def test_a_run_that_ends_dead_says_so_and_exits_1(tmp_path):
    (tmp_path / "net.prototxt").write_text(dead_relu())
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 40\ndisplay: 10\n'
        'random_seed: 1\nsolver_mode: CPU\nsnapshot_prefix: "run"\nsnapshot_after_train: false\n')
    run = train("-solver", "solver.prototxt", "--dead-after", "10", cwd=tmp_path)
    assert run.returncode == 1, run.stderr[-3000:]
    dead = [parse_line(l) for l in run.stderr.splitlines() if "WATCH dead" in l]
    assert len(dead) == 1 and dead[0]["action"] == "warn"
    details = watch_lines.dead_details(dead[0])
    assert details["since"] == 0 and details["layers"][0]["layer"] == "relu"
    summary = next(l for l in run.stderr.splitlines() if "WATCH summary" in l)
    assert parse_line(summary[summary.index("WATCH"):])["ended_dead"] == 0
    assert "safe-layers train: ended dead: dead since iteration 0; dead layers: \"relu\"" in run.stderr
    events = [json.loads(l) for l in (tmp_path / "run_events.jsonl").read_text().splitlines()]
    faults = [e for e in events if e.get("kind") == "dead"]
    assert faults[0]["event"] == "fault" and faults[0]["since"] == 0
    assert events[-1]["event"] == "summary" and events[-1]["dead"]["since"] == 0
    assert (tmp_path / "run_train.png").read_bytes()[:4] == b"\x89PNG"
    # The PNG marks where the net died, and a dead fault is no non-finite value.
    drawn = [(mark.style, mark.iteration) for mark in plot.marks(events)]
    assert ("dead", 0) in drawn and "nonfinite" not in [style for style, _ in drawn]


@pytest.fixture
def digits_at_lr_10(tmp_path):
    spec = importlib.util.spec_from_file_location("digits", ROOT / "examples" / "digits.py")
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    digits.write_digits(tmp_path)
    demo = ROOT / "examples" / "demo"
    (tmp_path / "net.prototxt").write_text((demo / "digits_train_test.prototxt").read_text())
    solver = (demo / "solver.prototxt").read_text().replace("base_lr: 0.1", "base_lr: 10").replace(
        'net: "examples/demo/digits_train_test.prototxt"', 'net: "net.prototxt"')
    assert 'net: "net.prototxt"' in solver
    (tmp_path / "solver.prototxt").write_text(solver + 'snapshot_prefix: "digits"\n')
    return tmp_path


def test_digits_at_base_lr_10_recover_with_the_default_rollback_settings(digits_at_lr_10):
    """base_lr 10 kills the ReLUs (and later gives NaN); the default lr_factor 0.1 gives
    base_lr 1, which kills them too without any NaN; found dead, rolled back, 0.1 learns."""
    run = train("-solver", "solver.prototxt", "--on-nonfinite", "skip", "--rollback-after", "3",
                cwd=digits_at_lr_10)
    assert run.returncode == 0, run.stderr[-3000:]
    accuracy = [float(a) for a in re.findall(r"Test net output #0: accuracy = (\S+)", run.stderr)]
    assert accuracy[-1] >= 0.95, run.stderr[-3000:]
    rollbacks = [watch_lines.event_details(parse_line(l[l.index("WATCH"):]))
                 for l in run.stderr.splitlines() if "WATCH rollback" in l]
    assert [r["cause"] for r in rollbacks][-1] == "dead"
    assert rollbacks[-1]["base_lr_to"] == pytest.approx(0.1)
    assert "ended dead" not in run.stderr
