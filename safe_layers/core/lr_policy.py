"""Caffe's learning-rate policies: one model for every tool that reads a solver.

What each ``lr_policy`` reads, which settings make Caffe abort, the rate it computes at any
iteration, and why a rate came out NaN, infinite, negative or zero, as
``SGDSolver<float>::GetLearningRate`` does it (``sgd_solver.cpp:27-70``). Used by

* ``safe-layers lint``: the fields each policy needs, and the schedule simulated over
  every iteration the run executes (:func:`rates`, :func:`first_bad`);
* the watch: the rate of each iteration and, when it is bad, why (:func:`describe`);
* ``safe-layers diagnose``: why an ``lr = nan`` line of a log is what it is, from the
  solver block the log prints (:class:`LogFields`).

No caffe import: ``param`` is anything with SolverParameter's field names and
``HasField`` (a ``caffe_pb2.SolverParameter``, or :class:`LogFields`).
"""

import math
import re

import numpy

POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")

# policy -> [(field, what happens without it, severity)]
NEEDS = {
    "fixed": [],
    "step": [("stepsize", "Caffe aborts at the first update (CHECK_GT stepsize 0)", "error"),
             ("gamma", "gamma reads as 0: lr becomes 0 at the first step", "error")],
    "exp": [("gamma", "gamma reads as 0: lr is 0 from iteration 1", "error")],
    "inv": [("gamma", "gamma reads as 0: the schedule is a constant base_lr", "warning"),
            ("power", "power reads as 0: the schedule is a constant base_lr", "warning")],
    "multistep": [("stepvalue", "no steps: the schedule is a constant base_lr", "warning"),
                  ("gamma", "gamma reads as 0: lr becomes 0 at the first stepvalue", "error")],
    "poly": [("max_iter", "max_iter reads as 0: lr = base_lr*(1 - iter/0)^power is NaN at iteration "
              "0 and infinite after (pycaffe), and `caffe train` runs no iteration", "error"),
             ("power", "power reads as 0: the schedule is a constant base_lr", "warning")],
    "sigmoid": [("gamma", "gamma reads as 0: the schedule is a constant base_lr/2", "warning"),
                ("stepsize", "Caffe aborts at the first update (CHECK_GT stepsize 0)", "error")],
}

F32 = numpy.float32


def is_set(param, field):
    """Whether the solver sets ``field`` (``stepvalue``: any value)."""
    if field == "stepvalue":
        return len(param.stepvalue) > 0
    return param.HasField(field)


def fields_text(param, policy=None):
    """'base_lr=0.01, max_iter unset (0), power=0.9': the fields ``policy`` reads."""
    policy = policy or param.lr_policy
    parts = []
    for field in ["base_lr"] + [f for f, _, _ in NEEDS.get(policy, [])]:
        if field == "stepvalue":
            parts.append("stepvalue=%s" % list(param.stepvalue) if param.stepvalue else "stepvalue unset")
            continue
        value = getattr(param, field)
        parts.append("%s=%g" % (field, value) if is_set(param, field) else "%s unset (%g)" % (field, value))
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


def rates(param, start, stop):
    """The rate of each iteration in [start, stop) as float32, computed as Caffe's
    ``GetLearningRate<float>`` computes it (float32 where Caffe's Dtype is, double where
    C++ promotes: ``pow(float, int)``). Raises ValueError with :func:`fatal_problem`'s
    message where Caffe would abort instead."""
    problem = fatal_problem(param)
    if problem:
        raise ValueError(problem)
    policy = param.lr_policy
    it = numpy.arange(start, stop, dtype=numpy.int64)
    base, gamma, power = F32(param.base_lr), F32(param.gamma), F32(param.power)
    with numpy.errstate(all="ignore"):
        if policy == "fixed":
            rate = numpy.full(it.shape, base, F32)
        elif policy == "step":
            current = it // param.stepsize
            rate = (numpy.float64(base) * numpy.power(numpy.float64(gamma), current.astype(numpy.float64)))
        elif policy == "exp":
            rate = numpy.float64(base) * numpy.power(numpy.float64(gamma), it.astype(numpy.float64))
        elif policy == "inv":
            rate = base * numpy.power(F32(1) + gamma * it.astype(F32), -power).astype(F32)
        elif policy == "multistep":
            steps = multistep_steps(list(param.stepvalue), start, stop)
            rate = numpy.float64(base) * numpy.power(numpy.float64(gamma), steps.astype(numpy.float64))
        elif policy == "poly":
            fraction = it.astype(F32) / F32(param.max_iter)
            rate = base * numpy.power(F32(1) - fraction, power).astype(F32)
        else:  # sigmoid
            rate = base * (F32(1) / (F32(1) + numpy.exp(-gamma * (it.astype(F32) - F32(param.stepsize)))))
        return numpy.asarray(rate).astype(F32)  # a double too big for float32 is inf, as in C++


