"""SL806, SL814: what our layers' report lines and a watch's lines say (written by
safe_layers.reporting and safe_layers.reporting.watch_lines, read by their parsers)."""

from safe_layers.readers import layer_types
from safe_layers.tools import rule_table
from safe_layers.tools.diagnose.diagnosis import SKIPS_SHOWN
from safe_layers.tools.diagnose.rules.aborts import ABORTED
from safe_layers.tools.diagnose.rules.evidence import finding
from safe_layers.tools.diagnose.rules.input_advice import input_advice
from safe_layers.tools.diagnose.series import Point, fmt

CAUGHT = rule_table.rule("diagnose", "SL806", "error", "a report of our layers or of a watch", """
    A NaNGuard (or another safe_layers layer) or a watch with check_layers saw the
    non-finite values where they appeared and printed a report line: the layer, the pass
    (forward or backward), the phase, the iteration, the counts of NaN and Inf and the
    index of the first bad element. That is more exact than anything Caffe logs (its
    debug_info gives one mean per blob): the first report of the training phase names
    where to look.""")

WATCHED = rule_table.rule("diagnose", "SL814", "warning", "what the watch did", """
    ``safe-layers train`` and ``safe_layers.watch`` can skip a bad iteration, roll the
    solver back to a checkpoint (lowering base_lr) or stop the run. A run that finished
    that way finished with weights from a run that failed: the finding counts the skipped
    iterations, names each rollback (from which iteration to which checkpoint, base_lr
    before and after) and how the run ended. An error when the watch stopped the run.""")


def caught(model):
    """SL806: the first report of the training phase (else of any phase)."""
    chosen = model.first_train_report or model.first_report
    if chosen is None:
        return None
    event, fault = chosen
    layer, follows = fault["layer"], fault["follows"]
    who = "%s '%s'%s" % (fault["layer_type"] or "layer", layer,
                         " (after '%s')" % follows if follows else "")
    if fault["source"] == "watch":
        who = "the watch: layer '%s' (%s)" % (layer, fault["layer_type"])
    counts = ", ".join("%s=%d" % (label, fault[key]) for key, label in
                       (("nan", "nan"), ("posinf", "+inf"), ("neginf", "-inf")) if fault.get(key))
    message = ("%s caught non-finite %s in %s at iteration %s%s%s"
               % (who, fault["what"] or "values", fault["phase"] or "?", fault["iteration"],
                  ": " + counts if counts else "",
                  ", first bad at %s" % list(fault["first_index"]) if fault["first_index"] else ""))
    if fault["action"]:
        message += " (action=%s)" % fault["action"]
    others = ["%s (%d)" % (name, count) for name, count in model.report_layers.items() if name != layer]
    if others:
        message += "; reported too: %s" % ", ".join(others)
    watched = follows or layer
    producer = model.layer_named(watched)
    data_layers = layer_types.ALL_DATA
    if (producer is not None and producer.type in data_layers) or fault["layer_type"] in data_layers \
            or fault["layer_type"] == "Input":
        fix = input_advice(model, fault["iteration"])[0]
    elif fault["source"] == "watch":
        fix = ("layer '%s' is the first whose inputs were finite and whose output is not: look "
               "at its parameters and its bottoms%s" % (layer, "; " + fault["note"] if fault["note"] else ""))
    else:
        fix = ("'%s' is the first non-finite output the guards saw: look at that layer (and at "
               "what feeds it)" % watched)
    point = Point(fault["iteration"], float("nan"), event.line, event.text)
    return finding(model, CAUGHT, "error", point, message, fix, [point], layer=watched,
                   reports=model.reports, report=fault)


def _stop_words(model):
    """What the watch stopped the run for, in words."""
    _, fields, _ = model.watch_stop
    if fields["kind"] == "producer":
        return "non-finite %s '%s' %s, produced by %s '%s' in %s" % (
            fields["role"], fields["blob"], fields["what"], fields["layer_type"], fields["layer"],
            fields["pass"])
    parts = fields["message"].split("; ")
    if fields["kind"] == "stopped" and len(parts) > 1:
        return "%s; %s" % (parts[0], parts[-1])   # the fault, and the limit it hit
    return parts[0]


def _skip_words(model, skipped):
    its = model.skip_iterations
    shown = ", ".join(str(i) for i in its[:SKIPS_SHOWN])
    more = ", ..." if len(its) > SKIPS_SHOWN or skipped > model.skip_lines else ""
    return "skipped %d iteration%s (at %s %s%s)" % (
        skipped, "" if skipped == 1 else "s", "iteration" if len(its) == 1 and not more
        else "iterations", shown, more)


