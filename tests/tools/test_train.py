"""`safe-layers train` against `caffe train`: same flags, same losses, logs that Caffe's
own parser reads; exit statuses; resume; signals; the event log and the plot."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from support.nets import DIVERGING_NET, regression_net
from support.paths import DATA, TESTS
from support.published import published_net, published_solver_fields

LENET = "lenet_train_test.prototxt"

# Caffe's own log parser, tools/extra/parse_log.py (BVLC master 99bd997), verbatim.
REGEX_ITERATION = re.compile(r'Iteration (\d+)')
REGEX_TRAIN_OUTPUT = re.compile(r'Train net output #(\d+): (\S+) = ([\.\deE+-]+)')
REGEX_TEST_OUTPUT = re.compile(r'Test net output #(\d+): (\S+) = ([\.\deE+-]+)')
REGEX_LEARNING_RATE = re.compile(r'lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)')
# caffe-internals.md section 4: the glog prefix of every Caffe line.
GLOG = re.compile(r"^[IWEF]\d{4}(\d{4})? \d\d:\d\d:\d\d\.\d{6} +\d+ \S+:\d+\] ")
LOSS = re.compile(r"solver\.cpp:\d+\] Iteration (\d+) .*loss = (\S+)$|"
                  r"solver\.cpp:\d+\] Iteration (\d+), loss = (\S+)$")


def parse(log):
    """What parse_log.py's regexes take out of a log: (train rows, test rows, lr rows),
    each row (iteration, text); plus the loss lines."""
    train, test, rates, losses = [], [], [], []
    iteration = -1
    for line in log.splitlines():
        match = REGEX_ITERATION.search(line)
        if match:
            iteration = int(match.group(1))
        for regex, rows in ((REGEX_TRAIN_OUTPUT, train), (REGEX_TEST_OUTPUT, test)):
            match = regex.search(line)
            if match:
                assert GLOG.match(line), line
                rows.append((iteration, match.group(2), match.group(3)))
        match = REGEX_LEARNING_RATE.search(line)
        if match and GLOG.match(line):
            rates.append((iteration, match.group(1)))
        match = LOSS.search(line)
        if match:
            assert GLOG.match(line), line
            losses.append(tuple(g for g in match.groups() if g is not None))
    return train, test, rates, losses


def env():
    values = dict(os.environ)
    values["GLOG_minloglevel"] = "0"
    values["PYTHONPATH"] = os.pathsep.join([str(TESTS)] + [p for p in os.environ.get(
        "PYTHONPATH", "").split(os.pathsep) if p])
    return values


def safe_layers_train(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "safe_layers.tools.cli", "train", *map(str, args)],
                          cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def lenet(tmp_path):
    """The published LeNet and solver, DummyData in place of its LMDBs (seeded by the
    solver's random_seed: both programs see the same batches), batch 16."""
    def write(**fields):
        net = tmp_path / "lenet_train_test.prototxt"
        net.write_text(published_net(LENET, data="dummy", batch=16))
        values = published_solver_fields("lenet_solver.prototxt")
        values.update(net='"%s"' % net, test_iter=2, test_interval=10, display=5, max_iter=30,
                      snapshot_prefix='"%s"' % (tmp_path / "lenet"), random_seed=7,
                      solver_mode="CPU")
        values.update(fields)
        path = tmp_path / "lenet_solver.prototxt"
        path.write_text("".join("%s: %s\n" % kv for kv in values.items()))
        return path
    return write


def test_same_losses_as_caffe_train_and_caffes_parser_reads_the_log(caffe_bin, lenet, tmp_path):
    solver = lenet(average_loss=3, iter_size=2)  # Caffe's smoothing and accumulation, too
    theirs = caffe_bin("train", "-solver", solver, cwd=tmp_path)
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    ours = safe_layers_train("-solver", solver, cwd=tmp_path)
    assert ours.returncode == 0, ours.stderr[-3000:]
    expected, got = parse(theirs.stderr), parse(ours.stderr)
    train, test, rates, losses = got
    assert len(train) == 6 and len(test) == 8 and len(rates) == 6 and len(losses) == 7
    assert got == expected
    assert "Optimization Done." in ours.stderr
    assert (tmp_path / "lenet_iter_30.caffemodel").exists()
    events = [json.loads(l) for l in (tmp_path / "lenet_events.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in events if e["event"] == "iteration"] == list(range(30))
    png = (tmp_path / "lenet_train.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def diverging(tmp_path):
    """A solver whose loss grows (a WATCH growth warning with --warn-growth 10) and then
    goes non-finite (a WATCH stop, an error)."""
    net = tmp_path / "diverging.prototxt"
    net.write_text(DIVERGING_NET.replace("LAYER", ""))
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "%s"\nbase_lr: 0.1\nmomentum: 0.9\nlr_policy: "fixed"\nmax_iter: 200\n'
                      'display: 10\nrandom_seed: 1\nsolver_mode: CPU\nsnapshot_prefix: "%s"\n'
                      % (net, tmp_path / "div"))
    return solver


def test_a_fault_exits_1_with_the_report_last_and_skip_trains_on(lenet, diverging, tmp_path):
    solver = diverging
    run = safe_layers_train("-solver", solver, "--warn-growth", "10", cwd=tmp_path)
    assert run.returncode == 1, run.stderr[-3000:]
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("E") and "WATCH" in lines[-1] and "action=stop" in lines[-1]
    assert "stopped at iteration" in lines[-2]
    assert "WATCH growth" in run.stderr  # the early warning came first
    events = [json.loads(l) for l in (tmp_path / "div_events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "summary" and events[-2]["event"] == "stopped"

    ck = tmp_path / "ck"
    solver.write_text(solver.read_text().replace('"%s"' % (tmp_path / "div"), '"%s"' % ck))
    run = safe_layers_train("-solver", solver, "--on-nonfinite", "skip", "--rollback-after", "2",
                            "--checkpoint-every", "5", "--lr-factor", "0.01", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    events = [json.loads(l) for l in (tmp_path / "ck_events.jsonl").read_text().splitlines()]
    rollbacks = [e for e in events if e.get("kind") == "rollback" and e["event"] == "watch"]
    assert rollbacks and rollbacks[0]["base_lr_to"] < 0.1
    its = [e for e in events if e["event"] == "iteration"]
    assert its[-1]["iteration"] == 199
    # Every iteration is accounted for: the ones replayed after the rollback too.
    first = events.index(rollbacks[0])
    replayed = next(e for e in events[first:] if e["event"] == "iteration")
    assert replayed["iteration"] == rollbacks[0]["to"]
    assert (tmp_path / "ck_train.png").read_bytes()[:4] == b"\x89PNG"


POISONED = regression_net("poisoned", fc_bottom="xp", before_fc=(
    'layer { name: "poison" type: "Python" bottom: "x" top: "xp"\n'
    '  python_param { module: "support.poison" layer: "PoisonAtCall"\n'
    '                 param_str: "{calls: CALLS, sample: 3}" } }\n'))


def test_resume_from_a_snapshot_reports_the_true_iteration(tmp_path):
    net = tmp_path / "net.prototxt"
    solver = tmp_path / "solver.prototxt"
    text = ('net: "%s"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: MAX\ndisplay: 5\n'
            'random_seed: 1\nsolver_mode: CPU\nsnapshot_prefix: "%s"\n' % (net, tmp_path / "snap"))
    net.write_text(POISONED.replace("CALLS", "[]"))
    solver.write_text(text.replace("MAX", "20"))
    first = safe_layers_train("-solver", solver, "--progress", "always", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "20/20" in first.stderr  # tqdm's bar (asked for: stderr is no terminal here)
    net.write_text(POISONED.replace("CALLS", "[18]"))
    solver.write_text(text.replace("MAX", "40"))
    run = safe_layers_train("-solver", solver, "-snapshot", tmp_path / "snap_iter_20.solverstate",
                            cwd=tmp_path)
    assert run.returncode == 1, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert 'WATCH producer forward "Python" "poison"' in last and "iteration 37:" in last
    assert "samples [3]" in last
    assert "Iteration 20 (" in run.stderr and "Iteration 35 (" in run.stderr


def test_bad_input_exits_2_and_says_why(lenet, tmp_path):
    solver = lenet()
    run = safe_layers_train("-solver", solver, "-snapshot", "a.solverstate", "-weights", "b",
                            cwd=tmp_path)
    assert run.returncode == 2 and "not both" in run.stderr
    broken = tmp_path / "broken.prototxt"
    broken.write_text("base_lr: 0.01\nlr_policy: \n")
    run = safe_layers_train("-solver", broken, cwd=tmp_path)
    assert run.returncode == 2 and "broken.prototxt:3:1" in run.stderr
    unknown = lenet(lr_policy='"cosine"')
    run = safe_layers_train("-solver", unknown, cwd=tmp_path)
    assert run.returncode == 2 and "Unknown learning rate policy" in run.stderr
    # A net Caffe refuses to build: lint says so first; past lint, its CHECK kills the
    # training process, not the tool.
    solver = lenet()
    net = tmp_path / "lenet_train_test.prototxt"
    net.write_text(net.read_text().replace('bottom: "pool2"', 'bottom: "pool9"'))
    run = safe_layers_train("-solver", solver, cwd=tmp_path)
    assert run.returncode == 2 and "SL001 error" in run.stderr, run.stderr[-2000:]
    run = safe_layers_train("-solver", solver, "--no-lint", cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Caffe aborted while building" in run.stderr and "pool9" in run.stderr
    run = safe_layers_train("-solver", lenet(), "-gpu", "0,1", cwd=tmp_path)
    assert run.returncode == 2 and "one device only" in run.stderr


def test_outputs_and_sources_that_cannot_work_exit_2_before_training(lenet, tmp_path):
    """Each is found before the training process starts: no traceback, no "events ..."
    line claiming a file that was never written."""
    cases = [
        (("--events", tmp_path / "nowhere" / "e.jsonl"), "cannot write the event log",
         "folder %s does not exist" % (tmp_path / "nowhere")),
        (("--plot", tmp_path), "cannot write the plot", "it is a folder"),
    ]
    for extra, what, why in cases:
        run = safe_layers_train("-solver", lenet(), *extra, cwd=tmp_path)
        assert run.returncode == 2, run.stderr[-2000:]
        assert what in run.stderr and why in run.stderr and "Traceback" not in run.stderr
        assert "Starting Optimization" not in run.stderr and "safe-layers train: events" not in run.stderr
    # Snapshots (here: the watch's rollback checkpoints) under a prefix whose folder is missing.
    solver = lenet(snapshot_prefix='"%s"' % (tmp_path / "gone" / "snap"))
    run = safe_layers_train("-solver", solver, "--events", tmp_path / "e.jsonl", "--plot",
                            tmp_path / "p.png", "--on-nonfinite", "skip", "--rollback-after", "2",
                            cwd=tmp_path)
    assert run.returncode == 2 and "cannot write snapshots (snapshot_prefix" in run.stderr
    # A Data layer whose LMDB is not there: named, with its line, instead of Caffe's
    # `mdb_status == 0 (2 vs. 0) No such file or directory`.
    net = tmp_path / "lmdb_net.prototxt"
    net.write_text((DATA / LENET).read_text())
    run = safe_layers_train("-solver", lenet(net='"%s"' % net), "--no-lint", cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "SL930 error data layer 'mnist' (Data): source 'examples/mnist/mnist_train_lmdb' does " \
           "not exist" in run.stderr
    assert "lmdb_net.prototxt:" in run.stderr and "Starting Optimization" not in run.stderr


STAGED = """name: "staged"
layer { name: "small" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 } }
  include { phase: TRAIN not_stage: "big" } }
layer { name: "big" type: "Data" top: "data" top: "label" include { phase: TRAIN stage: "big" }
  data_param { source: "big_lmdb" batch_size: 2 backend: LMDB } }
layer { name: "held_out" type: "Data" top: "data" top: "label" include { phase: TEST }
  data_param { source: "test_lmdb" batch_size: 2 backend: LMDB } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_only_the_sources_of_layers_caffe_builds_must_exist(tmp_path):
    """A Data layer of a stage this run does not use, or of a test net the solver never
    builds (no test_iter), is not built by Caffe: its missing source stops nothing.
    With -stage big, the same missing source is named."""
    (tmp_path / "net.prototxt").write_text(STAGED)
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 2\nsolver_mode: CPU\n'
        'snapshot_prefix: "snap"\nsnapshot_after_train: false\n')
    run = safe_layers_train("-solver", "solver.prototxt", "--no-lint", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    run = safe_layers_train("-solver", "solver.prototxt", "--no-lint", "-stage", "big", cwd=tmp_path)
    assert run.returncode == 2 and "data layer 'big' (Data): source 'big_lmdb' does not exist" in run.stderr
    assert "held_out" not in run.stderr
    with open(tmp_path / "solver.prototxt", "a") as f:
        f.write("test_iter: 1\ntest_interval: 1\n")
    run = safe_layers_train("-solver", "solver.prototxt", "--no-lint", cwd=tmp_path)
    assert run.returncode == 2 and "data layer 'held_out' (Data): source 'test_lmdb'" in run.stderr


def test_an_event_log_that_cannot_be_written_never_stops_training(lenet, tmp_path):
    run = safe_layers_train("-solver", lenet(max_iter=10), "--events", "/dev/full", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr.count("cannot write the event log /dev/full (No space left on device)") == 1
    assert "Optimization Done." in run.stderr
    assert "safe-layers train: events /dev/full" not in run.stderr
    # The solver block Caffe printed shows this tool's display/test fields; the user's follow.
    assert ("display, test_interval, test_initialization and snapshot above are safe-layers "
            "train's; %s's own: display: 5, test_interval: 10, test_initialization: true, "
            "snapshot: 0" % lenet(max_iter=10)) in run.stderr


def test_weights_with_commas_and_sigint_stop(caffe_bin, lenet, tmp_path):
    solver = lenet(max_iter=2, snapshot_after_train="true")
    assert caffe_bin("train", "-solver", solver, cwd=tmp_path).returncode == 0
    model = tmp_path / "lenet_iter_2.caffemodel"
    solver = lenet(max_iter=100000, display=1, test_interval=100000, snapshot_prefix='"%s"'
                   % (tmp_path / "long"))
    child = subprocess.Popen([sys.executable, "-m", "safe_layers.tools.cli", "train", "-solver",
                              str(solver), "-weights", "%s,%s" % (model, model)],
                             cwd=tmp_path, env=env(), stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.time() + 120
    for line in child.stderr:
        seen.append(line)
        if "sgd_solver.cpp:112] Iteration 3," in line:
            child.send_signal(signal.SIGHUP)  # -sighup_effect snapshot (the default)
        if "sgd_solver.cpp:112] Iteration 6," in line:
            child.send_signal(signal.SIGINT)  # -sigint_effect stop (the default)
            break
        assert time.time() < deadline
    rest = child.stderr.read()
    assert child.wait(timeout=120) == 0
    log = "".join(seen) + rest
    assert log.count("Finetuning from %s" % model) >= 2
    assert "Optimization stopped early." in log
    # One snapshot for SIGHUP, one at the stop (snapshot_after_train), as caffe train.
    snapshots = sorted(int(p.name.split("_")[2].split(".")[0])
                       for p in tmp_path.glob("long_iter_*.caffemodel"))
    assert len(snapshots) == 2 and 4 <= snapshots[0] < snapshots[1] < 50, snapshots


def test_lint_errors_stop_the_run_unless_no_lint(tmp_path):
    from support.nets import POOLING_NET
    net = tmp_path / "pool.prototxt"
    net.write_text(POOLING_NET)
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "%s"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 5\ndisplay: 1\n'
                      'random_seed: 1\nsolver_mode: CPU\nsnapshot_prefix: "%s"\n' % (net, tmp_path / "p"))
    run = safe_layers_train("-solver", solver, cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    assert re.search(r"pool\.prototxt:\d+:\d+: SL\d+ error .*pool1", run.stderr), run.stderr[-2000:]
    assert "pass --no-lint" in run.stderr and not (tmp_path / "p_events.jsonl").exists()
    run = safe_layers_train("-solver", solver, "--no-lint", cwd=tmp_path)
    assert run.returncode == 1, run.stderr[-2000:]
    assert 'WATCH producer forward "Pooling" "pool1"' in run.stderr.strip().splitlines()[-1]
