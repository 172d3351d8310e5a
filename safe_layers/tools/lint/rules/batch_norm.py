"""SL4xx: BatchNorm (``batch_norm_layer.cpp``: ``x / sqrt(var + eps)``
with the stored statistics scaled by ``1 / moving_average_fraction``) and its drop-in StableBatchNorm."""

from safe_layers.tools.lint.rules import rule
from safe_layers.tools.lint.rules.loss import _safe_params, is_safe_layer

GLOBAL_STATS_TRAIN = rule("SL401", "warning", "BatchNorm uses stored statistics while training")
LEARNED_STATS = rule("SL402", "error", "BatchNorm statistics declared learnable (lr_mult != 0)")
EPS = rule("SL403", "error", "BatchNorm eps <= 0: 0/0 on a constant channel")
STABLE_LR_MULT = rule("SL404", "error", "StableBatchNorm without its three param { lr_mult: 0 }")


def check(ctx):
    for layer, node in ctx.layers:
        if layer.type == "BatchNorm":
            p = layer.batch_norm_param
            stats = p.use_global_stats if p.HasField("use_global_stats") else None
            eps = p.eps
            where = node.find("batch_norm_param") or node
            for i, spec in enumerate(layer.param[:3]):
                if spec.lr_mult != 0:
                    ctx.add(node.all("param")[i], LEARNED_STATS,
                            "BatchNorm '%s' declares param %d with lr_mult %g: its statistics are "
                            "not parameters, and Caffe aborts at setup ('Cannot configure batch "
                            "normalization statistics as layer parameters')" % (layer.name, i, spec.lr_mult),
                            "param { lr_mult: 0 } (or no param blocks: Caffe adds them)", layer=layer.name)
        elif is_safe_layer(layer, "StableBatchNorm"):
            p = _safe_params(layer)
            if p is None:
                continue
            stats, eps = p.use_global_stats, p.eps
            where = node.find("python_param.param_str") or node
            zero = [i for i, spec in enumerate(layer.param[:3]) if spec.lr_mult == 0]
            if len(layer.param) < 3 or len(zero) < 3:
                ctx.add(node, STABLE_LR_MULT,
                        "StableBatchNorm '%s' has %d of its three param { lr_mult: 0 }: a Python "
                        "layer cannot keep its statistics out of the solver as BatchNorm does, so "
                        "the solver updates them (weight decay shrinks them every iteration)"
                        % (layer.name, len(zero)),
                        "three param { lr_mult: 0 } blocks in the layer, one per statistic",
                        layer=layer.name)
        else:
            continue
        if stats and ctx.phase == "TRAIN" and ctx.trains:
            ctx.add(where, GLOBAL_STATS_TRAIN,
                    "%s '%s' has use_global_stats: true in the TRAIN net: it normalizes with the "
                    "stored statistics and never updates them. Right for fine-tuning from trained "
                    "statistics; from scratch (scale factor 0) stock BatchNorm outputs x/sqrt(eps), "
                    "about 316x its input" % (layer.type if layer.type != "Python" else "StableBatchNorm",
                                             layer.name),
                    "drop use_global_stats (Caffe's default: batch statistics in TRAIN, stored ones "
                    "in TEST) unless the statistics are trained and meant to stay frozen",
                    layer=layer.name)
        if eps is not None and eps <= 0:
            ctx.add(where, EPS,
                    "BatchNorm '%s' has eps %g: a channel that is constant over the batch has variance "
                    "0, and (x - mean)/sqrt(0 + eps) is 0/0 = NaN" % (layer.name, eps),
                    "eps: 1e-5 (Caffe's default)", layer=layer.name)
