"""SL2xx: pooling windows that lie outside their input (``pooling_layer.cpp``:
the output size and its pad correction in ``Reshape``, the windows clipped to the input in
``Forward_cpu``).

Caffe rounds the output size up (CEIL, the default ``round_mode``) and, only when some pad
is set, pulls a last window that would start in the padding back. Without pad, with
stride > kernel, the last window can start at or past the input's edge: AVE pooling then
divides 0 by a window size of 0 (NaN) and MAX pooling outputs -FLT_MAX with mask -1 (its
CPU backward writes one element before the channel). :func:`geometry` replays Caffe's
loops per axis, so the rows and columns named are exactly those Caffe gets wrong.
"""

import math

from safe_layers.tools.lint.rules import rule

WINDOW_OUTSIDE = rule(
    "SL201", "error", "pooling windows lie outside the input: NaN (AVE) or -FLT_MAX (MAX); rows, columns and fixes named",
    doc="""
    PoolingLayer::Reshape rounds the output size up (CEIL, the default round_mode) and
    pulls a last window that starts in the padding back only when some pad is set
    (pooling_layer.cpp:91-118). Without pad, with stride > kernel, the last row or column
    of windows can start at or past the input's edge. Forward_cpu clips each window to the
    input: AVE pooling then divides 0 by a window size of 0, NaN
    (pooling_layer.cpp:203-222), and MAX pooling keeps its initial -FLT_MAX and mask -1
    (pooling_layer.cpp:155-162), which its CPU backward uses as an index, adding the
    gradient one element before the channel (pooling_layer.cpp:266-272). lint replays those
    loops on the real input shape and names the rows, columns and fixes.
    """)
STRIDE_OVER_KERNEL = rule(
    "SL202", "warning", "pooling stride > kernel without pad, shapes unknown: empty windows for some input sizes",
    doc="""
    Without blob shapes lint cannot tell whether a pooling layer's windows stay inside
    its input, but stride > kernel with no pad and CEIL rounding (pooling_layer.cpp:91-118)
    leaves the last window outside the input for some input sizes, which gives NaN (AVE)
    or -FLT_MAX (MAX) there; see SL201. Give the input shapes (--input-shape) to check the
    actual sizes, or remove the risk with round_mode: FLOOR, a pad, or kernel >= stride.
    """)

FLT_MAX = 3.4028234663852886e38


class Axis:
    """One spatial axis of a pooling layer: input size, kernel, stride, pad."""

    def __init__(self, size, kernel, stride, pad):
        self.size, self.kernel, self.stride, self.pad = size, kernel, stride, pad


def params(layer):
    """((kernel_h, kernel_w), (stride_h, stride_w), (pad_h, pad_w), ceil, global) as Caffe
    reads them (pooling_layer.cpp LayerSetUp)."""
    p = layer.pooling_param
    if p.HasField("kernel_h") or p.HasField("kernel_w"):
        kernel = (p.kernel_h, p.kernel_w)
    else:
        kernel = (p.kernel_size, p.kernel_size)
    if p.HasField("stride_h") or p.HasField("stride_w"):
        stride = (p.stride_h, p.stride_w)
    else:
        stride = (p.stride, p.stride)
    if p.HasField("pad_h") or p.HasField("pad_w"):
        pad = (p.pad_h, p.pad_w)
    else:
        pad = (p.pad, p.pad)
    ceil = True
    if "round_mode" in p.DESCRIPTOR.fields_by_name:
        ceil = p.round_mode == p.DESCRIPTOR.fields_by_name["round_mode"].enum_type.values_by_name["CEIL"].number
    return kernel, stride, pad, ceil, p.global_pooling


def axes_outside(layer):
    """The axes (0: rows, 1: columns) on which some input size puts the last window of
    ``layer`` outside its input: stride > kernel with CEIL rounding and no pad (with a pad,
    Caffe pulls the last window back; FLOOR never reaches past the edge). Empty when no
    input shape can make a window read nothing."""
    kernel, stride, pad, ceil, global_pooling = params(layer)
    if global_pooling or pad[0] or pad[1] or not ceil:
        return []
    return [a for a in (0, 1) if stride[a] > kernel[a]]


