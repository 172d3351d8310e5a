"""Say what killed a Caffe training run, from its log, with the lines that prove it.

    safe-layers diagnose train.log
    safe-layers diagnose train.log --plot train.png --format json
    safe-layers diagnose train.log --csv train.log       # parse_log.py's train.log.train/.test
    safe-layers diagnose a.log b.log --plot runs.png      # several runs on one figure

Reads a log of `caffe train`, of pycaffe (glog on stderr) or of `safe-layers train`, also
one still being written or cut off, in one streaming pass (memory does not grow with the
log). Finds the first iteration where anything went non-finite and classifies it in the
six known causes of NaN in Caffe training:

  SL801 bad learning-rate policy: lr itself non-finite or negative; names the policy
        and the solver field to fix (``poly`` without ``max_iter`` ...)
  SL802 exploding gradients: the loss climbed an order of magnitude or more above its
        first value before it went non-finite; with several losses, names the output that exploded and its weight
  SL803 faulty input or loss layer: the loss was falling (or flat), then suddenly
        non-finite; names the data layer's source to ``scan`` and where to guard
  SL807 non-finite from the first iteration: the net computes NaN on its first batch;
        with several losses, the output that went non-finite, its weight, the ones that
        stayed finite and the advice of its loss type
  SL815 non-finite with too few finite losses before it to tell SL802 from SL803 (a
        large display): says so, and what would tell them
  SL804 with debug_info: the first layer, in forward order, whose output (or weights)
        went non-finite
  SL805 with debug_info: the gradient that grew fastest in the iterations before
  SL806 a safe_layers layer's report: the layer, pass and iteration it caught
  SL808 the run aborted (a Caffe CHECK / LOG(FATAL), a Python layer's exception)
  SL809 a test net output non-finite while training stayed finite
  SL810 gradient clipping: how often, and a non-finite norm it let through
  SL811 the learning rate reached 0: nothing learns from there on
  SL812 the run finished without a single training iteration (``max_iter`` 0 or unset:
        `caffe train` stops at once, and its final test reports an untrained net)
  SL813 a test accuracy printed beside a non-finite test loss: Caffe's Accuracy layer counts
        a sample whose true-class score is NaN as correct, so a dead net scores 1.0
  SL814 what a watch did (``safe-layers train``, ``safe_layers.watch``): the iterations it
        skipped, its rollbacks (from which iteration to which checkpoint, base_lr before
        and after), and how the run ended (finished, stopped by the watch, cut off)
  SL820 the net died without a NaN: the training loss settled at the chance level of its
        softmax loss (ln C) after a spike or after having learned, test accuracy at chance

Every finding carries a confidence (``--format json``): "high" where the log shows what it
says, "medium" where it leaves an alternative open (the message names it: iterations the
log does not show, a rise short of an explosion), "insufficient" for SL815.

A rollback sends the run back to a checkpoint: the iterations after it are a new segment
of the run. The cause (SL802/SL803/SL807 and their evidence) is read from the segment the
first failure happened in; the iterations a rollback replays are left out of it.

Exit 0 when nothing went wrong, 1 when a cause was found, 2 when the file is not a
readable Caffe log.
"""

import os
import sys

from safe_layers.core.errors import InputError
from safe_layers.tools import findings as findings_module
from safe_layers.tools import rule_table
from safe_layers.tools.diagnose import csv_tables, rules
from safe_layers.tools.diagnose.plot import write_plot
from safe_layers.tools.diagnose.reading import read_log
from safe_layers.tools.diagnose.series import fmt
# The run's model and its memory bounds, read through this module by tests/tools/test_diagnose.py.
from safe_layers.tools.diagnose.diagnosis import GRADIENT_WINDOW, Diagnosis  # noqa: F401
from safe_layers.tools.diagnose.series import HEATMAP_COLUMNS, SERIES_POINTS  # noqa: F401

HELP = "explain a dead Caffe run from its training log: cause, iteration, layer, evidence lines"

