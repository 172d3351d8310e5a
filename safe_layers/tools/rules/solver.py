"""SL1xx: the solver. Every field the ``lr_policy`` reads, a simulation of the schedule
over every iteration the run executes (as ``SGDSolver::GetLearningRate`` computes it, in
float32 where Caffe does), and the update settings that turn training into NaN or into
nothing (see shared/docs/caffe-internals.md §4)."""

import math

import numpy as np

from safe_layers.tools.rules import rule

POLICY_FIELD = rule("SL101", "error", "the lr_policy lacks a field it reads (warning where the schedule only degenerates to a constant)")
LR_BAD = rule("SL102", "error", "the simulated learning rate turns NaN, infinite, negative (error) or zero (warning), first iteration and value")
POLICY_UNKNOWN = rule("SL103", "error", "unknown or missing lr_policy: Caffe aborts at the first update")
MAX_ITER_ZERO = rule("SL104", "error", "max_iter 0: `caffe train` runs no iteration")
MOMENTUM = rule("SL105", "error", "momentum (or Adam's momentum2) >= 1: the update never decays")
WEIGHT_DECAY = rule("SL106", "error", "negative weight_decay: weights grow instead of shrinking")
CLIP_ZERO = rule("SL107", "error", "clip_gradients 0 zeroes every gradient")
ITER_SIZE = rule("SL108", "warning", "a safe_layers layer's iter_size differs from the solver's")
POLY_PAST = rule("SL109", "warning", "poly: a run past max_iter gets NaN or a negative rate")
DELTA = rule("SL110", "error", "delta <= 0 for an adaptive solver: 0/0 where a gradient is 0")

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

ADAPTIVE = ("AdaGrad", "RMSProp", "AdaDelta", "Adam")
SOLVER_TYPE_NAMES = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}

F32 = np.float32


class UnknownPolicy(ValueError):
    pass


def learning_rates(solver, start, stop):
    """The learning rate of each iteration in [start, stop), as Caffe's
    ``SGDSolver<float>::GetLearningRate`` computes it (float32 results; the double
    intermediates where C++ promotes to double). ``solver`` is a SolverParameter."""
    policy = solver.lr_policy
    it = np.arange(start, stop, dtype=np.int64)
    base = F32(solver.base_lr)
    gamma, power = F32(solver.gamma), F32(solver.power)
    with np.errstate(all="ignore"):
        if policy == "fixed":
            rate = np.full(it.shape, base, F32)
        elif policy == "step":
            if solver.stepsize <= 0 or gamma < 0:
                raise UnknownPolicy("step needs stepsize > 0 and gamma >= 0 (Caffe aborts)")
            current = it // solver.stepsize
            rate = (np.float64(base) * np.power(np.float64(gamma), current.astype(np.float64))).astype(F32)
        elif policy == "exp":
            if gamma < 0:
                raise UnknownPolicy("exp needs gamma >= 0 (Caffe aborts)")
            rate = (np.float64(base) * np.power(np.float64(gamma), it.astype(np.float64))).astype(F32)
        elif policy == "inv":
            inner = F32(1) + gamma * it.astype(F32)
            rate = base * np.power(inner, -power).astype(F32)
        elif policy == "multistep":
            steps = _multistep_steps(list(solver.stepvalue), start, stop)
            rate = (np.float64(base) * np.power(np.float64(gamma), steps.astype(np.float64))).astype(F32)
        elif policy == "poly":
            fraction = it.astype(F32) / F32(solver.max_iter)
            rate = base * np.power(F32(1) - fraction, power).astype(F32)
        elif policy == "sigmoid":
            if gamma < 0 or solver.stepsize <= 0:
                raise UnknownPolicy("sigmoid needs gamma >= 0 and stepsize > 0 (Caffe aborts)")
            rate = base * (F32(1) / (F32(1) + np.exp(-gamma * (it.astype(F32) - F32(solver.stepsize)))))
        else:
            raise UnknownPolicy("Unknown learning rate policy: %s" % policy)
    return np.asarray(rate, F32)


def _multistep_steps(stepvalues, start, stop):
    """current_step_ at each iteration: Caffe advances it by at most one per call, when
    iter >= stepvalue[current_step_]; one call per iteration (ApplyUpdate)."""
    steps = np.empty(max(stop - start, 0), np.int64)
    current = 0
    # A resumed run starts with current_step_ restored; from 0 every step before start counts.
    for i in range(0, stop):
        if current < len(stepvalues) and i >= stepvalues[current]:
            current += 1
        if i >= start:
            steps[i - start] = current
    return steps


