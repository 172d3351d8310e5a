"""SL808: the run aborted: a Caffe CHECK or LOG(FATAL), a Python layer's exception, a
crash signal."""

import re

from safe_layers.tools import rule_table
from safe_layers.tools.diagnose.rules.evidence import finding
from safe_layers.tools.diagnose.series import Point

ABORTED = rule_table.rule("diagnose", "SL808", "error", "the run aborted", """
    Caffe stops a run with a failed CHECK or a LOG(FATAL) (glog's ``F`` line, then a
    stack trace), or the process dies of a signal. A Python layer's exception surfaces
    as ``error_already_set`` (caught and printed by caffe.cpp:441 when Caffe is built
    with WITH_PYTHON_LAYER). The finding gives Caffe's own message and what the check
    is about when its place says (the learning-rate policy's fields in sgd_solver.cpp,
    a record's shape in data_transformer.cpp). A crash after non-finite values reached
    MAX pooling is named: over an all-NaN window the mask stays -1
    (pooling_layer.cpp:158-183) and the CPU backward writes one element before the
    blob (pooling_layer.cpp:270-272), which corrupts the heap.""")


def _fatal_fix(model, event):
    """The fix for a Caffe CHECK / LOG(FATAL) whose place says what it is about, and data."""
    source, message = event.source or "", event.message
    if source.startswith("sgd_solver.cpp") or "learning rate policy" in message:
        # SGDSolver::GetLearningRate checks the fields each policy reads.
        field = re.search(r"param_\.(\w+)\(\)", message)
        field = field.group(1) if field else None
        policy = model.lr_policy()
        return ("bad learning-rate policy%s: %s; `safe-layers lint SOLVER` checks every policy's "
                "fields before training" % (
                    " (lr_policy \"%s\")" % policy if policy else "",
                    "fix %s in the solver" % field if field else "fix the solver's lr fields"),
                {"cause": "bad learning-rate policy", "field": field, "policy": policy})
    if source.startswith("data_transformer.cpp"):
        return ("a record's shape differs from what the data layer expects (another record's, "
                "crop_size or the mean's): `safe-layers scan SOURCE` names the records whose "
                "shape differs", {"cause": "faulty input"})
    return "Caffe's own message names the check that failed", {}


def fatal(model):
    """SL808: a Caffe CHECK / LOG(FATAL)."""
    if model.fatal is None:
        return None
    event = model.fatal
    point = Point(model.iteration, None, event.line, event.text)
    fix, data = _fatal_fix(model, event)
    evidence = [point] + ([model.solver_point(data["field"])] if data.get("field") else [])
    return finding(model, ABORTED, "error", point,
                   "the run aborted at %s: %s" % (event.source or "?", event.message),
                   fix, evidence, source=event.source, **data)


def python_error(model):
    """SL808: a Python layer raised."""
    if model.python_error is None:
        return None
    event = model.python_error
    point = Point(model.iteration, None, event.line, event.text)
    evidence = [point] + ([Point(None, None, model.crash.line, model.crash.text)]
                          if model.crash is not None else [])
    return finding(model, ABORTED, "error", point, "the run aborted: %s" % event.message,
                   "a Python layer raised; its report and traceback are above "
                   "this line", evidence, error=event.error)


def crash(model):
    """SL808: the process crashed (without a Python layer's exception to explain it)."""
    if model.crash is None or model.python_error is not None:
        return None
    event = model.crash
    point = Point(model.iteration, None, event.line, event.text)
    signal = model.crash_signal.signal if model.crash_signal is not None else None
    message = "the process crashed: %s" % event.message
    if signal and signal not in event.message:
        message += " (%s)" % signal
    fix = "see the lines above it"
    if "error_already_set" in event.message:
        fix = ("a Python layer raised under a caffe binary built without WITH_PYTHON_LAYER; "
               "its report is above this line")
    pooling = [l.name for l in model.train_layers()
               if l.type == "Pooling" and l.params.get("pooling_param.pool", "MAX") == "MAX"]
    if model.first_bad is not None and pooling and "error_already_set" not in event.message:
        message += (" after non-finite values reached MAX pooling (%s): over an all-NaN window "
                    "Caffe's CPU backward writes one element outside the blob, which corrupts "
                    "the heap" % ", ".join(pooling[:6]))
        fix = ("keep NaN out of MAX pooling: a NaNGuard (action: clamp or abort) before "
               "'%s' and the cause above" % pooling[0])
    evidence = [point] + ([Point(None, None, model.crash_signal.line, model.crash_signal.text)]
                          if model.crash_signal is not None else [])
    return finding(model, ABORTED, "error", point, message, fix, evidence, signal=signal)
