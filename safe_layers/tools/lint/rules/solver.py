"""SL1xx: the solver. Every field the ``lr_policy`` reads, a simulation of the schedule
over every iteration the run executes (as ``SGDSolver::GetLearningRate`` computes it, in
float32 where Caffe does), and the update settings that turn training into NaN or into
nothing (``sgd_solver.cpp:27-70``;
the defaults of unset fields in ``caffe.proto``'s ``SolverParameter``)."""


from safe_layers.core import lr_policy
from safe_layers.core.float_text import six_digits
from safe_layers.core.params import ParamError
from safe_layers.core.schemas import SCHEMAS
from safe_layers.tools.lint.rules import rule

POLICY_FIELD = rule(
    "SL101", "error", "the lr_policy lacks a field it reads (warning where the schedule only degenerates to a constant)",
    doc="""
    SGDSolver::GetLearningRate reads different fields for each lr_policy: step reads
    stepsize and gamma, exp and inv gamma (inv also power), multistep stepvalue and gamma,
    poly power and max_iter, sigmoid gamma and stepsize (sgd_solver.cpp:27-70). An unset
    field is not an error to Caffe: it reads as its proto default, mostly 0
    (caffe.proto:146-175), so base_lr unset gives a rate of 0 and a step policy without
    stepsize fails CHECK_GT(stepsize, 0) at the first update (sgd_solver.cpp:33).
    """)
LR_BAD = rule(
    "SL102", "error", "the simulated learning rate turns NaN, infinite, negative (error) or zero (warning), first iteration and value",
    doc="""
    lint replays GetLearningRate (sgd_solver.cpp:27-70) in float32, as Caffe computes it,
    over every iteration the run executes, and reports the first iteration whose rate is
    NaN, infinite, negative or zero. The rate scales every update
    (sgd_solver.cpp:228-234): NaN or inf writes NaN into every weight at once, a negative
    rate climbs the loss, and 0 silently stops learning (a warning). Typical causes:
    gamma > 1 with exp or step, poly past max_iter, inv with a negative power.
    """)
POLICY_UNKNOWN = rule(
    "SL103", "error", "unknown or missing lr_policy: Caffe aborts at the first update",
    doc="""
    GetLearningRate knows fixed, step, exp, inv, multistep, poly and sigmoid; any other
    lr_policy, an empty one included, reaches LOG(FATAL) `Unknown learning rate policy`
    (sgd_solver.cpp:66-67). That happens at the first update, after the nets are built and
    possibly after a first test pass, so the run dies late. lr_policy has no default in
    caffe.proto (caffe.proto:171).
    """)
MAX_ITER_ZERO = rule(
    "SL104", "error", "max_iter 0: `caffe train` runs no iteration",
    doc="""
    Solver::Solve runs Step(max_iter - iter): with max_iter 0, its default when unset
    (caffe.proto:152), `caffe train` runs no iteration, snapshots the untrained net if asked
    and reports success (solver.cpp:287-308). A pycaffe loop calling solver.step() does
    run, which is why this is only a finding for the solver file.
    """)
MOMENTUM = rule(
    "SL105", "error", "momentum (or Adam's momentum2) >= 1: the update never decays",
    doc="""
    SGD keeps a history h = lr * grad + momentum * h and applies h (sgd_solver.cpp:231-234):
    with momentum 1 no past gradient ever fades and with more than 1 the step grows
    geometrically, so the weights overflow to inf and then NaN. Adam's bias correction
    divides by sqrt(1 - momentum2^t) (adam_solver.cpp:39-41), which is 0 (or NaN) for
    momentum2 >= 1.
    """)
WEIGHT_DECAY = rule(
    "SL106", "error", "negative weight_decay: weights grow instead of shrinking",
    doc="""
    Caffe adds weight_decay * w to each gradient before the update (L2 regularization,
    sgd_solver.cpp:156-171): a negative weight_decay pushes every weight away from 0 each
    iteration, so the weights grow exponentially until they overflow. Use a small positive
    value, or 0 for none.
    """)
