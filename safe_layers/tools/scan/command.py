"""Find the records of a dataset that would poison training, reading it as Caffe does.

    safe-layers scan examples/mnist/mnist_train_lmdb --num-classes 10
    safe-layers scan train_h5_list.txt                 # HDF5Data's source list
    safe-layers scan train_val.prototxt --plot labels.png   # every data layer's source

LMDB / LevelDB of Datums (as the ``Data`` layer reads them, in key order):
  SL901 non-finite float_data; SL902 data/float_data size not channels x height x width
  (or no values at all); SL903 a shape that differs from the first record's (Caffe shapes
  each batch from its first record); SL904 a label outside [0, --num-classes), or negative
  (kept out of the label statistics); SL905 an encoded image that does not decode
  (checked with Pillow when installed, else counted and reported unchecked); SL906 a value
  that is not a Datum; SL907 a database with no record.
HDF5 (as ``HDF5Data`` reads it: the source list, one dataset per top, converted to
float32):
  SL920 a listed file that does not exist; SL921 a top with no dataset of that name;
  SL922 a dataset that is neither float nor integer; SL923 non-finite values (rows named;
  also finite float64 values that overflow float32); SL924 tops whose dimension 0
  differ within a file; SL925 a dataset whose shape past dimension 0 differs from the
  first file's; SL926 a list that names no file.
Labels:
  SL910 classes absent from the whole set; SL911 classes likely absent from a batch at the
  net's batch size (the label-frequency trap: a loss normalised per class divides by
  zero); SL912 records stored in label order (Caffe reads LMDB/LevelDB in key order, so
  each batch then holds one or two classes).
Given a net or solver prototxt: SL930 a data layer whose source does not exist; the
number of classes from the layer feeding the loss, the batch size and ignore_label from
the net.

Streams (never loads a whole database), never writes into the source. Exit 0 clean,
1 something found, 2 unreadable input (a corrupt database says where).
"""

import os
import sys

from safe_layers.core.errors import InputError
from safe_layers.tools import findings as findings_module
from safe_layers.tools import rule_table
from safe_layers.tools.scan.datum_records import scan_database
from safe_layers.tools.scan.hdf5_sources import scan_hdf5
from safe_layers.tools.scan.label_plot import write_plot
from safe_layers.tools.scan.label_stats import label_findings, label_table
# targets_from_prototxt is also read from here by `safe-layers train` (its source check).
from safe_layers.tools.scan.net_targets import targets_from_prototxt
from safe_layers.tools.scan.source_report import SourceReport
from safe_layers.tools.scan.targets import Target, backend_of, is_prototxt

HELP = "find the records of an LMDB/LevelDB/HDF5 dataset that would poison training"


def add_arguments(parser):
    parser.add_argument("source", help="an LMDB or LevelDB directory, an HDF5Data list file or .h5 "
                                       "file, or a net/solver prototxt (scans each data layer's source)")
    parser.add_argument("--backend", choices=("auto", "lmdb", "leveldb", "hdf5"), default="auto",
                        help="how to read SOURCE (default: from what is on disk)")
    parser.add_argument("--limit", type=int, metavar="N", help="scan only the first N records (rows)")
    parser.add_argument("--num-classes", type=int, metavar="K",
                        help="labels must lie in [0, K) (default: from the layer feeding the net's loss)")
    parser.add_argument("--ignore-label", type=int, metavar="L",
                        help="a label the loss ignores (default: the net's loss_param.ignore_label)")
    parser.add_argument("--batch-size", type=int, metavar="B",
                        help="batch size for the label-frequency table (default: the data layer's)")
    parser.add_argument("--tops", metavar="NAMES",
                        help="HDF5: the datasets to read, comma-separated (default: the data layer's "
                             "tops, else every dataset of the first file)")
    parser.add_argument("--label", default="label", metavar="NAME",
                        help="HDF5: the dataset holding class labels (default: label)")
    parser.add_argument("--max-per-rule", type=int, default=100, metavar="N",
                        help="list at most N records per rule and source; the rest are counted "
                             "(default: 100)")
    parser.add_argument("--plot", metavar="PNG", help="write the label histogram and the "
                                                      "batch-absence curves as a PNG")
    parser.add_argument("--select", metavar="IDS", help="only these rule ids or prefixes (SL90,SL923)")
    parser.add_argument("--ignore", metavar="IDS", help="leave out these rule ids or prefixes")
    findings_module.add_list_rules_argument(parser, "scan")
    findings_module.add_format_argument(parser)


