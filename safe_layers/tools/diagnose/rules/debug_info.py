"""SL804, SL805: what debug_info's per-layer lines show (``debug_info: true`` in the
solver: Net::ForwardDebugInfo and Net::BackwardDebugInfo, net.cpp:588-640, log the mean
|value| of every top, parameter and gradient blob on each display iteration)."""

from safe_layers.readers import layer_types
from safe_layers.tools import rule_table
from safe_layers.tools.diagnose.rules.evidence import finding
from safe_layers.tools.diagnose.rules.loss import EXPLODING
from safe_layers.tools.diagnose.series import finite, fmt

GROWTH_SHOWN = 10         # a gradient that grew less than this is not named (SL805)

FIRST_LAYER = rule_table.rule("diagnose", "SL804", "error", "debug_info: the first non-finite layer", """
    With debug_info, Caffe logs the mean |value| of every layer's tops and weights in
    forward order and of every gradient in backward order (net.cpp:588-640, on display
    iterations: solver.cpp:227). The first non-finite one in forward order is the layer
    that made the NaN from finite inputs (or the data layer, when the input itself is
    non-finite); without a bad forward value, the first non-finite gradient. The finding
    names that layer, its type and what that type is known to do (pooling windows outside
    the input, BatchNorm at zero statistics, InfogainLoss's H); where the layer's own
    weights are non-finite in the same pass (logged after its tops), it says the output
    follows from them, not from what the layer does.""")

FASTEST_GRADIENT = rule_table.rule("diagnose", "SL805", "warning",
                                   "debug_info: the gradient that grew fastest", """
    Of the gradients debug_info logged in the iterations before the first non-finite
    value (the last 8 of each), the one whose mean |diff| grew most, when it grew 10x or
    more: where to clip or lower an lr_mult. An error when the cause is exploding
    gradients (SL802), a warning otherwise.""")


def first_layer(model):
    """SL804: the first non-finite top or weights in forward order."""
    if model.first_bad_forward is None:
        return None
    point, event = model.first_bad_forward
    evidence = [point]
    layer = model.layer_named(event.layer)
    kind = " (%s)" % layer.type if layer is not None and layer.type else ""
    if event.blob_kind == "param":
        message = ("debug_info: the first non-finite value in forward order is layer '%s'%s's "
                   "weights (param blob %s = %s) at iteration %s: the update of an earlier "
                   "iteration made them non-finite" % (event.layer, kind, event.blob,
                                                        fmt(event.value), point.iteration))
        fix = "see the first non-finite gradient (backward) and the cause above"
    elif model.first_bad_forward_param is not None:
        # Its own weights were non-finite in the same pass: the output follows from them,
        # not from what the layer does to finite input.
        weights = model.first_bad_forward_param
        message = ("debug_info: the first layer in forward order whose output went non-finite "
                   "is '%s'%s (top blob '%s' = %s) at iteration %s, and its own weights are "
                   "non-finite in the same pass (line %d): an update before iteration %s made "
                   "them so, and the output follows from them"
                   % (event.layer, kind, event.blob, fmt(event.value), point.iteration,
                      weights.line, point.iteration))
        fix = "see the first non-finite gradient (backward) and the cause above"
        evidence = [point, weights]
    else:
        layer_type = layer.type if layer is not None else None
        role, fix = _layer_role(event.layer, layer_type)
        message = ("debug_info: the first layer in forward order whose output went non-finite "
                   "is '%s'%s (top blob '%s' = %s) at iteration %s%s"
                   % (event.layer, kind, event.blob, fmt(event.value), point.iteration, role))
        if layer_type in layer_types.ALL_DATA:
            source = (layer.params.get("data_param.source")
                      or layer.params.get("hdf5_data_param.source") or "SOURCE")
            fix = ("`safe-layers scan %s` finds the record; a NaNGuard on the tops of '%s' "
                   "stops at its batch" % (source, event.layer))
    return finding(model, FIRST_LAYER, "error", point, message, fix, evidence, layer=event.layer,
                   blob=event.blob, blob_kind=event.blob_kind,
                   weights_nonfinite=model.first_bad_forward_param is not None or event.blob_kind == "param")