def rate(param, iteration):
    """The rate Caffe computes at ``iteration`` (see :func:`rates`)."""
    return float(rates(param, iteration, iteration + 1)[0])


def multistep_steps(stepvalues, start, stop):
    """Caffe's ``current_step_`` at each iteration in [start, stop): it advances by at most
    one per call (one call per iteration, from iteration 0), when iter >= the next
    stepvalue. For strictly increasing stepvalues that is the count of stepvalues reached
    (a binary search); otherwise the calls are replayed from iteration 0."""
    if all(a < b for a, b in zip(stepvalues, stepvalues[1:])) and (not stepvalues or stepvalues[0] >= 0):
        return numpy.searchsorted(numpy.asarray(stepvalues, numpy.int64),
                                  numpy.arange(start, stop, dtype=numpy.int64), side="right")
    steps = numpy.empty(max(stop - start, 0), numpy.int64)
    current = 0
    for i in range(0, stop):
        if current < len(stepvalues) and i >= stepvalues[current]:
            current += 1
        if i >= start:
            steps[i - start] = current
    return steps


def kind_of(lr):
    """'NaN', 'infinite', 'negative', 'zero' or None (a usable rate)."""
    if math.isnan(lr):
        return "NaN"
    if math.isinf(lr):
        return "infinite"
    if lr < 0:
        return "negative"
    if lr == 0:
        return "zero"
    return None


def first_bad(rate_array, start=0):
    """(iteration, value, kind) of the first NaN / infinite / negative / zero rate, or None."""
    bad = ~numpy.isfinite(rate_array) | (rate_array <= 0)
    if not bad.any():
        return None
    i = int(numpy.argmax(bad))
    value = float(rate_array[i])
    return start + i, value, kind_of(value)


def explain(param, iteration, lr):
    """(field to fix, why) for a rate ``lr`` at ``iteration`` that is NaN, infinite,
    negative or zero; field is None where no single field is to blame."""
    policy = param.lr_policy
    kind = kind_of(lr)

    def unset(field):
        return "unset (0)" if not is_set(param, field) else "%g" % getattr(param, field)

    if not math.isfinite(param.base_lr):
        return "base_lr", "base_lr itself is %g" % param.base_lr
    if param.base_lr == 0:
        return "base_lr", "base_lr is %s: nothing learns" % unset("base_lr")
    if param.base_lr < 0:
        return "base_lr", "base_lr is negative (%g): every rate is, and the solver climbs the loss" % param.base_lr
    if not policy:
        return "lr_policy", "no lr_policy: Caffe aborts at the first update"
    if policy not in POLICIES:
        return "lr_policy", "unknown lr_policy %r" % policy
    if policy == "poly":
        if param.max_iter <= 0:
            return "max_iter", ("poly computes base_lr * (1 - iter/max_iter)^power and max_iter is %s: "
                                "0/0 = NaN at iteration 0, +-inf after (pycaffe's solver.step(); "
                                "`caffe train` runs no iteration)" % unset("max_iter"))
        if iteration > param.max_iter:
            return "max_iter", ("iteration %d is past max_iter %d: 1 - iter/max_iter < 0, and its power "
                                "%g is %s" % (iteration, param.max_iter, param.power,
                                              "NaN" if kind == "NaN" else "negative"))
        if iteration == param.max_iter:
            return "max_iter", "poly reaches 0 at max_iter %d" % param.max_iter
        return "power", "power %g" % param.power
    if policy in ("step", "exp", "multistep"):
        if param.gamma == 0:
            return "gamma", "gamma is %s, so the rate is 0 after the first step" % unset("gamma")
        if param.gamma > 1 and kind in ("infinite", "NaN"):
            return "gamma", ("gamma %g > 1 grows the rate by that factor each %s until it overflows"
                             % (param.gamma, "iteration" if policy == "exp" else "step"))
        if kind == "zero":
            return "gamma", "gamma %g to that many %ss underflows float32" % (
                param.gamma, "iteration" if policy == "exp" else "step")
        return "gamma", "gamma %g" % param.gamma
    if policy == "inv":
        if param.power < 0:
            return "power", "power %g < 0 makes the rate grow with iter" % param.power
        return "power", "inv computes base_lr * (1 + gamma*iter)^-power (gamma %g, power %g)" % (
            param.gamma, param.power)
    if policy == "sigmoid":
        if kind == "zero":
            return "gamma", ("exp(-gamma*(iter-stepsize)) overflows, so the sigmoid ramp is 0 here: "
                             "gamma %g is too steep for stepsize %d" % (param.gamma, param.stepsize))
        return "stepsize", "sigmoid reads gamma %g and stepsize %d" % (param.gamma, param.stepsize)
    return "base_lr", "fixed uses base_lr as it is"


