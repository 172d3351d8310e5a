"""SL3xx: losses. InfogainLoss after a Softmax (softmax twice since BVLC PR #3855), its H
file (loaded and checked as the layer would), Python loss layers without a loss weight,
and one loss weighted far above the others."""

import os

from safe_layers.core.params import ParamError
from safe_layers.core.schemas import SCHEMAS
from safe_layers.kernels import infogain
from safe_layers.readers import prototxt
from safe_layers.readers.infogain_matrix import load_infogain_matrix
from safe_layers.readers.net_state import loss_weights
from safe_layers.tools.lint.rules import rule

SOFTMAX_TWICE = rule(
    "SL301", "error", "InfogainLoss fed by a Softmax: softmax applied twice",
    doc="""
    InfogainLoss applies its own softmax to bottom[0] (infogain_loss_layer.cpp:15-27,
    131-132; since BVLC PR #3855, 2017). A net written for the older layer, with a Softmax
    in front, takes softmax twice: the probabilities are squashed towards uniform, the
    loss hardly moves and the gradients are tiny. Feed it the logits, or use
    SafeInfogainLoss with input: probabilities (harden --swap infogain).
    """)
H_BAD = rule(
    "SL302", "error", "infogain H missing, unreadable, non-finite, negative or not K x K (loaded and checked)",
    doc="""
    InfogainLoss reads its H matrix from infogain_loss_param.source at setup
    (infogain_loss_layer.cpp:40-46; io.cpp:54 aborts with `File not found`) and CHECKs
    only that it holds K x K values (infogain_loss_layer.cpp:112-113). A NaN, Inf or
    negative entry is used as is in the loss and its gradient
    (infogain_loss_layer.cpp:152-156, 205-208). lint loads H as the layer would and checks
    it against K from the bottom's shape.
    """)
H_ROWS = rule(
    "SL303", "warning", "infogain H rows do not sum to 1: gradients scale with the row sums",
    doc="""
    InfogainLoss's gradient for a sample of label y is prob * rowsum(H[y]) - H[y]
    (infogain_loss_layer.cpp:190-208): it only matches the softmax gradient's scale when
    row y sums to 1. Rows summing to 10 multiply that class's gradients by 10, which can
    make training diverge, and a zero row stops the class learning altogether. Normalise
    the rows, or use SafeInfogainLoss with normalize_h: rows.
    """)
PYTHON_LOSS_WEIGHT = rule(
    "SL304", "error", "a Python loss layer without loss_weight: its loss is ignored",
    doc="""
    A Caffe loss layer gets a loss_weight of 1 by default (loss_layer.cpp:11-13); a Python
    layer is not a LossLayer, so it counts in the net's loss only for the loss_weight its
    prototxt declares (layer.hpp:389-401). Without one, its loss is left out of the total,
    Net::Init finds that nothing below it contributes to the loss and skips their backward
    passes (net.cpp:170-205): the net trains on nothing.
    """)
LOSS_WEIGHT_RATIO = rule(
    "SL305", "warning", "a loss_weight far (>= 100x) above the other losses'",
    doc="""
    A loss_weight scales its loss and the whole gradient that leaves it
    (layer.hpp:389-401, net.cpp:127-130). One loss weighted 100 times the others dominates
    every update: its gradient sets the step size for shared layers, and it is the first
    to explode into inf/NaN. Bring the weights to the same order of magnitude.
    """)

RATIO = 100.0


def _safe_params(layer):
    """Parsed param_str of a safe_layers layer, or None (SL601 reports bad ones)."""
    schema = SCHEMAS.get(layer.python_param.layer)
    if schema is None:
        return None
    try:
        return schema.parse(layer.python_param.param_str)
    except ParamError:
        return None


def is_safe_layer(layer, class_name):
    return (layer.type == "Python" and layer.python_param.module.split(".")[0] == "safe_layers"
            and layer.python_param.layer == class_name)


def check(ctx):
    for index, (layer, node) in enumerate(ctx.layers):
        if layer.type == "InfogainLoss":
            source = layer.infogain_loss_param.source
            axis = layer.infogain_loss_param.axis
            takes_probabilities = False
            _softmax_in_front(ctx, index, layer, node, takes_probabilities)
            if source:
                _check_h(ctx, layer, node.find("infogain_loss_param.source") or node, source, axis,
                         normalized=False)
        elif is_safe_layer(layer, "SafeInfogainLoss"):
            p = _safe_params(layer)
            if p is None:
                continue
            _softmax_in_front(ctx, index, layer, node, p.input == "probabilities")
            if p.source:
                _check_h(ctx, layer, node.find("python_param.param_str") or node, p.source, p.axis,
                         normalized=p.normalize_h == "rows")
        if layer.type == "Python" and _is_python_loss(layer) and not len(layer.loss_weight):
            ctx.add(node, PYTHON_LOSS_WEIGHT,
                    "Python loss layer '%s' (%s) has no loss_weight: a Python layer is not a Caffe "
                    "LossLayer, so its weight is 0, the net's loss ignores it and its backward is "
                    "never asked for" % (layer.name, layer.python_param.layer),
                    "add loss_weight: 1 to the layer", layer=layer.name)
    _check_weights(ctx)