def first_gradient(model):
    """SL804: the first non-finite gradient, when no forward value was non-finite."""
    if model.first_bad_backward is None or model.first_bad_forward is not None:
        return None
    point, event = model.first_bad_backward
    message = ("debug_info: the first non-finite gradient is layer '%s' %s blob %s diff = %s "
               "at iteration %s (backward runs from the loss down)"
               % (event.layer, event.blob_kind, event.blob, fmt(event.value), point.iteration))
    return finding(model, FIRST_LAYER, "error", point, message,
                   "a NaNGuard (check: backward) below '%s' reports the first bad "
                   "element" % event.layer, [point], layer=event.layer,
                   blob=event.blob, blob_kind=event.blob_kind)


def _layer_role(name, layer_type):
    """(what a layer of ``layer_type`` is known to do, the fix) for the first layer whose
    output went non-finite."""
    role, fix = "", ("guard it: a NaNGuard after '%s' (action: abort) reports the first bad "
                     "element" % name)
    if layer_type in layer_types.ALL_DATA:
        role = ": the input itself is non-finite"
    elif layer_type == "Pooling":
        # A window past the input (stride > kernel, CEIL rounding): pooling_layer.cpp.
        role = (": with finite input, a pooling window lying outside it (stride > kernel, "
                "Caffe's CEIL rounding) averages 0/0 or outputs -FLT_MAX")
        fix = ("`safe-layers lint` checks the geometry with real shapes; pad, change "
               "kernel/stride, or round_mode: FLOOR")
    elif layer_type == "BatchNorm":
        role = ": BatchNorm (at zero statistics it outputs x/sqrt(eps), ~316x)"
        fix = ("replace it with StableBatchNorm (same blobs, caffemodels load both ways; "
               "`safe-layers harden --swap batchnorm`)")
    elif layer_type and "Loss" in layer_type:
        role = ": the loss layer, its bottoms finite"
        if layer_type == "InfogainLoss":
            fix = ("InfogainLoss with an unnormalized or non-finite H, or labels outside "
                   "[0, K): SafeInfogainLoss validates both")
    return role, fix


def fastest_gradient(model, cause):
    """SL805: the gradient that grew fastest before the first non-finite value (an error
    when ``cause``, the cause finding, is SL802)."""
    grown = _fastest(model.frozen_gradients)
    if grown is None:
        return None
    (layer_name, kind, blob), first, last, ratio = grown
    per_iteration = ratio ** (1.0 / max(1, (last.iteration or 0) - (first.iteration or 0)))
    message = ("debug_info: the gradient that grew fastest before the first non-finite value: "
               "layer '%s' %s blob %s diff %s (iteration %s) -> %s (iteration %s), x%.3g "
               "(x%.3g per iteration)" % (layer_name, kind, blob, fmt(first.value),
                                           first.iteration, fmt(last.value), last.iteration,
                                           ratio, per_iteration))
    fix = ("clip it: a GradientClip layer above '%s', or lower base_lr / that layer's "
           "lr_mult" % layer_name)
    severity = "error" if cause is not None and cause.rule == EXPLODING else "warning"
    return finding(model, FASTEST_GRADIENT, severity, last, message, fix, [first, last],
                   layer=layer_name, blob=blob, growth=ratio)


def _fastest(history):
    """(key, first Point, last Point, ratio) of the gradient history that grew most, or
    None (no history, or none grew ``GROWTH_SHOWN`` times)."""
    if not history:
        return None
    best = None
    for key, points in history.items():
        usable = [p for p in points if finite(p.value) and p.value > 0]
        if len(usable) < 2:
            continue
        ratio = usable[-1].value / usable[0].value
        if best is None or ratio > best[3]:
            best = (key, usable[0], usable[-1], ratio)
    if best is None or best[3] < GROWTH_SHOWN:
        return None
    return best