def targets_for(args):
    """(targets, findings) for the command line's SOURCE."""
    source = args.source
    if not os.path.exists(source):
        raise InputError("%s: no such file or directory" % source)
    if args.backend == "auto" and is_prototxt(source):
        targets, notes = targets_from_prototxt(source)
    else:
        targets, notes = [Target(source, backend_of(source, args.backend))], []
    for target in targets:
        if args.num_classes is not None:
            target.num_classes, target.classes_from = args.num_classes, "--num-classes"
        if args.ignore_label is not None:
            target.ignore_label = args.ignore_label
        if args.batch_size is not None:
            target.batch_size = args.batch_size
        if args.tops:
            target.tops = [t.strip() for t in args.tops.split(",") if t.strip()]
    return targets, notes


def _refuse_overwrite(plot, sources):
    if not plot:
        return
    target = os.path.realpath(plot)
    for source in sources:
        real = os.path.realpath(source)
        if target == real or target.startswith(real.rstrip(os.sep) + os.sep):
            raise InputError("--plot %s would write into the scanned source %s" % (plot, source))


def run(args):
    if args.limit is not None and args.limit < 1:
        raise InputError("--limit must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    if args.num_classes is not None and args.num_classes < 1:
        raise InputError("--num-classes must be at least 1")
    known = rule_table.ids_of("scan")
    select = findings_module.rule_list(args.select, known=known, option="--select")
    ignore = findings_module.rule_list(args.ignore, known=known, option="--ignore")
    if args.plot:
        findings_module.check_output_path(args.plot, "the plot")
    targets, notes = targets_for(args)
    _refuse_overwrite(args.plot, [args.source] + [t.path for t in targets])
    reports = []
    for target in targets:
        report = SourceReport(target, args.max_per_rule)
        try:
            if target.backend == "hdf5":
                scan_hdf5(report, args.limit, args.label)
            else:
                scan_database(report, args.limit)
        except InputError as exc:
            # What was read before the damage is still reported; the exit status is 2.
            report.error = str(exc)
        report.extra.extend(label_findings(report))
        reports.append(report)
    found = list(notes)
    for report in reports:
        found.extend(report.findings())
    found = findings_module.select(found, select, ignore)
    summary = []
    for report in reports:
        t = report.target
        head = "%s: %s, %d %s scanned%s" % (t.path, t.backend, report.records,
                                             "rows" if t.backend == "hdf5" else "records",
                                             " (--limit reached)" if report.truncated_at else "")
        if report.shape is not None:
            head += ", shape %s" % "x".join(map(str, report.shape))
        if report.encoded:
            head += ", %d encoded" % report.encoded
        if t.layers:
            head += "; read by " + "; ".join(t.layers)
        faults = sum(report.rules.counts.values())
        head += "; %d faulty" % faults if faults else "; no faulty record"
        if report.error:
            head += "; STOPPED: " + report.error
        summary.append(head)
        summary.extend(label_table(report))
    if args.plot:
        write_plot(reports, args.plot)
        summary.append("plot: %s" % args.plot)
    status = findings_module.emit(found, args.format, extra={"sources": [r.as_dict() for r in reports]},
                                  summary="\n".join(summary), stream=sys.stdout)
    errors = [r.error for r in reports if r.error]
    if errors:
        raise InputError("; ".join(errors))
    return status