def pooled_size(size, kernel, stride, pad, ceil, any_pad):
    """Caffe's output size on one axis (pooling_layer.cpp Reshape)."""
    ratio = float(size + 2 * pad - kernel) / stride
    out = int(math.ceil(ratio) if ceil else math.floor(ratio)) + 1
    if any_pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def axis_windows(size, kernel, stride, pad, out):
    """Per output index: (empty, ave_size) — whether the clipped window reads no input,
    and the AVE divisor's factor on this axis (padding included, as Caffe counts it)."""
    windows = []
    for o in range(out):
        start = o * stride - pad
        ave_end = min(start + kernel, size + pad)
        ave_size = ave_end - start
        lo, hi = max(start, 0), min(start + kernel, size)
        windows.append((hi <= lo, ave_size))
    return windows


def geometry(shape, layer, overrides=None):
    """What Caffe computes for ``layer`` on a bottom of ``shape`` (N, C, H, W).

    Returns a dict: out (H', W'), rows / cols (output indices whose windows read no
    input), nan (AVE: output positions that are 0/0, as (row, col) pairs — whole rows and
    columns listed as such), or None for global pooling or a bottom that is not 4-D.
    ``overrides`` replaces (kernel, stride, pad, ceil) to evaluate a fix.
    """
    if shape is None or len(shape) != 4:
        return None
    kernel, stride, pad, ceil, global_pooling = params(layer)
    if global_pooling:
        return None
    if overrides:
        kernel, stride, pad, ceil = overrides
    height, width = shape[2], shape[3]
    any_pad = bool(pad[0] or pad[1])
    out_h = pooled_size(height, kernel[0], stride[0], pad[0], ceil, any_pad)
    out_w = pooled_size(width, kernel[1], stride[1], pad[1], ceil, any_pad)
    if out_h <= 0 or out_w <= 0:
        return {"out": (out_h, out_w), "rows": [], "cols": [], "nan_rows": [], "nan_cols": []}
    rows = axis_windows(height, kernel[0], stride[0], pad[0], out_h)
    cols = axis_windows(width, kernel[1], stride[1], pad[1], out_w)
    empty_rows = [i for i, (empty, _) in enumerate(rows) if empty]
    empty_cols = [j for j, (empty, _) in enumerate(cols) if empty]
    # AVE: an output reads no input when its row or column window is empty; it is 0/0 when
    # the divisor (h extent x w extent, padding counted) is 0 too.
    nan_rows = [i for i in empty_rows if rows[i][1] == 0]
    nan_cols = [j for j in empty_cols if cols[j][1] == 0]
    return {"out": (out_h, out_w), "rows": empty_rows, "cols": empty_cols,
            "nan_rows": nan_rows, "nan_cols": nan_cols,
            "row_starts": [i * stride[0] - pad[0] for i in empty_rows],
            "col_starts": [j * stride[1] - pad[1] for j in empty_cols]}


def _fixes(shape, layer, found):
    """Concrete changes that leave no empty window, each with its output size."""
    kernel, stride, pad, ceil, _ = params(layer)
    p = layer.pooling_param
    options = []
    if "round_mode" in p.DESCRIPTOR.fields_by_name:
        g = geometry(shape, layer, (kernel, stride, pad, False))
        if g and not g["rows"] and not g["cols"]:
            options.append("round_mode: FLOOR (output %dx%d)" % g["out"])
    for new_pad in range(1, max(kernel)):
        if new_pad < min(kernel):
            g = geometry(shape, layer, (kernel, stride, (new_pad, new_pad), ceil))
            if g and not g["rows"] and not g["cols"]:
                options.append("pad: %d (output %dx%d)" % ((new_pad,) + g["out"]))
                break
    for new_kernel in range(max(kernel) + 1, max(stride) + 2):
        g = geometry(shape, layer, ((new_kernel, new_kernel), stride, pad, ceil))
        if g and not g["rows"] and not g["cols"] and g["out"][0] > 0:
            options.append("kernel_size: %d (output %dx%d)" % ((new_kernel,) + g["out"]))
            break
    return options


