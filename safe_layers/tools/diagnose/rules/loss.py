"""SL802, SL803, SL807: what the training losses did before the first non-finite value
(the cause, read from the segment of the run the first failure happened in)."""

import math

from safe_layers.tools import rule_table
from safe_layers.tools.diagnose.rules.evidence import finding
from safe_layers.tools.diagnose.rules.input_advice import input_advice
from safe_layers.tools.diagnose.series import finite, fmt

# The loss climbed at least this many times above its first value (an order of magnitude)
# before the NaN (Track.growth): a softmax
# loss grows only linearly with the logits, so a classifier blown up by a high base_lr
# (measured: 2.3 -> 72.8, 31x, then NaN, examples/demo.py high_lr) rarely shows more.
EXPLODING_RATIO = 10.0
RISING_RATIO = 1000.0     # ... and, with nothing non-finite yet, 1000x up to the log's end

EXPLODING = rule_table.rule("diagnose", "SL802", "error", "exploding gradients", """
    The loss climbed an order of magnitude or more above its first value, then went
    non-finite: each update made the weights larger, until a product overflowed. Caffe
    does not bound an update: SGDSolver::ApplyUpdate scales the gradient by the rate and
    subtracts it (sgd_solver.cpp:109-127), and clip_gradients is off unless set
    (default -1, caffe.proto:186). With several weighted losses, the one that exploded
    first is named with its loss_weight. A loss still climbing by three orders of
    magnitude at the end of a log with nothing non-finite yet is reported as a warning:
    the explosion is under way.""")

FAULTY_INPUT = rule_table.rule("diagnose", "SL803", "error", "faulty input or loss layer", """
    The loss was falling or flat, then non-finite at once, without growing first: one
    batch brought the NaN. Caffe's data layers copy what the records hold unchecked
    (DataTransformer::Transform, data_transformer.cpp:42), so a NaN or Inf in the data, or
    a label outside the classes, reaches the loss; so does a loss layer that divides by
    a count that can be 0. The finding names the data sources to ``safe-layers scan``,
    the records the bad iteration read (Data layers read in key order) and where a
    NaNGuard stops at the bad batch.""")

FROM_START = rule_table.rule("diagnose", "SL807", "error", "non-finite from the first iteration", """
    The first iteration already gave a non-finite value, with no finite loss before it:
    the net computes NaN or Inf on its first batch, before any update could be the cause.
    Causes: pooling windows lying outside the input (pooling_layer.cpp: AVE divides 0 by
    0, MAX outputs -FLT_MAX), BatchNorm at zero statistics, fillers, or the first batch
    of data itself. ``safe-layers lint`` checks the net with real shapes.""")


def cause(model):
    """SL802 or SL803 (SL807 without a finite loss before): what the losses did before the
    first non-finite value; None when a report caught it while the loss was sane."""
    point, what = model.first_bad
    tracks = model.loss_tracks()
    history = [t for t in tracks if t.minimum is not None]
    bad_tracks = [t for t in tracks if t.bad is not None]
    if not history and model.loss.minimum is None:
        return from_start(model, point)
    caught = what == "report" and not bad_tracks and model.loss.bad is None
    # The loss that went wrong first; the one that grew most if none did.
    if bad_tracks:
        culprit = min(bad_tracks, key=lambda t: t.bad.line)
    else:
        culprit = max(history, key=lambda t: t.rise() or 0)
    if culprit.minimum is None:
        culprit = model.loss if model.loss.minimum is not None else culprit
    if culprit.minimum is None:
        return from_start(model, point)
    exploding = (culprit.growth() or 0) >= EXPLODING_RATIO
    if caught and not exploding:
        return None  # a guard or watch caught it while the loss was sane: SL806 says where
    bad_point = culprit.bad or model.loss.bad or point
    several = len([t for t in tracks if t is not model.loss]) > 1
    name = "" if culprit is model.loss or not several else " '%s'" % culprit.name
    if exploding:
        return _exploding(model, culprit, tracks, several, bad_point, caught, name)
    return _faulty_input(model, culprit, bad_point, name)


def _peak(track):
    return max(track.last, track.peak_after_min, key=lambda p: p.value)


def _until(model, bad_point, caught):
    """How the explosion ended: non-finite, or a report that stopped or caught it."""
    if not caught:
        return "then became %s at iteration %s" % (fmt(bad_point.value), bad_point.iteration)
    if model.first_bad_action in ("stop", "abort"):
        return "until a report stopped it at iteration %s (line %d)" % (
            bad_point.iteration, bad_point.line)
    return "until a report caught it at iteration %s (line %d%s)" % (
        bad_point.iteration, bad_point.line, ", action=%s" % model.first_bad_action
        if model.first_bad_action not in (None, "report") else "")


