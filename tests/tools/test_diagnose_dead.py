"""`safe-layers diagnose` on a plain `caffe train` log of a net that died without a NaN
(SL820): the loss settles at ln C after a spike, the test accuracy at chance; and no
alarm on the log of a net that learns."""

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

from safe_layers.tools import cli

# The lines Caffe writes (solver.cpp:45 and net.cpp:53 print the parameters; solver.cpp:239,
# :258, sgd_solver.cpp:112 each display; solver.cpp:347/:414 each test), as a run of the
# demo's digits net at base_lr 1 wrote them.
HEAD = """I20261207 07:20:49.929790 26037 solver.cpp:45] Initializing solver from parameters: 
test_iter: 3
test_interval: 100
base_lr: 1
display: 5
max_iter: 300
lr_policy: "fixed"
momentum: 0.9
snapshot_prefix: "solver"
solver_mode: CPU
net: "net.prototxt"
I20261207 07:20:49.929916 26037 solver.cpp:102] Creating training net from net file: net.prototxt
I20261207 07:20:49.930369 26037 net.cpp:53] Initializing net from parameters: 
name: "digits"
state {
  phase: TRAIN
  level: 0
  stage: ""
}
layer {
  name: "data"
  type: "Data"
  top: "data"
  top: "label"
}
layer {
  name: "ip1"
  type: "InnerProduct"
  bottom: "data"
  top: "ip1"
  inner_product_param {
    num_output: 64
  }
}
layer {
  name: "relu1"
  type: "ReLU"
  bottom: "ip1"
  top: "ip1"
}
layer {
  name: "ip2"
  type: "InnerProduct"
  bottom: "ip1"
  top: "ip2"
  inner_product_param {
    num_output: 10
  }
}
layer {
  name: "loss"
  type: "SoftmaxWithLoss"
  bottom: "ip2"
  bottom: "label"
  top: "loss"
}
I20261207 07:20:49.939152 26037 solver.cpp:57] Solver scaffolding done.
I20261207 07:20:49.939170 26037 caffe.cpp:239] Starting Optimization
I20261207 07:20:49.939179 26037 solver.cpp:289] Solving digits
I20261207 07:20:49.939183 26037 solver.cpp:290] Learning Rate Policy: fixed
"""


def display(iteration, loss):
    return ("I20261207 07:20:50.000000 26037 solver.cpp:239] Iteration %d (714.286 iter/s, 0.007s/5 "
            "iters), loss = %s\n"
            "I20261207 07:20:50.000010 26037 solver.cpp:258]     Train net output #0: loss = %s "
            "(* 1 = %s loss)\n"
            "I20261207 07:20:50.000020 26037 sgd_solver.cpp:112] Iteration %d, lr = 1\n"
            % (iteration, loss, loss, loss, iteration))


def caffe_test_lines(iteration, accuracy, loss):
    return ("I20261207 07:20:51.000000 26037 solver.cpp:347] Iteration %d, Testing net (#0)\n"
            "I20261207 07:20:51.000010 26037 solver.cpp:414]     Test net output #0: accuracy = %s\n"
            "I20261207 07:20:51.000020 26037 solver.cpp:414]     Test net output #1: loss = %s "
            "(* 1 = %s loss)\n" % (iteration, accuracy, loss, loss))


TAIL = ("I20261207 07:20:51.204142 26037 solver.cpp:327] Iteration 300, loss = %s\n"
        + caffe_test_lines(300, "%s", "%s")
        + "I20261207 07:20:51.216282 26037 solver.cpp:332] Optimization Done.\n"
        "I20261207 07:20:51.216288 26037 caffe.cpp:250] Optimization Done.\n")


def write_log(path, losses, final_loss, accuracy):
    text = HEAD + caffe_test_lines(0, 0.0875421, 2.31539)
    for iteration, loss in losses:
        text += display(iteration, loss)
    text += TAIL % (final_loss, accuracy, final_loss, final_loss)
    path.write_text(text)
    return path


def diagnose(log):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = cli.main(["diagnose", str(log), "--format", "json"])
    return status, json.loads(out.getvalue())


def test_a_loss_settled_at_ln_c_after_a_spike_is_a_dead_net(tmp_path):
    # Down to 1.2, a spike to 9.8 at iteration 40, then flat at ln 10 = 2.30259.
    settled = [2.31, 2.29, 2.33, 2.30, 2.28, 2.32, 2.31, 2.30, 2.29, 2.31, 2.30, 2.32]
    losses = ([(0, 2.31229), (5, 1.9), (10, 1.5), (15, 1.2), (20, 1.4), (25, 3.5), (30, 9.8)]
              + [(35 + 5 * k, v) for k, v in enumerate(settled)])
    log = write_log(tmp_path / "caffe.log", losses, 2.30711, 0.0976431)
    status, document = diagnose(log)
    assert status == 1
    found = [f for f in document["findings"] if f["rule"] == "SL820"]
    assert len(found) == 1, document["findings"]
    finding = found[0]
    assert finding["classes"] == 10 and abs(finding["level"] - math.log(10)) < 1e-9
    assert "the chance level ln 10 = 2.30259" in finding["message"]
    assert "after a spike to 9.8 at iteration 30" in finding["message"]
    assert "test accuracy 0.0976431 (chance: 0.1)" in finding["message"]
    assert finding["cause"] == "a too-high learning rate"
    lines = log.read_text().splitlines()
    for item in finding["evidence"]:
        assert lines[item["line"] - 1] == item["text"]
    quoted = [item["text"] for item in finding["evidence"]]
    assert "base_lr: 1" in quoted
    assert any(q.endswith("Test net output #0: accuracy = 0.0976431") for q in quoted)


def test_no_alarm_on_a_net_that_learns(tmp_path):
    losses = [(5 * k, 2.3 * math.exp(-k / 6.0) + 0.05) for k in range(60)]
    log = write_log(tmp_path / "caffe.log", losses, 0.05, 0.969697)
    status, document = diagnose(log)
    assert [f["rule"] for f in document["findings"]] == [] and status == 0


def test_no_alarm_while_the_test_accuracy_is_above_chance(tmp_path):
    """A loss near ln C with a test accuracy well above 1/C: a hard task, not a dead net."""
    settled = [2.31, 2.29, 2.33, 2.30, 2.28, 2.32, 2.31, 2.30, 2.29, 2.31, 2.30, 2.32]
    losses = [(0, 2.31229), (5, 9.8)] + [(10 + 5 * k, v) for k, v in enumerate(settled)]
    log = write_log(tmp_path / "caffe.log", losses, 2.30711, 0.45)
    status, document = diagnose(log)
    assert "SL820" not in [f["rule"] for f in document["findings"]]