def first_bad_rate(rates, start=0):
    """(iteration, value, kind) of the first NaN / infinite / negative / zero rate, or None."""
    bad = ~np.isfinite(rates) | (rates <= 0)
    if not bad.any():
        return None
    i = int(np.argmax(bad))
    value = float(rates[i])
    if math.isnan(value):
        kind = "NaN"
    elif math.isinf(value):
        kind = "infinite"
    elif value < 0:
        kind = "negative"
    else:
        kind = "zero"
    return start + i, value, kind


def _fmt(value):
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return "%g" % value


def solver_type(solver):
    if solver.HasField("type"):
        return solver.type
    return SOLVER_TYPE_NAMES.get(solver.solver_type, "SGD")


def check(solver, report, iterations=None):
    """Findings for a solver Prototxt. ``iterations``: how many iterations the run executes
    (``--iterations``, e.g. a pycaffe loop), else max_iter (at least iteration 0)."""
    msg, root, path = solver.message, solver.root, solver.path

    def node(name):
        return root.find(name)

    def add(rule_id, field, message, fix="", severity=None, data=None):
        report.add(path, node(field) if field else None, rule_id, message, fix, severity=severity,
                   data=data)

    policy = msg.lr_policy
    known = policy in NEEDS
    if not known:
        what = "lr_policy %r is unknown" % policy if policy else "no lr_policy"
        add(POLICY_UNKNOWN, "lr_policy" if policy else None,
            "%s: Caffe stops at the first update with 'Unknown learning rate policy: %s'" % (what, policy),
            "lr_policy: one of %s" % ", ".join(sorted(NEEDS)))
    else:
        if not msg.HasField("base_lr"):
            add(POLICY_FIELD, "lr_policy", "lr_policy %r: base_lr is not set, so it reads as 0 and "
                "nothing learns" % policy, "set base_lr (e.g. base_lr: 0.01)")
        for field, consequence, severity in NEEDS[policy]:
            present = len(msg.stepvalue) > 0 if field == "stepvalue" else msg.HasField(field)
            if not present:
                add(POLICY_FIELD, "lr_policy", "lr_policy %r reads %s, which is not set: %s"
                    % (policy, field, consequence), "set %s" % field, severity=severity,
                    data={"field": field})

    if not msg.max_iter:
        add(MAX_ITER_ZERO, "max_iter", "max_iter is %s: `caffe train` runs no iteration (it stops "
            "at once and, if asked, snapshots the untrained net)"
            % ("0" if msg.HasField("max_iter") else "not set (0)"),
            "set max_iter to the number of iterations to train")

    if known:
        stop = iterations if iterations is not None else max(msg.max_iter, 1)
        how = ("over the %d iterations given with --iterations" % stop if iterations is not None
               else "over the %d iteration%s the run executes" % (stop, "s" if stop != 1 else ""))
        if iterations is None and msg.max_iter == 0:
            how = "at iteration 0 (a pycaffe solver.step(); `caffe train` runs none)"
        try:
            rates = learning_rates(msg, 0, stop)
        except UnknownPolicy as exc:
            rates = None
            if not any(f.rule == POLICY_FIELD and f.severity == "error" and f.path == path
                       for f in report.findings):
                add(POLICY_FIELD, "lr_policy", "lr_policy %r: Caffe aborts at the first update: %s "
                    "(stepsize %d, gamma %g)" % (policy, exc, msg.stepsize, msg.gamma),
                    "a positive stepsize and gamma >= 0")
        if rates is not None:
            bad = first_bad_rate(rates)
            if bad is not None:
                iteration, value, kind = bad
                severity = "warning" if kind == "zero" else "error"
                add(LR_BAD, "lr_policy",
                    "lr_policy %r simulated %s: the learning rate is %s at iteration %d: lr = %s%s"
                    % (policy, how, kind, iteration, _fmt(value), _explain(msg, kind, iteration)),
                    _lr_fix(msg, kind), severity=severity,
                    data={"iteration": iteration, "lr": value, "kind": kind, "simulated": stop})
        if policy == "poly" and msg.max_iter and (iterations is None or iterations <= msg.max_iter):
            if msg.power != int(msg.power) or int(msg.power) % 2 == 1:
                result = "NaN" if msg.power != int(msg.power) else "negative"
                add(POLY_PAST, "lr_policy", "lr_policy 'poly' with power %g: a run that goes past "
                    "max_iter %d (a pycaffe loop, a restored snapshot) gets a %s learning rate "
                    "from iteration %d" % (msg.power, msg.max_iter, result, msg.max_iter + 1),
                    "stop at max_iter (solver.step(max_iter - solver.iter)), or raise max_iter")

    kind = solver_type(msg)
    if msg.momentum >= 1:
        add(MOMENTUM, "momentum", "momentum %g >= 1: each update adds the previous one undamped, so "
            "the step grows without bound" % msg.momentum, "momentum below 1 (0.9 is customary)")
    if kind == "Adam" and msg.HasField("momentum2") and msg.momentum2 >= 1:
        add(MOMENTUM, "momentum2", "Adam's momentum2 %g >= 1: the second-moment correction "
            "1 - momentum2^t is 0 and the step is 0/0" % msg.momentum2, "momentum2: 0.999")
    if msg.weight_decay < 0:
        add(WEIGHT_DECAY, "weight_decay", "weight_decay %g is negative: regularization pushes the "
            "weights away from 0 every iteration" % msg.weight_decay,
            "weight_decay: 0.0005 (or 0 for none)")
    if msg.HasField("clip_gradients") and msg.clip_gradients == 0:
        add(CLIP_ZERO, "clip_gradients", "clip_gradients 0 scales every gradient by 0/norm: "
            "nothing learns (and a zero norm gives 0/0 = NaN)",
            "remove clip_gradients (or -1) to disable, or a positive L2 bound such as 35")
    if kind in ADAPTIVE and msg.HasField("delta") and msg.delta <= 0:
        add(DELTA, "delta", "solver type %s with delta %g: the update divides by sqrt(history) + "
            "delta, which is 0 for a parameter whose gradient has been 0" % (kind, msg.delta),
            "delta: 1e-8")