def fix(param, iteration, lr):
    """The concrete change to the solver that makes the rate at ``iteration`` usable."""
    field, _ = explain(param, iteration, lr)
    policy = param.lr_policy
    if field == "base_lr":
        return "a positive, finite base_lr (e.g. base_lr: 0.01)"
    if field == "lr_policy":
        return "lr_policy: one of %s" % ", ".join(POLICIES)
    if policy == "poly" and param.max_iter <= 0:
        return "set max_iter (the iteration where the rate reaches 0)"
    if policy == "poly" and iteration >= param.max_iter:
        return "keep the run within max_iter, or raise max_iter"
    if field == "gamma" and param.gamma > 1:
        return "gamma below 1 (e.g. 0.9999)"
    if field == "gamma" and param.gamma == 0:
        return "set gamma (e.g. 0.1)"
    return "check %s so the rate stays positive and finite" % (field or "gamma, power and stepsize")


def describe(param, iteration, lr):
    """'lr_policy "poly" (base_lr=0.01, max_iter unset (0), power=0.9) gives lr = nan at
    iteration 0: <why>' for a bad rate."""
    _, why = explain(param, iteration, lr)
    return 'lr_policy "%s" (%s) gives lr = %s at iteration %d: %s' % (
        param.lr_policy, fields_text(param), "%g" % lr, iteration, why)


_DESCRIBED = re.compile(r'lr_policy "(?P<policy>[^"]*)" \((?P<fields>.*?)\) gives lr = (?P<lr>\S+) at '
                        r'iteration (?P<iteration>-?\d+): (?P<why>.*)$')


def parse_described(text):
    """What :func:`describe` wrote, read back from a message (a watch's 'lr' line):
    {policy, fields (text), lr (float), iteration, why}, or None for another text."""
    match = _DESCRIBED.search(text)
    if match is None:
        return None
    g = match.groupdict()
    return {"policy": g["policy"], "fields": g["fields"], "lr": float(g["lr"]),
            "iteration": int(g["iteration"]), "why": g["why"]}


class LogFields:
    """SolverParameter's numeric fields over the solver block a Caffe log prints
    ("Initializing solver from parameters:"), for :func:`explain`: ``fields`` maps a
    field to its text; an absent field reads as Caffe's default and ``HasField`` is
    False for it, as for the message."""

    _TEXT = ("lr_policy",)

    def __init__(self, fields):
        self._fields = dict(fields)
        self.stepvalue = [int(float(v)) for v in self._list("stepvalue")]

    def _list(self, name):
        value = self._fields.get(name)
        if value is None:
            return []
        return value if isinstance(value, (list, tuple)) else [value]

    def HasField(self, name):  # noqa: N802 - protobuf's spelling
        return name in self._fields

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        value = self._fields.get(name)
        if name in self._TEXT:
            return (value or "").strip('"')
        if value is None:
            return 0
        try:
            number = float(value)
        except (TypeError, ValueError):
            return 0
        return int(number) if name in ("max_iter", "stepsize") else number
