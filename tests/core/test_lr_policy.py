"""safe_layers.core.lr_policy (lint, the watch and diagnose share it) against the real SGDSolver's rate."""

import numpy
import pytest

from safe_layers.core import lr_policy
from safe_layers.anomaly import parse_line, read_solver_param
from safe_layers.reporting import watch_lines
from safe_layers.reporting.watch_lines import Event, SolverFault

TINY_NET = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 2 dim: 2 } shape { dim: 2 dim: 1 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 1 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""

POLICIES = [
    dict(lr_policy='"fixed"'),
    dict(lr_policy='"step"', gamma=0.5, stepsize=3),
    dict(lr_policy='"exp"', gamma=0.9),
    dict(lr_policy='"inv"', gamma=0.1, power=0.75),
    dict(lr_policy='"multistep"', gamma=0.1, stepvalue=[2, 5]),
    dict(lr_policy='"poly"', power=0.9, max_iter=8),
    dict(lr_policy='"sigmoid"', gamma=0.5, stepsize=4),
]


@pytest.mark.parametrize("fields", POLICIES, ids=lambda f: f["lr_policy"].strip('"'))
def test_rate_is_caffes(caffe, write_solver, fields):
    fields = dict(fields)
    stepvalues = fields.pop("stepvalue", [])
    path = write_solver(TINY_NET, base_lr=0.01, **fields)
    if stepvalues:
        path.write_text(path.read_text() + "".join("stepvalue: %d\n" % v for v in stepvalues))
    param = read_solver_param(str(path))
    solver = caffe.get_solver(str(path))
    caffes = []
    for iteration in range(10):
        assert solver.iter == iteration
        caffes.append(float(solver.lr))
        # The watch's per-iteration rate, against the rate Caffe reports at that iteration.
        assert lr_policy.rate(param, iteration) == pytest.approx(caffes[-1], rel=1e-6, nan_ok=True)
        solver.step(1)
    # Lint's simulation of the whole schedule (poly past max_iter 8: NaN, as Caffe).
    numpy.testing.assert_allclose(lr_policy.rates(param, 0, 10), numpy.float32(caffes), rtol=1e-6)


def test_explanations_name_the_policy_and_the_fields(caffe, write_solver):
    path = write_solver(TINY_NET, lr_policy='"poly"', power=0.9, max_iter=4)
    param = read_solver_param(str(path))
    text = lr_policy.describe(param, 6, float("nan"))
    assert 'lr_policy "poly"' in text and "past max_iter 4" in text
    param.ClearField("max_iter")
    assert "max_iter is unset (0)" in lr_policy.describe(param, 0, float("nan"))
    param.lr_policy, param.gamma = "exp", 0
    assert "gamma is 0" in lr_policy.describe(param, 3, 0.0)
    param.base_lr = -1
    assert "base_lr is negative" in lr_policy.describe(param, 3, -1.0)
    # What describe writes, parse_described reads back (diagnose reads a watch's lr line so).
    for lr in (float("nan"), float("-inf"), -1.0):
        back = lr_policy.parse_described("WATCH lr in TRAIN, iteration 3: "
                                         + lr_policy.describe(param, 3, lr) + "; action=stop")
        assert back["policy"] == "exp" and back["iteration"] == 3
        assert numpy.array_equal(back["lr"], lr, equal_nan=True)
        assert back["why"].startswith("base_lr is negative")
    assert lr_policy.parse_described("lr = 0.01") is None
    assert "stepsize > 0" in lr_policy.fatal_problem(_with(param, lr_policy="step", stepsize=0))
    assert "gamma >= 0" in lr_policy.fatal_problem(_with(param, lr_policy="inv", gamma=-1))
    assert lr_policy.fatal_problem(_with(param, lr_policy="fixed")) is None


def _with(param, **fields):
    copy = type(param)()
    copy.CopyFrom(param)
    for key, value in fields.items():
        setattr(copy, key, value)
    return copy


def test_solver_and_event_lines_parse_back():
    fault = SolverFault("lr", "TRAIN", 0, 'lr_policy "poly" (base_lr=0.01) gives lr = nan', "stop")
    parsed = parse_line("E20261125 03:18:18.830953  5236 safe_layers] " + fault.line())
    assert parsed == {"kind": "lr", "phase": "TRAIN", "iteration": 0, "action": "stop",
                      "message": 'lr_policy "poly" (base_lr=0.01) gives lr = nan'}
    event = Event("rollback", 100, "restored x_iter_100.solverstate")
    assert parse_line(event.line())["kind"] == "rollback"
    assert parse_line("I1125 03:18:18.830953  5236 solver.cpp:239] Iteration 5, loss = 1") is None
    assert parse_line(watch_lines.repeat_line(105, "lr", fault)) == dict(
        parse_line(fault.line()), repeated=105)
    assert parse_line(watch_lines.record_line("/r/iter3.json")) == {"kind": "record",
                                                               "path": "/r/iter3.json"}
    assert parse_line(watch_lines.summary_line(3, {"producer": 2, "loss": 1}, 1, 0, 2, 0)) == {
        "kind": "summary", "faults": 3, "counts": {"producer": 2, "loss": 1}, "skipped": 1,
        "rollbacks": 0, "checkpoints": 2, "clips": 0, "ended_dead": None}


def test_multistep_steps_replays_caffes_counter():
    """Caffe moves current_step_ at most once per iteration: with a repeated stepvalue the
    second step comes an iteration later than a count of stepvalues reached would say."""
    assert list(lr_policy.multistep_steps([2, 5], 0, 7)) == [0, 0, 1, 1, 1, 2, 2]
    assert list(lr_policy.multistep_steps([2, 2, 5], 0, 7)) == [0, 0, 1, 2, 2, 3, 3]
    assert list(lr_policy.multistep_steps([2, 2, 5], 4, 7)) == [2, 3, 3]


def test_a_logs_solver_block_explains_like_the_message(caffe, write_solver):
    """diagnose reads the solver from the block a log prints (strings, absent fields
    unset); the explanation and fix are those of the parsed message."""
    path = write_solver(TINY_NET, lr_policy='"poly"', power=0.9)
    param = read_solver_param(str(path))
    param.ClearField("max_iter")
    from_log = lr_policy.LogFields({"base_lr": "0.01", "lr_policy": "poly", "power": "0.9"})
    assert lr_policy.explain(from_log, 0, float("nan")) == lr_policy.explain(param, 0, float("nan"))
    field, why = lr_policy.explain(from_log, 0, float("nan"))
    assert field == "max_iter" and "max_iter is unset (0)" in why
    assert lr_policy.fix(from_log, 0, float("nan")).startswith("set max_iter")
    exp = lr_policy.LogFields({"base_lr": "0.01", "lr_policy": "exp", "gamma": "10"})
    assert lr_policy.explain(exp, 40, float("inf"))[0] == "gamma"
    assert lr_policy.fix(exp, 40, float("inf")) == "gamma below 1 (e.g. 0.9999)"


@pytest.mark.parametrize("policy", ["inv", "multistep"])
def test_negative_gamma_is_caffes_abort_for_inv_and_multistep_too(caffe, write_solver, caffe_train,
                                                                 policy):
    fields = dict(lr_policy='"%s"' % policy, gamma=-0.5, power=1, max_iter=3)
    param = read_solver_param(str(write_solver(TINY_NET, **fields)))
    assert "CHECK_GE(gamma, 0)" in lr_policy.fatal_problem(param)
    with pytest.raises(ValueError, match="gamma >= 0"):
        lr_policy.rates(param, 0, 3)
    result = caffe_train(TINY_NET, **fields)  # the real binary aborts as said
    assert result.returncode != 0 and "Check failed: this->param_.gamma() >= 0" in result.stderr