# Every rule of this command (id -> summary), from the one rule table: --select / --ignore
# are checked against these ids; the module docstring and README's table list the same.
RULES = {r.id: r.summary for r in rule_table.rules_of("diagnose")}
KNOWN_RULE_IDS = tuple(RULES)


def add_arguments(parser):
    parser.add_argument("log", nargs="+",
                        help="a Caffe training log (caffe train, pycaffe, safe-layers train; "
                             "gzipped too; - for standard input); several: each diagnosed, and "
                             "--plot overlays them")
    parser.add_argument("--plot", metavar="PNG",
                        help="write loss (raw and smoothed), lr (log axis) and test outputs over "
                             "iterations, the first non-finite point and the stop marked, and, with "
                             "debug_info, a per-layer heatmap of mean |diff|")
    parser.add_argument("--smoothing", metavar="W", type=_smoothing, default=None,
                        help="--plot's moving-average weight in [0, 1) (TensorBoard's smoothing; "
                             "0: none; default: a window of 1/50th of the points)")
    parser.add_argument("--csv", metavar="PREFIX",
                        help="write Caffe's parse_log.py tables: PREFIX.train and PREFIX.test "
                             "(NumIters, Seconds, LearningRate, every output); a folder (DIR/): "
                             "DIR/<log name>.train and .test per log")
    parser.add_argument("--select", metavar="IDS", help="only these rule ids or prefixes (SL80,SL811)")
    parser.add_argument("--ignore", metavar="IDS", help="leave out these rule ids or prefixes")
    findings_module.add_list_rules_argument(parser, "diagnose")
    findings_module.add_format_argument(parser)


def _smoothing(text):
    """--smoothing's value: a float in [0, 1)."""
    import argparse
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < 1:
        raise argparse.ArgumentTypeError("%r: a weight in [0, 1), such as 0.9" % text)
    return value


def summary_lines(diagnosis, found):
    """The text lines after the findings: each finding's evidence, then the run in brief."""
    d = diagnosis
    out = []
    for finding in found:
        evidence = finding.data.get("evidence") or []
        if evidence:
            out.append("evidence for %s (%s):" % (finding.rule, finding.message.split(":")[0]))
            for item in evidence:
                out.append("  %s:%d: %s" % (d.path, item["line"], (item["text"] or "").strip()))
    out.append(_run_line(d))
    if d.first_bad is None and not any(f.severity == "error" for f in found):
        out.append("no non-finite value in the training log")
    ending = d.ending()
    if ending == "finished":
        out.append("the run finished (Optimization Done.)")
    elif ending == "stopped":
        point = d.watch_stop[0]
        out.append("the watch stopped the run at iteration %s (line %d)" % (point.iteration, point.line))
    elif ending == "cut off":
        out.append("the log ends without 'Optimization Done.': the run is still going or was cut off "
                   "(or it ran through pycaffe's solver.step(), which never writes it)")
    if d.unreadable_reports:
        out.append("%d safe_layers lines could not be parsed by reporting.parse_line (first: line %d, %s); "
                   "skipped" % (d.unreadable_reports, d.first_unreadable_report.line,
                                d.first_unreadable_report.error))
    if d.incomplete is not None:
        out.append("line %d has no newline (still being written or cut off): not read"
                   % d.incomplete.line)
    return out


def _run_line(d):
    """'log: N lines, iterations A-B, ...': the run read, in one line."""
    run = "log: %d lines" % d.lines
    if d.earlier_runs:
        run = "log: %d lines holding %d runs (each from an \"Initializing solver\" line: %s); " \
              "this is about the last, from line %d" % (
                  d.lines, len(d.earlier_runs) + 1,
                  ", ".join("..." if n is None else str(n) for n in d.earlier_runs.shown() + [d.run_start]),
                  d.run_start)
    if d.first_iteration is not None:
        run += ", iterations %s-%s" % (d.first_iteration, d.iteration)
    if d.segments > 1:
        run += " in %d segments (%d rollback%s)" % (d.segments, d.segments - 1,
                                                   "" if d.segments == 2 else "s")
    last = d.last_finite_loss
    if last is not None:
        run += ", last finite loss %s at iteration %s" % (fmt(last.value), last.iteration)
    if d.debug_blocks:
        run += ", %d debug_info iterations" % d.debug_blocks
    if d.reports:
        run += ", %d safe_layers report lines" % d.reports
    return run