def _rollback_words(model, rollbacks):
    rolled = []
    for point, details in model.rollbacks:
        text = "from iteration %s (non-finite %s) to the checkpoint of iteration %s" % (
            details.get("at", "?"), details.get("cause", "?"), point.iteration)
        if details.get("further_back"):
            text += " (one further back: the previous one failed again)"
        elif details.get("same_again"):
            text += " (the same one again: none older was kept)"
        if details.get("base_lr_to") is not None:
            text += ", base_lr %s -> %s" % (fmt(details["base_lr_from"]), fmt(details["base_lr_to"]))
        rolled.append(text)
    more = "; ..." if rollbacks > len(rolled) else ""
    return "rolled back %s: %s%s" % ("once" if rollbacks == 1 else "%d times" % rollbacks,
                                     "; ".join(rolled), more)


def watched(model):
    """SL814: the skips, the rollbacks and the end of a watched run."""
    skipped, rollbacks, ending = model.skipped(), model.rollback_count(), model.ending()
    stopped = model.watch_stop is not None and ending == "stopped"
    if not (skipped or rollbacks or stopped):
        return None
    acts = []
    if skipped:
        acts.append(_skip_words(model, skipped))
    if rollbacks:
        acts.append(_rollback_words(model, rollbacks))
    evidence = [model.first_skip, model.last_skip] + [p for p, _ in model.rollbacks]
    if model.last_rollback is not None:
        evidence.append(model.last_rollback[0])
    if model.watch_summary is not None:
        evidence.append(model.watch_summary[0])
    if stopped:
        point, message, fix = _stopped(model, acts, skipped, rollbacks)
        evidence.append(point)
        severity = "error"
    else:
        point, message, fix, done = _went_on(model, acts, rollbacks, ending)
        evidence.extend(done)
        severity = "warning"
    data = {"skipped": skipped, "rollbacks": rollbacks, "ended": ending,
            "rolled_back": [dict(details, line=p.line, to=p.iteration) for p, details in model.rollbacks],
            "stopped_at": model.watch_stop[0].iteration if stopped else None}
    return finding(model, WATCHED, severity, point, message, fix, evidence, **data)


def _stopped(model, acts, skipped, rollbacks):
    """(point, message, fix) of a run the watch stopped."""
    point = model.watch_stop[0]
    how = "stopped the run at iteration %s: %s" % (point.iteration, _stop_words(model))
    if acts:
        message = "the watch %s, then %s" % (" and ".join(acts), how)
        fix = ("%s did not get past the fault: fix the cause above"
               % " and ".join(w for w, n in (("skipping", skipped), ("rolling back", rollbacks)) if n))
    else:
        message = "the watch %s (its first fault: on_nonfinite stop)" % how
        fix = ("fix the cause above; to train past a bad iteration instead: `safe-layers "
               "train --on-nonfinite skip` (a bad batch), with `--rollback-after K "
               "--lr-factor F` for a run that diverges")
    return point, message, fix


def _went_on(model, acts, rollbacks, ending):
    """(point, message, fix, evidence) of a run the watch kept going: it finished,
    aborted or the log is cut off."""
    # The first thing the watch did (a log cut at the start may hold its summary only).
    point = next(p for p in (model.first_skip, model.rollbacks[0][0] if model.rollbacks else None,
                             model.watch_summary[0] if model.watch_summary else None) if p)
    lr_left = model.last_rollback[1].get("base_lr_to") if model.last_rollback else None
    evidence = []
    if ending == "finished":
        end = "the run then finished at iteration %s (Optimization Done.)" % model.iteration
        evidence.append(Point(None, None, model.done.line, model.done.text))
        fix = ("the weights come from a run that %s: fix the cause above" %
               ("was rolled back" if rollbacks else "skipped iterations"))
        if lr_left is not None:
            fix += "; the rollbacks left base_lr at %s, a value to start from" % fmt(lr_left)
    elif ending == "aborted":
        end = "then the run aborted (%s)" % ABORTED
        fix = "see %s and the cause above" % ABORTED
    else:
        end = ("the log ends at iteration %s without 'Optimization Done.' (cut off, or still "
               "running)" % model.iteration)
        fix = "fix the cause above"
    message = "the watch %s; %s" % (" and ".join(acts), end)
    return point, message, fix, evidence