CLIP_ZERO = rule(
    "SL107", "error", "clip_gradients 0 zeroes every gradient",
    doc="""
    SGDSolver::ClipGradients disables clipping for a negative clip_gradients (its default,
    -1: caffe.proto:186) and otherwise scales every gradient by clip_gradients / norm
    whenever the global L2 norm exceeds it (sgd_solver.cpp:88-104): with 0, any nonzero
    gradient is scaled by 0 and nothing ever learns, without a warning.
    """)
ITER_SIZE = rule(
    "SL108", "warning", "a safe_layers layer's iter_size differs from the solver's",
    doc="""
    With iter_size N, each solver iteration runs N forward/backward passes and one update
    (solver.cpp:230-233). A safe_layers layer counts its own passes and turns them into
    iteration numbers with its iter_size; when that differs from the solver's, its reports
    (and a watch that lines them up with Caffe's log) name the wrong iteration. harden
    --solver writes the solver's iter_size into every layer it inserts.
    """)
POLY_PAST = rule(
    "SL109", "warning", "poly: a run past max_iter gets NaN or a negative rate",
    doc="""
    The poly policy computes base_lr * (1 - iter/max_iter)^power (sgd_solver.cpp:56-59).
    Past max_iter the base is negative: a fractional power gives NaN, an odd integer power
    a negative rate. `caffe train` stops at max_iter, but a pycaffe loop that steps further,
    or a run restored from a snapshot with a raised iteration count, gets the NaN rate and
    NaN weights at the next update.
    """)
DELTA = rule(
    "SL110", "error", "delta <= 0 for an adaptive solver: 0/0 where a gradient is 0",
    doc="""
    AdaGrad, RMSProp, AdaDelta and Adam divide each update by sqrt(history) + delta
    (adagrad_solver.cpp:33-43, rmsprop_solver.cpp:36-45, adam_solver.cpp:62-69): delta
    (1e-8 by default, caffe.proto:219) is what keeps that denominator above 0 for a
    parameter whose gradients have all been 0. With delta <= 0 such a parameter's update
    is 0/0 = NaN, and the NaN spreads from that weight to the whole net.
    """)

ADAPTIVE = ("AdaGrad", "RMSProp", "AdaDelta", "Adam")
SOLVER_TYPE_NAMES = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}

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

    known = _check_policy_fields(msg, add)
    if not msg.max_iter:
        if iterations is None:
            add(MAX_ITER_ZERO, "max_iter", "max_iter is %s: `caffe train` runs no iteration (it "
                "stops at once and, if asked, snapshots the untrained net)"
                % ("0" if msg.HasField("max_iter") else "not set (0)"),
                "set max_iter to the number of iterations to train")
        else:
            # --iterations declares a pycaffe loop, which max_iter does not bound.
            add(MAX_ITER_ZERO, "max_iter", "max_iter is %s: fine for the pycaffe loop of %d "
                "iterations given with --iterations, but `caffe train` would run none"
                % ("0" if msg.HasField("max_iter") else "not set (0)", iterations),
                "set max_iter if this solver is also used with `caffe train`", severity="info")
    if known:
        _check_schedule(msg, add, iterations, report, path)
    _check_update_settings(msg, add)


def _check_policy_fields(msg, add):
    """POLICY_UNKNOWN / POLICY_FIELD: the policy is one Caffe knows, and the fields it
    reads are set. Returns whether the policy is known."""
    policy = msg.lr_policy
    known = policy in lr_policy.POLICIES
    if not known:
        what = "lr_policy %r is unknown" % policy if policy else "no lr_policy"
        add(POLICY_UNKNOWN, "lr_policy" if policy else None,
            "%s: Caffe stops at the first update with 'Unknown learning rate policy: %s'" % (what, policy),
            "lr_policy: one of %s" % ", ".join(lr_policy.POLICIES))
    else:
        if not msg.HasField("base_lr"):
            add(POLICY_FIELD, "lr_policy", "lr_policy %r: base_lr is not set, so it reads as 0 and "
                "nothing learns" % policy, "set base_lr (e.g. base_lr: 0.01)")
        for field, consequence, severity in lr_policy.NEEDS[policy]:
            if not lr_policy.is_set(msg, field):
                add(POLICY_FIELD, "lr_policy", "lr_policy %r reads %s, which is not set: %s"
                    % (policy, field, consequence), "set %s" % field, severity=severity,
                    data={"field": field})
    return known