def _explain(msg, kind, iteration):
    policy = msg.lr_policy
    if policy == "poly" and msg.max_iter == 0:
        return " (iter/max_iter with max_iter unset divides by 0)"
    if policy == "poly" and iteration >= msg.max_iter:
        return " (iteration past max_iter %d: 1 - iter/max_iter < 0)" % msg.max_iter
    if policy == "exp" and kind == "infinite":
        return " (gamma %g > 1 grows without bound)" % msg.gamma
    if kind == "zero" and policy in ("exp", "step", "multistep", "inv") and msg.base_lr > 0:
        return " (the schedule underflows float32 or gamma is 0)"
    if kind in ("zero", "negative") and msg.base_lr <= 0:
        return " (base_lr is %g)" % msg.base_lr
    return ""


def _lr_fix(msg, kind):
    policy = msg.lr_policy
    if policy == "poly" and msg.max_iter == 0:
        return "set max_iter (the iteration where the rate reaches 0)"
    if policy == "poly":
        return "keep the run within max_iter, or raise max_iter"
    if policy == "exp" and kind == "infinite":
        return "gamma below 1 (e.g. 0.9999)"
    if msg.base_lr <= 0:
        return "a positive base_lr"
    return "check gamma/power/stepsize so the rate stays positive and finite"


def check_iter_size(solver, nets, report):
    """SL108: our layers' iter_size against the solver's. ``nets`` are Prototxts."""
    from safe_layers.schemas import SCHEMAS
    from safe_layers.params import ParamError
    wanted = solver.message.iter_size or 1
    seen = set()
    for net in nets:
        for layer, node in net.layers():
            if layer.type != "Python" or not layer.python_param.module.startswith("safe_layers"):
                continue
            schema = SCHEMAS.get(layer.python_param.layer)
            if schema is None or (net.path, node.start) in seen:
                continue
            seen.add((net.path, node.start))
            try:
                params = schema.parse(layer.python_param.param_str)
            except ParamError:
                continue  # SL601 says what is wrong with it
            if params.iter_size != wanted:
                where = node.find("python_param.param_str") or node
                report.add(net.path, where, ITER_SIZE,
                           "%s '%s' has iter_size %d but the solver %s has iter_size %d: its reports "
                           "would name iteration %s where Caffe is at iteration N"
                           % (layer.python_param.layer, layer.name, params.iter_size, solver.path,
                              wanted, "N*%d/%d" % (wanted, params.iter_size)),
                           "iter_size: %d in its param_str (harden --solver writes it)" % wanted,
                           layer=layer.name, data={"iter_size": params.iter_size, "solver_iter_size": wanted})