def json_extra(diagnosis):
    """What ``--format json`` adds beside the findings: the run, its curves, its settings."""
    d = diagnosis
    first = None
    if d.first_bad is not None:
        point, what = d.first_bad
        first = dict(point.as_dict(), what=what, words=d.first_bad_words())
    return {"log": d.path, "lines": d.lines, "runs": [n for n in d.earlier_runs.shown() if n is not None] + [d.run_start],
            "run_count": len(d.earlier_runs) + 1,
            "first_iteration": d.first_iteration,
            "last_iteration": d.iteration, "finished": bool(d.done), "ended": d.ending(),
            "segments": d.segments, "skipped": d.skipped(), "rollbacks": d.rollback_count(),
            "incomplete_last_line": d.incomplete.line if d.incomplete is not None else None,
            "first_nonfinite": first, "lr_policy": d.lr_policy(),
            "solver": d.solver.fields if d.solver is not None else None,
            "forward_order": d.forward_order, "debug_info_iterations": d.debug_blocks,
            "report_lines": d.reports,
            "loss": d.loss.series.points, "lr": d.lr_series.points,
            "outputs": {name: t.series.points for name, t in d.outputs.items()},
            **d.timeline.as_json()}


def _check_outputs(args):
    """Every output path, checked before any log is read (exit 2, nothing written)."""
    inputs = {os.path.realpath(log) for log in args.log if log != "-"}
    if args.plot:
        if os.path.realpath(args.plot) in inputs:
            raise InputError("--plot %s would overwrite the log" % args.plot)
        findings_module.check_output_path(args.plot, "the plot")
    csv_paths = {}
    if args.csv:
        csv_paths = csv_tables.output_paths(args.csv, args.log)
        for pair in csv_paths.values():
            for path in pair:
                findings_module.check_output_path(path, "the --csv table")
    if args.log.count("-") > 1:
        raise InputError("- (standard input) can be read once")
    return csv_paths


def run(args):
    known = rule_table.ids_of("diagnose")
    selected = findings_module.rule_list(args.select, known=known, option="--select")
    ignored = findings_module.rule_list(args.ignore, known=known, option="--ignore")
    csv_paths = _check_outputs(args)
    diagnoses, found, summaries = [], [], []
    for log in args.log:
        diagnosis = read_log(log, tables=bool(csv_paths))
        these = findings_module.select(rules.findings(diagnosis), selected, ignored)
        summary = summary_lines(diagnosis, these)
        if csv_paths:
            summary += csv_tables.write_tables(diagnosis.tables.tables(), csv_paths[log])
        diagnoses.append(diagnosis)
        found += these
        summaries.append((these, summary))
    said = []
    if args.plot:
        write_plot(diagnoses, args.plot, args.smoothing)
        said.append("plot: %s" % args.plot)
    if len(diagnoses) == 1:
        return findings_module.emit(found, args.format, extra=json_extra(diagnoses[0]),
                                    summary="\n".join(summaries[0][1] + said), stream=sys.stdout)
    if args.format == "json":
        return findings_module.emit(found, "json", stream=sys.stdout,
                                    extra={"logs": [json_extra(d) for d in diagnoses]})
    for these, summary in summaries:
        findings_module.emit(these, "text", summary="\n".join(summary), stream=sys.stdout)
    if said:
        sys.stdout.write("\n".join(said) + "\n")
    return findings_module.exit_status(found)
