"""SL810: gradient clipping (``clip_gradients`` in the solver)."""

from safe_layers.tools import rule_table
from safe_layers.tools.diagnose.rules.evidence import finding
from safe_layers.tools.diagnose.series import fmt

CLIPPING = rule_table.rule("diagnose", "SL810", "info", "gradient clipping", """
    With clip_gradients set, SGDSolver::ClipGradients (sgd_solver.cpp:88-106) scales all
    gradients down when their L2 norm exceeds it and logs each time. It does not guard
    against non-finite values: a NaN norm fails the comparison and passes unscaled, an
    infinite one gives the scale factor 0 and 0 * inf = NaN weights. An error when a
    non-finite norm was logged; otherwise a note of how often it clipped, and the largest
    norm.""")


def clipping(model):
    """SL810: a non-finite clipped norm (error), else how often clipping acted (info)."""
    if not model.clips:
        return None
    if model.clip_bad is not None:
        message = ("gradient clipping saw a non-finite L2 norm (%s) at iteration %s: Caffe's "
                   "clip_gradients lets a NaN norm pass and turns an inf norm into NaN weights"
                   % (fmt(model.clip_bad.value), model.clip_bad.iteration))
        return finding(model, CLIPPING, "error", model.clip_bad, message,
                       "find the first non-finite gradient (above); GradientClip layers zero "
                       "non-finite elements before the norm", [model.clip_bad])
    limit = model.solver_field("clip_gradients")
    message = ("gradient clipping scaled gradients down %d times (largest L2 norm %s at iteration "
               "%s%s)" % (model.clips, fmt(model.clip_max.value) if model.clip_max else "?",
                         model.clip_max.iteration if model.clip_max else "?",
                         ", limit %s" % limit if limit else ""))
    return finding(model, CLIPPING, "info", model.clip_first, message, "",
                   [model.clip_first, model.clip_max], clips=model.clips)