def _exploding(model, culprit, tracks, several, bad_point, caught, name):
    """SL802 (error): ``culprit`` climbed an order of magnitude, then went non-finite
    (``several``: the net has several losses, ``tracks``)."""
    rise = culprit.rise() or 1.0
    low, high = culprit.minimum, _peak(culprit)
    base_lr = model.solver_field("base_lr")
    message = ("exploding gradients: the loss%s rose from %s (iteration %s) to %s (iteration "
               "%s), %.1f orders of magnitude, %s"
               % (name, fmt(low.value), low.iteration, fmt(high.value), high.iteration,
                  math.log10(rise) if finite(rise) else float("inf"), _until(model, bad_point, caught)))
    fix = ("lower base_lr%s by at least 10x" % (" (%s)" % base_lr if base_lr else ""))
    layer = None
    data = {"cause": "exploding gradients", "rise": rise}
    if several:
        producer = model.producer_of(culprit.name)
        layer = producer.name if producer is not None else culprit.name
        others = ["'%s' %s" % (t.name, "also went non-finite" if t.bad is not None else
                               "stayed within %.0fx" % (t.rise() or 1.0))
                  for t in tracks if t is not culprit and t is not model.loss]
        message += ("; of %d losses, '%s' (loss_weight %s, layer '%s') exploded first; %s"
                    % (len(tracks), culprit.name, fmt(culprit.weight), layer, ", ".join(others)))
        fix = ("lower the loss_weight of layer '%s' (now %s) by 10x or more, or base_lr; a "
               "GradientClip layer between '%s' and its bottom limits that loss's gradient "
               "alone" % (layer, fmt(culprit.weight), layer))
        data["output"] = culprit.name
        data["loss_weight"] = culprit.weight
    else:
        fix += "; or bound the gradient: clip_gradients in the solver, or a GradientClip layer above the loss"
    evidence = [low, high, bad_point, model.solver_point("base_lr")]
    return finding(model, EXPLODING, "error", bad_point, message, fix, evidence, layer=layer, **data)


def _faulty_input(model, culprit, bad_point, name):
    """SL803: ``culprit`` was falling or flat, then suddenly non-finite."""
    first, low, high = culprit.first, culprit.minimum, _peak(culprit)
    if low.value < first.value * 0.9:
        trend = "fell from %s (iteration %s) to %s (iteration %s)" % (
            fmt(first.value), first.iteration, fmt(low.value), low.iteration)
    elif (culprit.growth() or 1.0) >= 1.5:
        trend = "rose from %s (iteration %s) to %s (iteration %s), %.1fx: less than an order " \
                "of magnitude" % (fmt(first.value), first.iteration, fmt(high.value), high.iteration,
                                  culprit.growth())
    else:
        trend = "stayed near %s" % fmt(first.value)
    last = culprit.last
    gap = (bad_point.iteration is not None and last.iteration is not None
           and bad_point.iteration - last.iteration > 1)
    message = ("faulty input or loss layer: the loss%s %s, then became %s at iteration %s without "
               "growing first (last finite %s at iteration %s%s)"
               % (name, trend, fmt(bad_point.value), bad_point.iteration, fmt(last.value),
                  last.iteration, "; the log shows every %dth iteration: it went non-finite in "
                  "iterations %d-%d" % (bad_point.iteration - last.iteration, last.iteration + 1,
                                        bad_point.iteration) if gap else ""))
    recovered = culprit.recovered
    if recovered is not None:
        message += ("; training went on: the loss is finite again from iteration %s (%s)"
                    % (recovered.iteration, "a watch skipped the bad iteration"
                       if model.first_train_report and model.first_train_report[1]["source"] == "watch"
                       else "the bad batch did not reach the weights"))
    fix, data = input_advice(model, bad_point.iteration, since=last.iteration)
    evidence = [first, low, last, bad_point, recovered]
    return finding(model, FAULTY_INPUT, "error", bad_point, message, fix, evidence,
                   cause="faulty input or loss layer", **data)


def rising(model):
    """SL802 (warning): no value went non-finite (yet), but a loss still climbing by orders
    of magnitude at the end of the log is an explosion under way (a log still being
    written, or a run a watch stopped)."""
    for track in model.loss_tracks():
        rise = track.rise()
        if rise is None or rise < RISING_RATIO or track.last is None:
            continue
        low, last = track.minimum, track.last
        if last.value < 0.5 * track.peak_after_min.value:
            continue  # it came back down
        base_lr = model.solver_field("base_lr")
        message = ("exploding gradients under way: the loss%s rose from %s (iteration %s) to %s "
                   "(iteration %s, the last in the log), %.1f orders of magnitude; nothing is "
                   "non-finite yet" % ("" if track is model.loss else " '%s'" % track.name,
                                       fmt(low.value), low.iteration, fmt(last.value),
                                       last.iteration, math.log10(rise)))
        fix = "lower base_lr%s by at least 10x, or clip the gradient" % (
            " (%s)" % base_lr if base_lr else "")
        return finding(model, EXPLODING, "warning", last, message, fix, [low, last],
                       cause="exploding gradients", rise=rise)
    return None


def from_start(model, point):
    """SL807: the first non-finite value came before any finite loss."""
    message = ("non-finite from the first iteration: %s at iteration %s, with no finite "
               "loss before it: the net computes NaN/Inf on its first batch"
               % (model.first_bad_words(), point.iteration))
    fix = ("run `safe-layers lint` on the net (pooling windows outside the input, BatchNorm at "
           "zero statistics, bad fillers); %s" % input_advice(model, point.iteration)[0])
    return finding(model, FROM_START, "error", point, message, fix, [point],
                   cause="non-finite from the start")
