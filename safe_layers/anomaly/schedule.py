"""Caffe's learning-rate policies (``SGDSolver::GetLearningRate``), read from a
SolverParameter: which settings make Caffe abort, and why a rate came out bad.

No caffe import: the parameter is any object with SolverParameter's field names (the
``caffe_pb2`` message :mod:`safe_layers.tools.prototxt` reads).
"""

import math

import numpy

POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")

# The solver fields each policy reads (caffe-internals.md section 4).
FIELDS = {
    "fixed": ("base_lr",),
    "step": ("base_lr", "gamma", "stepsize"),
    "exp": ("base_lr", "gamma"),
    "inv": ("base_lr", "gamma", "power"),
    "multistep": ("base_lr", "gamma", "stepvalue"),
    "poly": ("base_lr", "max_iter", "power"),
    "sigmoid": ("base_lr", "gamma", "stepsize"),
}


def _set(param, field):
    if field == "stepvalue":
        return len(param.stepvalue) > 0
    return param.HasField(field) if hasattr(param, "HasField") else True


def fields_text(param, policy=None):
    """'base_lr=0.01, max_iter unset (0), power=0.9': the fields ``policy`` reads."""
    policy = policy or param.lr_policy
    parts = []
    for field in FIELDS.get(policy, ("base_lr",)):
        if field == "stepvalue":
            parts.append("stepvalue=%s" % list(param.stepvalue) if param.stepvalue else
                         "stepvalue unset")
            continue
        value = getattr(param, field)
        parts.append("%s=%g" % (field, value) if _set(param, field) else
                     "%s unset (%g)" % (field, value))
    return ", ".join(parts)


def fatal_problem(param):
    """The message of the CHECK / LOG(FATAL) Caffe hits computing the rate, or None.

    Those abort the whole process (a Python interpreter too), so a tool must ask this
    before it touches ``solver.lr`` or ``solver.step``.
    """
    policy = param.lr_policy
    if policy not in POLICIES:
        return ("lr_policy %r is not one Caffe knows (%s): Caffe aborts with \"Unknown learning "
                "rate policy\" at the first update" % (policy, ", ".join(POLICIES)))
    if policy in ("step", "sigmoid") and param.stepsize <= 0:
        return ("lr_policy %r needs stepsize > 0 (it is %d): Caffe aborts with CHECK_GT(stepsize, 0) "
                "at the first update" % (policy, param.stepsize))
    if policy in ("step", "exp", "inv", "multistep", "sigmoid") and param.gamma < 0:
        return ("lr_policy %r needs gamma >= 0 (it is %g): Caffe aborts with CHECK_GE(gamma, 0) at "
                "the first update" % (policy, param.gamma))
    return None


def rate(param, iteration):
    """The rate Caffe computes at ``iteration`` (float32 arithmetic, as Caffe's Dtype).

    ``multistep`` counts the stepvalues reached, which is Caffe's value when they are
    increasing (Caffe moves at most one step per call, and its counter is solver state
    that pycaffe cannot read: this is why the watch computes it rather than asking
    ``solver.lr``, whose call would move that counter).
    """
    f = numpy.float32
    policy, base, gamma, power = param.lr_policy, f(param.base_lr), f(param.gamma), f(param.power)
    with numpy.errstate(all="ignore"):
        if policy == "fixed":
            return float(base)
        if policy == "step":
            return float(base * f(math.pow(gamma, iteration // param.stepsize)))
        if policy == "exp":
            return float(base * numpy.power(gamma, f(iteration)))
        if policy == "inv":
            return float(base * numpy.power(f(1) + gamma * f(iteration), -power))
        if policy == "multistep":
            steps = sum(1 for v in param.stepvalue if iteration >= v)
            return float(base * f(math.pow(gamma, steps)))
        if policy == "poly":
            return float(base * numpy.power(f(1) - f(iteration) / f(param.max_iter), power))
        if policy == "sigmoid":
            return float(base * (f(1) / (f(1) + numpy.exp(-gamma * (f(iteration) - f(param.stepsize))))))
    raise ValueError("unknown lr_policy %r" % policy)


def explain(param, iteration, lr):
    """Why the rate ``lr`` at ``iteration`` is non-finite, negative or zero: the policy,
    its formula and the fields that cause it."""
    policy = param.lr_policy
    fields = fields_text(param, policy)
    bad = ("nan" if math.isnan(lr) else "inf" if math.isinf(lr) and lr > 0 else
           "-inf" if math.isinf(lr) else "negative" if lr < 0 else "zero")
    head = 'lr_policy "%s" (%s) gives lr = %s at iteration %d' % (policy, fields, _num(lr), iteration)
    if param.base_lr == 0:
        return head + ": base_lr is %s" % ("unset (0)" if not _set(param, "base_lr") else "0")
    if param.base_lr < 0:
        return head + ": base_lr is negative, so every rate is"
    if policy == "poly":
        if param.max_iter <= 0:
            return head + (": poly computes base_lr * (1 - iter/max_iter)^power and max_iter is "
                           "%s: 0/0 = nan at iteration 0, +-inf after; set max_iter"
                           % ("unset (0)" if not _set(param, "max_iter") else param.max_iter))
        if iteration > param.max_iter:
            return head + (": iteration %d is past max_iter %d, so 1 - iter/max_iter < 0 and its "
                           "power %g is %s" % (iteration, param.max_iter, param.power,
                                               "nan" if bad == "nan" else "negative"))
        if iteration == param.max_iter:
            return head + ": poly reaches 0 at max_iter"
    if policy in ("exp", "step", "multistep") and param.gamma == 0:
        return head + ": gamma is %s, so the rate is 0 after the first step" % (
            "unset (0)" if not _set(param, "gamma") else "0")
    if policy in ("exp", "step", "multistep") and param.gamma > 1 and bad in ("inf", "nan"):
        return head + ": gamma %g > 1 grows the rate until it overflows" % param.gamma
    if policy == "inv" and param.power < 0:
        return head + ": power %g < 0 makes the rate grow with iter" % param.power
    if policy == "sigmoid" and bad == "zero":
        return head + (": exp(-gamma*(iter-stepsize)) overflows, so the sigmoid ramp is 0 here; "
                       "gamma %g is too steep for stepsize %d" % (param.gamma, param.stepsize))
    return head


def _num(value):
    return "%g" % value
