"""SL7xx: domain traps. ``Log`` of something that reaches 0 or below, ``Power`` with a
fractional exponent of something that can be negative (or a negative exponent of
something that can be 0), ``Exp`` with a large rate on an unbounded input (float32
overflows at exp(88.72))."""

import math

from safe_layers.tools.lint.rules import rule

LOG_DOMAIN = rule(
    "SL701", "warning", "Log of an input that can be <= 0: NaN or -inf",
    doc="""
    Caffe's Log layer computes log(shift + scale * x) with no clamping
    (log_layer.cpp:34-76): NaN for an argument below 0 and -inf at 0, and its backward
    divides by the same argument (inf). Only an input kept non-negative by the layer in
    front (Softmax, Sigmoid, ReLU, Exp...) with a positive shift is safe.
    """)
POWER_DOMAIN = rule(
    "SL702", "warning", "Power with a fractional (or negative) exponent of an input that can be negative (or 0)",
    doc="""
    The Power layer computes (shift + scale * x)^power with caffe_powx
    (power_layer.cpp:20-41): a fractional power of a negative base is NaN, and a negative
    power of 0 is inf (then NaN downstream). lint checks whether the layer in front keeps
    the base non-negative (and positive, for a negative power).
    """)
EXP_OVERFLOW = rule(
    "SL703", "warning", "Exp with a large rate on an unbounded input: overflows to inf",
    doc="""
    The Exp layer computes base^(shift + scale * x), i.e. exp(x * scale * ln(base)) times a
    constant (exp_layer.cpp:16-27, 31-45); float32 exp overflows to inf above 88.72, so an
    unbounded input times a rate of 1 or more overflows once x passes 88.72 / rate, and the
    inf turns into NaN in the next layer or the loss. Bound the input first (TanH, Sigmoid,
    Clip) or lower the scale.
    """)

LOG_FLT_MAX = 88.72283935546875  # ln(FLT_MAX)


def _source(ctx, index, blob):
    layer, _ = ctx.producer(index, blob)
    return "'%s' (%s)" % (layer.name, layer.type) if layer is not None else "the net input"


def check(ctx):
    for index, (layer, node) in enumerate(ctx.layers):
        if not layer.bottom:
            continue
        blob = layer.bottom[0]
        if layer.type == "Log":
            p = layer.log_param
            positive = ctx.non_negative(index, blob) and p.scale >= 0 and p.shift > 0
            if not positive:
                ctx.add(node, LOG_DOMAIN,
                        "Log layer '%s' takes log(shift + scale*x) = log(%g + %g*x) of '%s' from %s, "
                        "which nothing keeps above 0: NaN below 0, -inf at 0"
                        % (layer.name, p.shift, p.scale, blob, _source(ctx, index, blob)),
                        "feed it a non-negative input (after Softmax/Sigmoid/ReLU/Exp) and set "
                        "log_param { shift: 1e-6 }", layer=layer.name)
        elif layer.type == "Power":
            p = layer.power_param
            fractional = p.power != math.floor(p.power)
            can_be_negative = not (ctx.non_negative(index, blob) and p.scale >= 0 and p.shift >= 0)
            if fractional and can_be_negative:
                ctx.add(node, POWER_DOMAIN,
                        "Power layer '%s' raises (%g + %g*x) to the fractional power %g, with x = '%s' "
                        "from %s, which can be negative: NaN there"
                        % (layer.name, p.shift, p.scale, p.power, blob, _source(ctx, index, blob)),
                        "make the base non-negative (AbsVal or ReLU in front, and a positive shift), "
                        "or use an integer power", layer=layer.name)
            elif p.power < 0 and not (ctx.non_negative(index, blob) and p.shift > 0 and p.scale >= 0):
                ctx.add(node, POWER_DOMAIN,
                        "Power layer '%s' raises (%g + %g*x) to the negative power %g, with x = '%s' "
                        "from %s, which can be 0: inf there"
                        % (layer.name, p.shift, p.scale, p.power, blob, _source(ctx, index, blob)),
                        "keep the base away from 0 (a positive shift on a non-negative input)",
                        layer=layer.name)
        elif layer.type == "Exp":
            p = layer.exp_param
            log_base = 1.0 if p.base == -1 else (math.log(p.base) if p.base > 0 else float("nan"))
            rate = p.scale * log_base
            if math.isfinite(rate) and abs(rate) >= 1 and not ctx.bounded(index, blob):
                limit = (LOG_FLT_MAX - p.shift * log_base) / abs(rate)
                ctx.add(node, EXP_OVERFLOW,
                        "Exp layer '%s' computes exp(%g*x%+g) of '%s' from %s, which is unbounded: "
                        "float32 overflows to inf once %sx > %.4g"
                        % (layer.name, rate, p.shift * log_base, blob, _source(ctx, index, blob),
                           "" if rate > 0 else "-", limit),
                        "bound the input first (TanH/Sigmoid, or a Clip layer) or lower exp_param.scale",
                        layer=layer.name)
