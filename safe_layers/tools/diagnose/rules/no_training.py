"""SL812: a run that finished without a single training iteration."""

from safe_layers.tools import rule_table
from safe_layers.tools.diagnose.rules.evidence import finding
from safe_layers.tools.diagnose.series import Point

NO_TRAINING = rule_table.rule("diagnose", "SL812", "error", "no training iteration", """
    max_iter is an optional field without a default (caffe.proto:152): unset, it is 0.
    Solver::Solve then runs Step(max_iter - iter) = Step(0) (solver.cpp:303), no
    training iteration, and still does its final forward pass and test and logs
    "Optimization Done." (solver.cpp:320-332): the log looks like a finished run, and
    its test outputs are those of the untrained net.""")


def no_training(model):
    """SL812: `caffe train` with max_iter 0 (unset: its proto default) runs Step(0): no
    training iteration, a final "Iteration 0, loss" and test, and "Optimization Done."."""
    if not model.done or model.solver is None or model.iteration != model.first_iteration:
        return None  # losses at several iterations: something was trained
    try:
        max_iter = float(model.solver_field("max_iter") or 0)
    except ValueError:
        return None
    if max_iter > 0:
        return None
    point = Point(model.iteration, None, model.done.line, model.done.text)
    declared = model.solver_point("max_iter")
    message = ("the run trained nothing: max_iter is %s, so `caffe train` ran no iteration "
               "before \"Optimization Done.\" (any test output above is the untrained net's)"
               % ("0" if declared is not None else "not set (0)"))
    return finding(model, NO_TRAINING, "error", point, message,
                   "set max_iter in the solver (the number of iterations to train)",
                   [declared, point], cause="no training")
