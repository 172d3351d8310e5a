"""SL802, SL803, SL807, SL815: what the training losses did before the first non-finite
value (the cause, read from the segment of the run the first failure happened in), said
no more strongly than the log shows it.

Each finding carries a ``confidence``: "high" where the log shows what the verdict says,
"medium" where it is consistent with it but leaves an alternative open (the iterations
the log does not show, a rise short of an explosion: the message names it), and
"insufficient" (SL815) where too few finite losses were logged to tell the causes apart."""

import math

from safe_layers.tools import rule_table
from safe_layers.tools.diagnose.rules.evidence import finding
from safe_layers.tools.diagnose.rules.input_advice import input_advice
from safe_layers.tools.diagnose.rules.loss_outputs import LossOutputs
from safe_layers.tools.diagnose.series import finite, fmt

# The loss climbed at least this many times above its first value (an order of magnitude)
# before the NaN (Track.growth): a softmax
# loss grows only linearly with the logits, so a classifier blown up by a high base_lr
# (measured: 2.3 -> 72.8, 31x, then NaN, examples/demo.py high_lr) rarely shows more.
EXPLODING_RATIO = 10.0
RISING_RATIO = 1000.0     # ... and, with nothing non-finite yet, 1000x up to the log's end
# The fewest finite losses before the failure from which a trend (falling, flat, climbing)
# is read: one value is no curve, two are one step.
TREND_POINTS = 3

EXPLODING = rule_table.rule("diagnose", "SL802", "error", "exploding gradients", """
    The loss climbed an order of magnitude or more above its first value, then went
    non-finite: each update made the weights larger, until a product overflowed. Caffe
    does not bound an update: SGDSolver::ApplyUpdate scales the gradient by the rate and
    subtracts it (sgd_solver.cpp:109-127), and clip_gradients is off unless set
    (default -1, caffe.proto:186). With several weighted losses, the one that exploded
    first is named with its loss_weight. Said with medium confidence when the climb
    rests on two logged values (one step). A loss still climbing by three orders of
    magnitude at the end of a log with nothing non-finite yet is reported as a warning:
    the explosion is under way.""")

FAULTY_INPUT = rule_table.rule("diagnose", "SL803", "error", "faulty input or loss layer", """
    The loss was falling or flat, then non-finite at once, without growing first: one
    batch brought the NaN. Caffe's data layers copy what the records hold unchecked
    (DataTransformer::Transform, data_transformer.cpp:42), so a NaN or Inf in the data, or
    a label outside the classes, reaches the loss; so does a loss layer that divides by
    a count that can be 0. The finding names the data sources to ``safe-layers scan``,
    the records the bad iteration read (Data layers read in key order) and where a
    NaNGuard stops at the bad batch. It needs a trend: at least 3 finite losses logged
    before the failure (fewer: SL815). With display > 1 the iterations between the last
    finite loss and the first non-finite one are not in the log, and a loss that climbed
    within them would read the same: the finding says so (confidence medium), as it does
    for a rise of 1.5x-10x. In a net with several losses, the output that went
    non-finite is named with its loss_weight and layer, the ones that stayed finite too,
    and the advice follows its loss type where the log prints the net.""")

FROM_START = rule_table.rule("diagnose", "SL807", "error", "non-finite from the first iteration", """
    The first iteration already gave a non-finite value, with no finite loss before it:
    the net computes NaN or Inf on its first batch, before any update could be the cause.
    Causes: pooling windows lying outside the input (pooling_layer.cpp: AVE divides 0 by
    0, MAX outputs -FLT_MAX), BatchNorm at zero statistics, fillers, or the first batch
    of data itself. ``safe-layers lint`` checks the net with real shapes. In a net with
    several losses of which some stayed finite, the one that did not is named with its
    loss_weight, layer and type, the blobs that feed it and none of the finite ones, and
    the advice of its loss type (SmoothL1's box targets, a classifier's labels,
    EuclideanLoss's scale). A log that starts after iteration 0 (cut, or a resumed run)
    is said to show the first iteration it holds, not the run's first.""")

UNDETERMINED = rule_table.rule("diagnose", "SL815", "error", "non-finite; the log cannot tell the cause", """
    The loss went non-finite with fewer than 3 finite losses logged before it (a large
    display, a short run): one value is no curve, so a loss that climbed to overflow
    (exploding gradients, SL802) and one bad batch (SL803) read the same, the more so
    when the log shows only every display-th iteration and the explosion fits in one
    window. The finding says so instead of picking one, and names what would tell them:
    display: 1, debug_info: true (each layer's values on display iterations), or
    ``safe-layers train``, which names the layer and iteration of the first non-finite
    value; and the fixes of both, to try one at a time.""")