def _check_schedule(msg, add, iterations, report, path):
    """LR_BAD / POLY_PAST: the rate simulated over every iteration the run executes, and
    poly past max_iter."""
    policy = msg.lr_policy
    stop = iterations if iterations is not None else max(msg.max_iter, 1)
    how = ("over the %d iterations given with --iterations" % stop if iterations is not None
           else "over the %d iteration%s the run executes" % (stop, "s" if stop != 1 else ""))
    if iterations is None and msg.max_iter == 0:
        how = "at iteration 0 (a pycaffe solver.step(); `caffe train` runs none)"
    fatal = lr_policy.fatal_problem(msg)
    if fatal:
        if not any(f.rule == POLICY_FIELD and f.severity == "error" and f.path == path
                   for f in report.findings):
            add(POLICY_FIELD, "lr_policy", fatal, "a positive stepsize and gamma >= 0")
    else:
        bad = lr_policy.first_bad(lr_policy.rates(msg, 0, stop))
        if bad is not None:
            iteration, value, kind = bad
            severity = "warning" if kind == "zero" else "error"
            field, why = lr_policy.explain(msg, iteration, value)
            add(LR_BAD, "lr_policy",
                "lr_policy %r simulated %s: the learning rate is %s at iteration %d: lr = %s (%s)"
                % (policy, how, kind, iteration, six_digits(value), why),
                lr_policy.fix(msg, iteration, value), severity=severity,
                data={"iteration": iteration, "lr": value, "kind": kind, "simulated": stop,
                      "field": field})
    if policy == "poly" and msg.max_iter and (iterations is None or iterations <= msg.max_iter):
        if msg.power != int(msg.power) or int(msg.power) % 2 == 1:
            result = "NaN" if msg.power != int(msg.power) else "negative"
            add(POLY_PAST, "lr_policy", "lr_policy 'poly' with power %g: a run that goes past "
                "max_iter %d (a pycaffe loop, a restored snapshot) gets a %s learning rate "
                "from iteration %d" % (msg.power, msg.max_iter, result, msg.max_iter + 1),
                "stop at max_iter (solver.step(max_iter - solver.iter)), or raise max_iter")


def _check_update_settings(msg, add):
    """MOMENTUM, WEIGHT_DECAY, CLIP_ZERO, DELTA: the update settings."""
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
            "nothing learns",
            "remove clip_gradients (or -1) to disable, or a positive L2 bound such as 35")
    if kind in ADAPTIVE and msg.HasField("delta") and msg.delta <= 0:
        add(DELTA, "delta", "solver type %s with delta %g: the update divides by sqrt(history) + "
            "delta, which is 0 for a parameter whose gradient has been 0" % (kind, msg.delta),
            "delta: 1e-8")


def check_iter_size(solver, nets, report):
    """SL108: our layers' iter_size against the solver's. ``nets`` are Prototxts. One
    finding per net and wrong value, at the first such layer, naming them all (harden
    writes one guard per layer: SqueezeNet's eight were eight copies of one message)."""
    wanted = solver.message.iter_size or 1
    seen = set()
    groups = {}  # (net path, iter_size) -> [(layer, node)]
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
                groups.setdefault((net.path, params.iter_size), []).append((layer, node))
    for (path, iter_size), layers in groups.items():
        layer, node = layers[0]
        where = node.find("python_param.param_str") or node
        if len(layers) == 1:
            what = "%s '%s' has" % (layer.python_param.layer, layer.name)
        else:
            names = ", ".join("'%s'" % l.name for l, _ in layers[:5]) + (", ..." if len(layers) > 5 else "")
            what = "%d safe_layers layers (%s) have" % (len(layers), names)
        report.add(path, where, ITER_SIZE,
                   "%s iter_size %d but the solver %s has iter_size %d: %s reports would name "
                   "iteration %s where Caffe is at iteration N"
                   % (what, iter_size, solver.path, wanted, "its" if len(layers) == 1 else "their",
                      "N*%d/%d" % (wanted, iter_size)),
                   "iter_size: %d in %s param_str (harden --solver writes it)"
                   % (wanted, "its" if len(layers) == 1 else "their"),
                   layer=layer.name, data={"iter_size": iter_size, "solver_iter_size": wanted,
                                           "layers": [l.name for l, _ in layers]})