"""SL820: a net that died without a NaN: its training loss settled at the chance level of
its softmax loss (ln C), its test accuracy at chance."""

import math

from safe_layers.tools import rule_table
from safe_layers.tools.diagnose.rules.evidence import finding
from safe_layers.tools.diagnose.series import finite, fmt

DEAD = rule_table.rule("diagnose", "SL820", "error", "the net died: loss at chance, no NaN", """
    SoftmaxWithLoss is the mean of -log p(label) over the samples (softmax_loss_layer.cpp:
    Forward_cpu); a net whose scores no longer depend on its input predicts the same
    distribution for every sample, and its loss sits at the entropy of the labels: ln C
    for C balanced classes. A too-high learning rate kills ReLUs (their input goes
    negative for every sample, and relu_layer.cpp passes no gradient back through them),
    or a clamp hides the divergence that would have ended in NaN: the loss stays finite,
    the log shows no fault, and the run learns nothing from then on.""")

BAND = 0.05          # the loss within 5 % of ln C is at chance (the watch's chance_band)
TAIL = 10            # the last displayed losses it must average over
CHANCE_ACCURACY = 2  # a test accuracy above 2 / C learned something


def chance_level(net):
    """(sum of loss weight x ln C, C) of the logged TRAIN net's SoftmaxWithLoss layers (C
    read from the num_output of the layer whose top they read), or None when the net has
    another loss or a C cannot be read."""
    if net is None:
        return None
    producers = {}
    for layer in net.layers:
        for top in layer.tops:
            producers[top] = layer
    level, classes = 0.0, None
    for layer in net.layers:
        if not (layer.type or "").endswith("Loss"):
            continue
        if layer.type != "SoftmaxWithLoss" or not layer.bottoms:
            return None
        source = producers.get(layer.bottoms[0])
        count = None
        if source is not None:
            count = (source.params.get("inner_product_param.num_output")
                     or source.params.get("convolution_param.num_output"))
        try:
            count = int(count)
        except (TypeError, ValueError):
            return None
        weight = layer.loss_weights[0] if layer.loss_weights else 1.0
        level += weight * math.log(count)
        classes = count if classes is None else classes
    return (level, classes) if classes and classes > 1 else None


def died(model):
    """SL820: the last TAIL displayed losses average within BAND of the chance level, and
    the run's lowest loss was below it (it learned, then died) or its highest above it (a
    spike); a test accuracy beside it, if logged, at chance."""
    track = model.loss
    chance = chance_level(model.nets.get("TRAIN"))
    if chance is None or track.bad is not None or track.last is None or track.minimum is None:
        return None
    level, classes = chance
    tail = [y for _, y in track.series.points[-TAIL:] if finite(y)]
    if len(tail) < TAIL:
        return None
    mean = sum(tail) / len(tail)
    if abs(mean - level) > BAND * level or max(abs(y - level) for y in tail) > 3 * BAND * level:
        return None
    learned = track.minimum.value < level * (1 - BAND)
    peak = max(((x, y) for x, y in track.series.points if finite(y)), key=lambda p: p[1])
    spiked = peak[1] > 2 * level
    if not (learned or spiked):
        return None
    accuracy = getattr(model, "last_test_accuracy", None)
    if accuracy is not None and finite(accuracy.value) and accuracy.value > CHANCE_ACCURACY / classes:
        return None
    how = []
    if learned:
        how.append("after it had been down to %s (iteration %s)"
                   % (fmt(track.minimum.value), track.minimum.iteration))
    if spiked:
        how.append("after a spike to %s at iteration %s" % (fmt(peak[1]), peak[0]))
    message = ("the net died without a NaN: the training loss settled at %s (mean of the last %d "
               "displayed), the chance level ln %d = %s, %s%s; from then on it learned nothing"
               % (fmt(mean), len(tail), classes, fmt(level), " and ".join(how),
                  "; test accuracy %s (chance: %s)" % (fmt(accuracy.value), fmt(1.0 / classes))
                  if accuracy is not None else ""))
    if model.clips:
        cause, fix = ("a clip that hid a divergence", "lower base_lr: the clip kept the loss "
                      "finite while the net diverged and died")
    else:
        cause, fix = ("a too-high learning rate", "lower base_lr (a tenth), or train under "
                      "`safe-layers train --rollback-after 3`, whose watch finds a dead net "
                      "and rolls it back with a lower rate")
    message += "; the usual cause: %s" % cause
    evidence = [track.minimum if learned else None, track.last, accuracy,
                model.solver_point("base_lr")]
    return finding(model, DEAD, "error", track.last, message, fix, evidence,
                   cause=cause, level=level, classes=classes, mean=mean)