def cause(model):
    """SL802, SL803 or SL815 (SL807 without a finite loss before): what the losses did
    before the first non-finite value; None when a report caught it while the loss was sane."""
    point, what = model.first_bad
    tracks = model.loss_tracks()
    outputs = LossOutputs(model)
    history = [t for t in tracks if t.minimum is not None]
    bad_tracks = [t for t in tracks if t.bad is not None]
    if not history and model.loss.minimum is None:
        return from_start(model, point, outputs)
    caught = what == "report" and not bad_tracks and model.loss.bad is None
    # The loss that went wrong first; the one that grew most if none did.
    if bad_tracks:
        culprit = min(bad_tracks, key=lambda t: t.bad.line)
    else:
        culprit = max(history, key=lambda t: t.rise() or 0)
    if culprit.minimum is None:
        culprit = model.loss if model.loss.minimum is not None else culprit
    if culprit.minimum is None:
        return from_start(model, point, outputs)
    exploding = (culprit.growth() or 0) >= EXPLODING_RATIO
    if caught and not exploding:
        return None  # a guard or watch caught it while the loss was sane: SL806 says where
    bad_point = culprit.bad or model.loss.bad or point
    several = len([t for t in tracks if t is not model.loss]) > 1
    name = "" if culprit is model.loss or not several else " '%s'" % culprit.name
    if exploding:
        return _exploding(model, culprit, tracks, several, bad_point, caught, name)
    if culprit.count < TREND_POINTS:
        return _undetermined(model, culprit, bad_point, name, outputs)
    return _faulty_input(model, culprit, bad_point, name, outputs)


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
    confidence = "high"
    if culprit.count < TREND_POINTS:
        # Two values: one step up. A bad batch that gave a large finite loss reads the same.
        confidence = "medium"
        message += ("; the climb rests on %d logged values (one step: a bad batch with a large "
                    "finite loss reads the same)" % culprit.count)
    data = {"cause": "exploding gradients", "rise": rise, "confidence": confidence,
            "finite_values": culprit.count}
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
        data.update(LossOutputs(model).data())
        data["output"] = culprit.name
        data["loss_weight"] = culprit.weight
    else:
        fix += "; or bound the gradient: clip_gradients in the solver, or a GradientClip layer above the loss"
    evidence = [low, high, bad_point, model.solver_point("base_lr")]
    return finding(model, EXPLODING, "error", bad_point, message, fix, evidence, layer=layer, **data)


def _unlogged(last, bad):
    """(first, last) of the iterations between the last finite loss and the first
    non-finite one that the log does not show (display > 1), or None."""
    if bad.iteration is None or last.iteration is None or bad.iteration - last.iteration <= 1:
        return None
    return last.iteration + 1, bad.iteration - 1


def _gap_words(last, bad):
    """'; the log shows every Nth iteration: it went non-finite in iterations A-B' (display
    > 1), else ''."""
    if _unlogged(last, bad) is None:
        return ""
    return ("; the log shows every %dth iteration: it went non-finite in iterations %d-%d"
            % (bad.iteration - last.iteration, last.iteration + 1, bad.iteration))


def _faulty_input(model, culprit, bad_point, name, outputs):
    """SL803: ``culprit`` was falling or flat, then suddenly non-finite."""
    first, low, high = culprit.first, culprit.minimum, _peak(culprit)
    doubts = []
    if low.value < first.value * 0.9:
        trend = "fell from %s (iteration %s) to %s (iteration %s)" % (
            fmt(first.value), first.iteration, fmt(low.value), low.iteration)
    elif (culprit.growth() or 1.0) >= 1.5:
        trend = "rose from %s (iteration %s) to %s (iteration %s), %.1fx: less than an order " \
                "of magnitude" % (fmt(first.value), first.iteration, fmt(high.value), high.iteration,
                                  culprit.growth())
        doubts.append("a rise of %.1fx may be the start of an explosion" % culprit.growth())
    else:
        trend = "stayed near %s" % fmt(first.value)
    last = culprit.last
    message = ("faulty input or loss layer: the loss%s %s, then became %s at iteration %s without "
               "growing first (last finite %s at iteration %s%s)"
               % (name, trend, fmt(bad_point.value), bad_point.iteration, fmt(last.value),
                  last.iteration, _gap_words(last, bad_point)))
    unlogged = _unlogged(last, bad_point)
    if unlogged is not None:
        doubts.append("the log does not show iterations %d-%d: a loss that climbed within them "
                      "would read the same (display: 1 shows every one)" % unlogged)
    recovered = culprit.recovered
    if recovered is not None:
        message += ("; training went on: the loss is finite again from iteration %s (%s)"
                    % (recovered.iteration, "a watch skipped the bad iteration"
                       if model.first_train_report and model.first_train_report[1]["source"] == "watch"
                       else "the bad batch did not reach the weights"))
    if outputs.split():
        message += "; %s" % outputs.words()
    if doubts:
        message += "; not certain: %s" % "; ".join(doubts)
    fix, data = input_advice(model, bad_point.iteration, since=last.iteration)
    advice, basis = outputs.advice() if outputs.several else ("", None)
    if advice:
        fix = "%s; %s" % (advice, fix)
    data.update(outputs.data())
    if basis:
        data["advice_from"] = basis
    evidence = [first, low, last, bad_point, recovered]
    return finding(model, FAULTY_INPUT, "error", bad_point, message, fix, evidence,
                   layer=outputs.layer(), cause="faulty input or loss layer",
                   confidence="medium" if doubts else "high", finite_values=culprit.count,
                   unlogged=list(unlogged) if unlogged else None, **data)


