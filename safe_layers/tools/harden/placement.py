"""Where harden puts guards and clips: the spots of the default placement (and of
``--guard``), the clips below losses with several predictions, and the layers that write
a blob or already follow a layer, per phase."""

import fnmatch

from safe_layers.readers import layer_types, prototxt
from safe_layers.readers.layer_types import ALL_DATA, INPUT, SOURCE_DATA
from safe_layers.readers.net_state import gradient_bottoms, is_loss, layers_in_state
from safe_layers.tools.harden.param_strings import is_safe_guard
from safe_layers.tools.lint.rules import pooling

PRODUCER_TYPES = layer_types.NORMALIZATION + ("Log", "Power", "Exp")
INPUT_TYPES = SOURCE_DATA + INPUT


class PlannedGuard:
    """A guard to insert after layer ``index``, on ``blobs``, for ``reasons``."""

    def __init__(self, index, blobs, reason):
        self.index, self.blobs, self.reasons = index, list(blobs), [reason]
        self.clip_blob = None  # repair: a GradientClip on this blob (below a loss)

    def add(self, blobs, reason):
        for blob in blobs:
            if blob not in self.blobs:
                self.blobs.append(blob)
        if reason not in self.reasons:
            self.reasons.append(reason)


class PlannedLossClip:
    """One GradientClip over ``blobs``, the predictions loss ``index`` sends a gradient to,
    placed right before the loss (with its phase rules): one norm for all of them."""

    def __init__(self, index, blobs):
        self.index, self.blobs = index, list(blobs)


def matches(layer, spec):
    """Whether ``layer`` is of the type ``spec`` or its name matches the glob ``spec``."""
    return layer.type == spec or fnmatch.fnmatchcase(layer.name, spec)


def phase_lists(pairs):
    """The indices of the layers Caffe keeps in TRAIN, then in TEST, in file order."""
    pb2 = prototxt.caffe_pb2()
    index_of = {node.start: i for i, (_, node) in enumerate(pairs)}
    lists = []
    for phase in ("TRAIN", "TEST"):
        kept = layers_in_state(pairs, pb2.Phase.Value(phase))
        lists.append([index_of[node.start] for _, node in kept])
    return lists


def last_writers(pairs, before, blob):
    """Indices of the layers that last write ``blob`` before layer ``before``, one per
    phase (a TRAIN and a TEST data layer may both write 'data')."""
    found = []
    for order in phase_lists(pairs):
        if before not in order:
            continue
        position = order.index(before)
        for i in reversed(order[:position]):
            # Guards and clips are transparent: the writer is the layer they follow.
            if blob in pairs[i][0].top and not is_safe_guard(pairs[i][0]):
                if i not in found:
                    found.append(i)
                break
    return found


def plan_spots(pairs, level, default_guards, guard_specs):
    """The spots to guard, in layer order: the default placement (unless
    ``default_guards`` is off) and each layer a ``--guard`` spec matches."""
    spots = {}

    def want(index, blobs, reason):
        if index in spots:
            spots[index].add(blobs, reason)
        else:
            spots[index] = PlannedGuard(index, blobs, reason)
        return spots[index]

    for i, (layer, _) in enumerate(pairs):
        if is_safe_guard(layer):
            continue
        if default_guards:
            if layer.type in INPUT_TYPES or (layer.type == "Python" and not layer.bottom):
                if layer.top:
                    want(i, list(layer.top), "data layer tops")
            if layer.type == "Pooling" and layer.bottom:
                for w in last_writers(pairs, i, layer.bottom[0]):
                    want(w, [layer.bottom[0]], "input of pooling '%s'" % layer.name)
                if layer.top and pooling.axes_outside(layer):
                    want(i, [layer.top[0]], "output of pooling '%s': stride > kernel, so its "
                         "last windows can lie outside the input (AVE: 0/0)" % layer.name)
            if layer.type in PRODUCER_TYPES and layer.top:
                want(i, [layer.top[0]], "a %s output" % layer.type)
            elif (layer.type == "Python" and layer.python_param.layer == "StableBatchNorm"
                  and layer.top):
                # Where a --swap of the same run guards it: a net swapped first and
                # hardened later gets the same file.
                want(i, [layer.top[0]], "a BatchNorm output (StableBatchNorm)")
            if is_loss(layer) and layer.bottom:
                blobs = loss_gradient_blobs(pairs, i)
                for blob in blobs:
                    for w in last_writers(pairs, i, blob):
                        spot = want(w, [blob], "below loss '%s'" % layer.name)
                        if level == "repair" and len(blobs) == 1:
                            spot.clip_blob = blob
        for spec in guard_specs:
            if matches(layer, spec) and layer.top:
                want(i, list(layer.top), "--guard %s" % spec)
    return [spots[i] for i in sorted(spots)]


def writes_data_only(pairs, index, blob):
    """Whether only data layers write ``blob`` for layer ``index`` (or none: a net input):
    Caffe computes no gradient for it (net.cpp: blob_need_backward_), nothing below learns."""
    return all(pairs[w][0].type in ALL_DATA or (pairs[w][0].type == "Python" and not pairs[w][0].bottom)
               for w in last_writers(pairs, index, blob))


def loss_gradient_blobs(pairs, index):
    """The blobs loss ``index`` sends a gradient to that a layer below learns from
    (net_state.gradient_bottoms, less the data); bottom 0 when none is left, as before."""
    layer = pairs[index][0]
    blobs = []
    for i in gradient_bottoms(layer):
        blob = layer.bottom[i]
        if blob not in blobs and not writes_data_only(pairs, index, blob):
            blobs.append(blob)
    return blobs or [layer.bottom[0]]


def plan_loss_clips(pairs):
    """The clips of the losses with several gradient blobs, in layer order."""
    planned = []
    for i, (layer, _) in enumerate(pairs):
        if i and not is_safe_guard(layer) and is_loss(layer) and layer.bottom:
            blobs = loss_gradient_blobs(pairs, i)
            if len(blobs) > 1:
                planned.append(PlannedLossClip(i, blobs))
    return planned


def run_after(pairs, index):
    """The guards and clips that sit right after layer ``index`` (-1: at the start of
    the layer list), in order: (layer, node) pairs."""
    run = []
    for layer, node in pairs[index + 1:]:
        if not is_safe_guard(layer):
            break
        run.append((layer, node))
    return run


def run_before(pairs, index):
    """The guards and clips that sit right before layer ``index``: (layer, node) pairs."""
    run = []
    for layer, node in reversed(pairs[:index]):
        if not is_safe_guard(layer):
            break
        run.insert(0, (layer, node))
    return run


def existing_loss_clip(pairs, planned):
    """Whether a GradientClip on exactly the blobs of ``planned`` sits right before its loss."""
    return any(layer.python_param.layer == "GradientClip" and set(layer.bottom) == set(planned.blobs)
               for layer, _ in run_before(pairs, planned.index))


def existing(pairs, index, blob, kind):
    """Whether a safe_layers ``kind`` layer on ``blob`` already sits right after layer
    ``index`` (among the guards/clips that follow it): hardening twice adds nothing."""
    return any(layer.python_param.layer == kind and blob in layer.bottom
               for layer, _ in run_after(pairs, index))