def _names(indices):
    return ", ".join(str(i) for i in indices)


def check(ctx):
    for index, (layer, node) in enumerate(ctx.layers):
        if layer.type != "Pooling":
            continue
        where = node.find("pooling_param") or node
        pool = _pool_name(layer)
        shape = ctx.bottom_shape(layer)
        if ctx.shapes is not None:
            if shape is None:
                continue  # Caffe did not build this far: SL001 says why
            found = geometry(shape, layer)
            if not found or not (found["rows"] or found["cols"]):
                continue
            _report(ctx, layer, where, pool, shape, found)
        else:
            axes = axes_outside(layer)
            if not axes:
                continue
            kernel, stride = params(layer)[:2]
            k, s = kernel[axes[0]], stride[axes[0]]
            example = k + 1  # (H - k) mod s = 1 <= s - k: the last window starts at H
            ctx.add(where, STRIDE_OVER_KERNEL,
                    "pooling layer '%s' (%s, kernel %d, stride %d, no pad, CEIL rounding): with "
                    "stride > kernel the last window lies outside the input whenever 0 < (H - %d) "
                    "mod %d <= %d (e.g. H = %d); input shapes unknown, so not checked"
                    % (layer.name, pool, k, s, k, s, s - k, example),
                    "give input shapes (--input-shape) to check, or set round_mode: FLOOR, a pad, "
                    "or kernel_size >= stride", layer=layer.name,
                    data={"kernel": list(kernel), "stride": list(stride)})


def _pool_name(layer):
    p = layer.pooling_param
    return p.DESCRIPTOR.fields_by_name["pool"].enum_type.values_by_number[p.pool].name


def _report(ctx, layer, where, pool, shape, found):
    height, width = shape[2], shape[3]
    out_h, out_w = found["out"]
    parts = []
    for axis, key, starts, size in (("row", "rows", "row_starts", height),
                                    ("column", "cols", "col_starts", width)):
        if found[key]:
            many = len(found[key]) > 1
            parts.append("output %s%s %s (window%s starting at input %s %s of %d)"
                         % (axis, "s" if many else "", _names(found[key]), "s" if many else "",
                            axis, _names(found[starts]), size))
    if pool == "AVE":
        if found["nan_rows"] or found["nan_cols"]:
            nan_at = " and ".join(
                "%s%s %s" % (axis, "s" if len(found[key]) > 1 else "", _names(found[key]))
                for axis, key in (("row", "nan_rows"), ("column", "nan_cols")) if found[key])
            effect = "AVE divides 0 by a window size of 0 there: NaN in %s" % nan_at
            severity = "error"
        else:
            effect = "AVE outputs 0 there (windows entirely in the padding): silently wrong values"
            severity = "warning"
    elif pool == "MAX":
        effect = ("MAX outputs -FLT_MAX (-3.4028e+38) there with mask -1, which overflows to inf/NaN "
                  "downstream, and the CPU backward writes out of bounds")
        severity = "error"
    else:
        effect = "%s pooling reads no input there" % pool
        severity = "warning"
    kernel, stride, pad, ceil, _ = params(layer)
    fixes = _fixes(shape, layer, found)
    ctx.add(where, WINDOW_OUTSIDE,
            "pooling layer '%s' (%s, kernel %dx%d, stride %dx%d, pad %dx%d) on bottom '%s' %s -> "
            "output %dx%d: %s read no input; %s"
            % (layer.name, pool, kernel[0], kernel[1], stride[0], stride[1], pad[0], pad[1],
               layer.bottom[0], "x".join(str(d) for d in shape), out_h, out_w, "; ".join(parts), effect),
            "; or ".join(fixes) if fixes else "make kernel_size >= stride",
            layer=layer.name, severity=severity,
            data={"bottom_shape": list(shape), "output": [out_h, out_w], "rows": found["rows"],
                  "cols": found["cols"], "nan_rows": found["nan_rows"], "nan_cols": found["nan_cols"],
                  "pool": pool})
