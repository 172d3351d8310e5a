"""SL801, SL811: the learning rate the log shows (Caffe's ``Iteration N, lr = R`` line,
sgd_solver.cpp:112, or a watch's lr check): non-finite or negative, or down to 0."""

from safe_layers.core import lr_policy
from safe_layers.tools import rule_table
from safe_layers.tools.diagnose.rules.evidence import finding
from safe_layers.tools.diagnose.series import finite, fmt

BAD_POLICY = rule_table.rule("diagnose", "SL801", "error", "bad learning-rate policy", """
    Caffe computes the learning rate of every iteration from the solver's lr_policy and
    the fields that policy reads (SGDSolver::GetLearningRate, sgd_solver.cpp:27-70). It
    checks a few of them (stepsize > 0, gamma >= 0) and not the others: ``poly`` with
    max_iter unset divides by 0, ``inv`` or ``poly`` with a negative power can overflow,
    a negative base_lr is taken as it is. A non-finite rate makes every weight non-finite
    in one update; a negative one climbs the loss. The finding names the policy, the field
    that made the rate and its value; ``safe-layers lint SOLVER`` simulates the schedule
    before training.""")

RATE_ZERO = rule_table.rule("diagnose", "SL811", "warning", "the learning rate reached 0", """
    From the iteration the rate is 0 on, the solver still runs forward and backward but
    nothing changes the weights: ``step``, ``exp`` or ``multistep`` with gamma 0 (Caffe
    checks only gamma >= 0, sgd_solver.cpp:35-61), ``poly`` at max_iter. The time spent
    after it trains nothing.""")


def bad_policy(model):
    """SL801: the first non-finite (else negative) learning rate, the field that made it."""
    bad = model.lr_first_bad or model.lr_first_negative
    if bad is None:
        return None
    policy = model.lr_policy()
    fields = dict(model.solver.fields) if model.solver is not None else {}
    if policy:
        fields["lr_policy"] = policy
    if model.solver is None and policy is None:
        field, why = None, "the log does not show the solver's parameters"
        fix = "fix the solver fields lr_policy reads (SGDSolver::GetLearningRate, sgd_solver.cpp:27-70)"
    else:
        param = lr_policy.LogFields(fields)
        field, why = lr_policy.explain(param, bad.iteration, bad.value)
        fix = lr_policy.fix(param, bad.iteration, bad.value)
    what = "non-finite" if not finite(bad.value) else "negative"
    message = ("bad learning-rate policy: lr = %s (%s) at iteration %s%s; %s"
               % (fmt(bad.value), what, bad.iteration,
                  ", lr_policy \"%s\"" % policy if policy else "", why))
    if model.first_bad is not None and model.first_bad[1] != "lr":
        point = model.first_bad[0]
        if point.line > bad.line:
            message += "; the loss went non-finite after it (line %d)" % point.line
    fix += "; `safe-layers lint SOLVER` simulates the schedule before training"
    evidence = [bad, model.solver_point("lr_policy"), model.solver_point(field) if field else None]
    after = model.loss.bad
    if after is not None and after.line > bad.line:
        evidence.append(after)
    return finding(model, BAD_POLICY, "error", bad, message, fix, evidence, policy=policy, field=field,
                   lr=bad.value)


def rate_zero(model):
    """SL811: the first iteration whose rate is 0 after a positive one."""
    if model.lr_first_zero is None:
        return None
    point = model.lr_first_zero
    policy = model.lr_policy()
    fields = model.solver.fields if model.solver is not None else {}
    field = {"step": "gamma", "exp": "gamma", "multistep": "gamma"}.get(policy)
    if policy == "poly":
        field = "max_iter"
    message = ("the learning rate reached 0 at iteration %s%s: nothing learns from there on"
               % (point.iteration, " (lr_policy \"%s\"%s)" % (policy, ", gamma %s" % fields["gamma"]
                                                           if "gamma" in fields else "") if policy else ""))
    return finding(model, RATE_ZERO, "warning", point, message,
                   "check %s" % field if field else "check the solver's lr fields",
                   [model.lr_last_positive, point, model.solver_point("lr_policy")])