def _is_python_loss(layer):
    name = layer.python_param.layer
    return name == "SafeInfogainLoss" or "Loss" in name


def _softmax_in_front(ctx, index, layer, node, takes_probabilities):
    if not layer.bottom:
        return
    producer, _ = ctx.producer(index, layer.bottom[0])
    if producer is None or producer.type != "Softmax" or takes_probabilities:
        return
    logits = producer.bottom[0] if producer.bottom else "its input"
    kind = "InfogainLoss" if layer.type == "InfogainLoss" else "SafeInfogainLoss (input: logits)"
    ctx.add(node, SOFTMAX_TWICE,
            "%s '%s' reads '%s' from Softmax '%s', and applies its own softmax (Caffe's InfogainLoss "
            "since BVLC PR #3855, 2017): softmax is taken twice, the probabilities become nearly "
            "uniform and the gradients tiny" % (kind, layer.name, layer.bottom[0], producer.name),
            "bottom: \"%s\" (the logits) instead of \"%s\"; or `safe-layers harden --swap infogain`, "
            "which keeps the Softmax with SafeInfogainLoss input: probabilities"
            % (logits, layer.bottom[0]), layer=layer.name,
            data={"softmax": producer.name, "logits": logits})


def _check_h(ctx, layer, where, source, axis, normalized):
    import numpy as np
    path, note = prototxt.resolve_reference(source, ctx.path)
    if note == "does not exist":
        ctx.add(where, H_BAD, "infogain H file %r of layer '%s' does not exist (Caffe opens it "
                "relative to the working directory, %s)" % (source, layer.name, os.getcwd()),
                "write H there (a K x K BlobProto .binaryproto) or fix the path", layer=layer.name)
        return
    try:
        values = load_infogain_matrix(path)
    except (OSError, ValueError) as exc:
        ctx.add(where, H_BAD, "infogain H file %r of layer '%s' is unreadable: %s"
                % (source, layer.name, exc), "write H as a K x K BlobProto (.binaryproto)",
                layer=layer.name)
        return
    shape = ctx.bottom_shape(layer)
    if shape is not None:
        classes = shape[axis % len(shape)]
    else:
        classes = int(round(values.size ** 0.5))
    try:
        h = infogain.check_infogain_matrix(values, classes)
    except infogain.InfogainMatrixError as exc:
        ctx.add(where, H_BAD, "infogain H file %r of layer '%s': %s" % (source, layer.name, exc),
                "rewrite H: K x K, finite, non-negative" + (" (K = %d from bottom '%s')"
                                                           % (classes, layer.bottom[0]) if shape else ""),
                layer=layer.name, data={"classes": classes})
        return
    if normalized:
        return
    sums = h.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1) > 1e-3)
    if off.size:
        shown = ", ".join("row %d sums to %g" % (i, sums[i]) for i in off[:4])
        ctx.add(where, H_ROWS,
                "infogain H file %r of layer '%s': %d of %d rows do not sum to 1 (%s%s): the "
                "gradient for label y scales with row y's sum, so large rows make training "
                "diverge%s" % (source, layer.name, off.size, h.shape[0], shown,
                               ", ..." if off.size > 4 else "",
                               " and a zero row stops that class learning" if (sums == 0).any() else ""),
                "divide each row by its sum, or use SafeInfogainLoss with normalize_h: rows",
                layer=layer.name, data={"rows": off.tolist(), "sums": sums[off].tolist()})


def _check_weights(ctx):
    weighted = []
    for layer, node in ctx.layers:
        for top, weight in zip(layer.top, loss_weights(layer)):
            if weight:
                weighted.append((abs(weight), layer, node, top))
    if len(weighted) < 2:
        return
    for weight, layer, node, top in weighted:
        others = sorted(w for w, l, _, t in weighted if (l.name, t) != (layer.name, top))
        median = others[len(others) // 2]
        if median > 0 and weight >= RATIO * median:
            where = node.find("loss_weight") or node
            ctx.add(where, LOSS_WEIGHT_RATIO,
                    "loss '%s' (top '%s') has loss_weight %g, %.0fx the other losses' (median %g): "
                    "its gradient dominates and is the first to explode"
                    % (layer.name, top, weight, weight / median, median),
                    "lower its loss_weight (or raise the others) to the same order of magnitude",
                    layer=layer.name, data={"loss_weight": weight, "others_median": median})