def _undetermined(model, culprit, bad_point, name, outputs):
    """SL815: too few finite losses before the failure to tell SL802 from SL803."""
    last = culprit.last
    unlogged = _unlogged(last, bad_point)
    count = "one finite value" if culprit.count == 1 else "%d finite values" % culprit.count
    message = ("the log cannot tell the cause: the loss%s had %s before it became %s at iteration "
               "%s (last finite %s at iteration %s%s); %s, so exploding gradients (SL802: a loss "
               "that climbs until it overflows) and a faulty input or loss layer (SL803: one bad "
               "batch) read the same here"
               % (name, count, fmt(bad_point.value), bad_point.iteration, fmt(last.value),
                  last.iteration, _gap_words(last, bad_point),
                  "one value is no curve" if culprit.count == 1 else "two values are one step"))
    if unlogged is not None:
        message += ", and an explosion fits in the iterations the log does not show"
    if outputs.split():
        message += "; %s" % outputs.words()
    base_lr = model.solver_field("base_lr")
    tell = ("to tell them, rerun with display: 1 (every iteration's loss), or debug_info: true "
            "(each layer's values on display iterations), or under `safe-layers train` (it names "
            "the layer and iteration of the first non-finite value)")
    advice, data = input_advice(model, bad_point.iteration, since=last.iteration)
    fix = ("%s; the fixes of both, one at a time: lower base_lr%s by 10x (an explosion goes "
           "away), and %s" % (tell, " (%s)" % base_lr if base_lr else "", advice))
    data.update(outputs.data())
    evidence = [culprit.first, last, bad_point, model.solver_point("display"),
                model.solver_point("base_lr")]
    return finding(model, UNDETERMINED, "error", bad_point, message, fix, evidence,
                   layer=outputs.layer(), cause="undetermined",
                   candidates=["exploding gradients", "faulty input or loss layer"],
                   confidence="insufficient", finite_values=culprit.count,
                   unlogged=list(unlogged) if unlogged else None, **data)


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


def from_start(model, point, outputs=None):
    """SL807: the first non-finite value came before any finite loss."""
    outputs = outputs or LossOutputs(model)
    start, confidence = _start_words(model, point)
    data = outputs.data()
    if outputs.split():
        # Some losses are finite: the forward pass they read worked; what only the
        # non-finite ones read did not.
        only = outputs.only_bad_reads()
        message = ("non-finite from %s: %s: what feeds the finite losses computes finite "
                   "values, so the non-finite one comes from what only %s reads%s"
                   % (start, outputs.words(), " and ".join("'%s'" % o.name for o in outputs.bad),
                      " (%s)" % ", ".join("'%s'" % b for b in only) if only else ""))
        advice, basis = outputs.advice()
        fix = advice or ("look at what feeds '%s' and none of the finite losses" % outputs.bad[0].name)
        fix += "; a NaNGuard (action: abort) on the bottoms of '%s' stops at the first bad batch" % (
            outputs.bad[0].layer or outputs.bad[0].name)
        if basis:
            data["advice_from"] = basis
        if only:
            data["only_bad_reads"] = only
        evidence = [point] + [o.track.bad for o in outputs.bad] + [o.track.last for o in outputs.finite]
    else:
        what = outputs.words() if outputs.several and outputs.bad else model.first_bad_words()
        message = ("non-finite from %s: %s at iteration %s, with no finite loss before it: the net "
                   "computes NaN/Inf on its first batch" % (start, what, point.iteration))
        fix = ("run `safe-layers lint` on the net (pooling windows outside the input, BatchNorm at "
               "zero statistics, bad fillers); %s" % input_advice(model, point.iteration)[0])
        evidence = [point]
    if confidence != "high":
        message += "; not certain: %s" % confidence[1]
        confidence = "medium"
    return finding(model, FROM_START, "error", point, message, fix, evidence,
                   layer=outputs.layer(), cause="non-finite from the start", confidence=confidence,
                   **data)


def _start_words(model, point):
    """('the first iteration' or what the log's first iteration is, "high" or ("medium",
    the doubt in words))."""
    first = model.first_iteration
    if model.resumed is not None:
        return ("the first iteration after resuming from %s" % model.resumed.path,
                ("medium", "the snapshot's weights may already be non-finite"))
    if first is not None and first > 0 and point.iteration is not None and point.iteration >= first:
        return ("the first iteration in the log (%d)" % first,
                ("medium", "the log starts at iteration %d: what came before is not in it" % first))
    return "the first iteration", "high"
