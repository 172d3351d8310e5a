"""SL4xx: BatchNorm (``batch_norm_layer.cpp``: ``x / sqrt(var + eps)``
with the stored statistics scaled by ``1 / moving_average_fraction``) and its drop-in StableBatchNorm."""

from safe_layers.tools.lint.rules import rule
from safe_layers.tools.lint.rules.loss import _safe_params, is_safe_layer

GLOBAL_STATS_TRAIN = rule(
    "SL401", "warning", "BatchNorm uses stored statistics while training",
    doc="""
    BatchNorm uses the stored statistics when use_global_stats is true, which by default
    is only in TEST (batch_norm_layer.cpp:14-16), and then never updates them
    (batch_norm_layer.cpp:125-147 run only without it). The stored sums are divided by the
    scale factor, taken as 0 when that is 0 (batch_norm_layer.cpp:98-105): a net trained
    from scratch normalises with mean 0 and variance 0, i.e. divides by sqrt(eps), about
    316 times its input. Right for fine-tuning with frozen trained statistics only.
    """)
LEARNED_STATS = rule(
    "SL402", "error", "BatchNorm statistics declared learnable (lr_mult != 0)",
    doc="""
    BatchNorm's three blobs (mean, variance, scale factor) are statistics, not parameters:
    the layer adds param { lr_mult: 0 } for each one not declared and aborts at setup when
    a declared one has lr_mult != 0 (batch_norm_layer.cpp:36-47, `Cannot configure batch
    normalization statistics as layer parameters`).
    """)
EPS = rule(
    "SL403", "error", "BatchNorm eps <= 0: 0/0 on a constant channel",
    doc="""
    BatchNorm normalises by sqrt(variance + eps) (batch_norm_layer.cpp:150-161). A channel
    that is constant over a batch (a dead ReLU, padding, a constant input) has variance 0,
    so with eps <= 0 the output there is 0/0 = NaN, and a negative eps makes even small
    variances NaN under the square root. Caffe's default eps is 1e-5 (caffe.proto:545).
    """)
STABLE_LR_MULT = rule(
    "SL404", "error", "StableBatchNorm without its three param { lr_mult: 0 }",
    doc="""
    Each parameter blob of a layer gets lr_mult and decay_mult 1 unless a param block says
    otherwise (net.cpp:440-457; caffe.proto:316-319). BatchNorm adds param { lr_mult: 0 }
    for its statistics itself (batch_norm_layer.cpp:36-47); a Python layer cannot, so a
    StableBatchNorm without its three param { lr_mult: 0 } has its statistics updated by
    the solver as if they were weights, and shrunk by weight decay every iteration
    (sgd_solver.cpp:156-171).
    """)


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
