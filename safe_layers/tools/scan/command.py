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

import math
import os
import sys

from safe_layers.tools import findings as findings_module
from safe_layers.core.errors import InputError
from safe_layers.tools.findings import Finding

HELP = "find the records of an LMDB/LevelDB/HDF5 dataset that would poison training"

# Every rule scan reports (--select / --ignore accept these ids and their prefixes).
RULES = {
    "SL901": "non-finite float_data",
    "SL902": "data/float_data size not channels x height x width",
    "SL903": "a shape other than the first record's",
    "SL904": "a label outside [0, K)",
    "SL905": "an encoded image that does not decode",
    "SL906": "a value that is not a Datum",
    "SL907": "a database with no record",
    "SL910": "classes absent from the whole set",
    "SL911": "classes likely absent from a batch at the batch size",
    "SL912": "records stored in label order",
    "SL920": "HDF5: a listed file that does not exist",
    "SL921": "HDF5: a top with no dataset of its name",
    "SL922": "HDF5: a dataset neither float nor integer",
    "SL923": "HDF5: non-finite values",
    "SL924": "HDF5: tops differing in dimension 0 (or a scalar dataset)",
    "SL925": "HDF5: rows shaped unlike the first file's",
    "SL926": "HDF5: a list that names no file",
    "SL930": "a net's data layer whose source is missing or not scanned",
}

# Loss layers whose bottom[1] is a class label (bottom[0] has the classes on axis 1).
CLASS_LOSSES = ("SoftmaxWithLoss", "InfogainLoss", "Accuracy", "MultinomialLogisticLoss",
                "HingeLoss")
SAFE_CLASS_LOSSES = ("SafeInfogainLoss",)


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
    findings_module.add_format_argument(parser)


# ---------------------------------------------------------------------------------------
# What to scan.

class Target:
    """One source to scan: its path and backend, and what the net says about it."""

    def __init__(self, path, backend, layers=(), batch_size=None, tops=None, num_classes=None,
                 classes_from=None, ignore_label=None):
        self.path = str(path)
        self.backend = backend
        self.layers = list(layers)      # "net.prototxt: layer 'data' (TRAIN)"
        self.batch_size = batch_size
        self.tops = tops
        self.num_classes = num_classes
        self.classes_from = classes_from
        self.ignore_label = ignore_label


def _is_prototxt(path):
    if os.path.isdir(path) or not os.path.isfile(path):
        return False
    if path.endswith((".prototxt", ".pt", ".prototxt.txt")):
        return True
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"\x89HDF"):
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return any(word in text for word in ("layer {", "layer{", "layers {", "net:", "train_net:",
                                         "net_param", "base_lr"))


def targets_from_prototxt(path):
    """(targets, findings) for every data layer of a net prototxt, or of the nets a solver
    names: Data (LMDB/LevelDB) and HDF5Data sources; other data layers are noted."""
    from safe_layers.readers import prototxt
    document = prototxt.read_prototxt(path)
    nets = [n for _, n in prototxt.solver_nets(document)] if document.kind == "solver" else [document]
    targets, notes = {}, []
    for net in nets:
        classes, classes_from = _num_classes(net)
        ignore = _ignore_label(net)
        for layer, node in net.layers():
            kind = _layer_type(layer)
            phase = _phases(layer)
            where = "%s: layer '%s'%s" % (net.path, layer.name, phase)
            if kind in ("Data", "HDF5Data"):
                param = layer.data_param if kind == "Data" else layer.hdf5_data_param
                field = "data_param" if kind == "Data" else "hdf5_data_param"
                source_node = node.find(field + ".source")
                line, col = net.where(source_node or node)
                if not param.source:
                    notes.append(Finding(net.path, line, col, "SL930", "error",
                                         "data layer '%s' (%s) names no source" % (layer.name, kind),
                                         "set %s.source" % field, layer=layer.name))
                    continue
                resolved, note = prototxt.resolve_reference(param.source, net.path)
                if note == "does not exist":
                    notes.append(Finding(
                        net.path, line, col, "SL930", "error",
                        "data layer '%s' (%s): source %r does not exist (Caffe opens it relative to "
                        "the working directory, %s)" % (layer.name, kind, param.source, os.getcwd()),
                        "create the dataset or fix the path", layer=layer.name,
                        data={"source": param.source}))
                    continue
                if note:
                    notes.append(Finding(net.path, line, col, "SL930", "warning",
                                         "data layer '%s': source %r %s" % (layer.name, param.source, note),
                                         "run from the folder Caffe will run in", layer=layer.name))
                backend = "hdf5" if kind == "HDF5Data" else (
                    "lmdb" if param.backend == prototxt.caffe_pb2().DataParameter.LMDB else "leveldb")
                key = os.path.realpath(resolved)
                target = targets.get(key)
                if target is None:
                    target = targets[key] = Target(
                        resolved, backend, batch_size=param.batch_size or None,
                        tops=list(layer.top) if kind == "HDF5Data" else None,
                        num_classes=classes, classes_from=classes_from, ignore_label=ignore)
                target.layers.append(where)
            elif kind in ("ImageData", "WindowData", "MemoryData"):
                line, col = net.where(node)
                notes.append(Finding(net.path, line, col, "SL930", "info",
                                     "data layer '%s' (%s) is not scanned: scan reads LMDB, LevelDB "
                                     "and HDF5 sources" % (layer.name, kind), layer=layer.name))
    if not targets and not any(f.severity == "error" for f in notes):
        raise InputError("%s: no Data or HDF5Data layer with a source to scan" % path)
    return list(targets.values()), notes


def _layer_type(layer):
    kind = layer.type
    if isinstance(kind, int):  # a V1 `layers { type: DATA }` entry
        from safe_layers.readers.prototxt import caffe_pb2
        name = caffe_pb2().V1LayerParameter.LayerType.Name(kind)
        return {"DATA": "Data", "HDF5_DATA": "HDF5Data", "IMAGE_DATA": "ImageData",
                "WINDOW_DATA": "WindowData", "MEMORY_DATA": "MemoryData",
                "SOFTMAX_LOSS": "SoftmaxWithLoss", "INFOGAIN_LOSS": "InfogainLoss",
                "ACCURACY": "Accuracy", "INNER_PRODUCT": "InnerProduct",
                "CONVOLUTION": "Convolution"}.get(name, name)
    return kind


def _phases(layer):
    phases = []
    from safe_layers.readers.prototxt import caffe_pb2
    for rule in layer.include:
        if rule.HasField("phase"):
            phases.append(caffe_pb2().Phase.Name(rule.phase))
    return " (%s)" % "/".join(phases) if phases else ""


def _python_layer_name(layer):
    return layer.python_param.layer if _layer_type(layer) == "Python" else None


def _num_classes(net):
    """(K, 'layer fc8 (num_output)') from the layer producing the scores a classification
    loss reads, or (None, None)."""
    producers = {}
    layers = [layer for layer, _ in net.layers()]
    for layer in layers:
        for top in layer.top:
            producers.setdefault(top, []).append(layer)
    for layer in layers:
        kind = _layer_type(layer)
        if kind not in CLASS_LOSSES and _python_layer_name(layer) not in SAFE_CLASS_LOSSES:
            continue
        if not layer.bottom:
            continue
        for producer in producers.get(layer.bottom[0], []):
            ptype = _layer_type(producer)
            if ptype == "InnerProduct":
                return producer.inner_product_param.num_output, "layer '%s' (num_output)" % producer.name
            if ptype == "Convolution":
                return producer.convolution_param.num_output, "layer '%s' (num_output)" % producer.name
    return None, None


def _ignore_label(net):
    for layer, _ in net.layers():
        if layer.HasField("loss_param") and layer.loss_param.HasField("ignore_label"):
            return layer.loss_param.ignore_label
    return None


def targets_for(args):
    """(targets, findings) for the command line's SOURCE."""
    source = args.source
    if not os.path.exists(source):
        raise InputError("%s: no such file or directory" % source)
    if args.backend == "auto" and _is_prototxt(source):
        targets, notes = targets_from_prototxt(source)
    else:
        backend = _detect(source) if args.backend == "auto" else _check_backend(source, args.backend)
        targets, notes = [Target(source, backend)], []
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


def _detect(path):
    from safe_layers.readers import datasets
    return datasets.detect_backend(path)


def _check_backend(path, backend):
    """``backend`` when ``path`` can be that kind of source; InputError saying what the
    path is otherwise (an HDF5 source is a file, a LevelDB a directory; what is on disk
    and recognised as another kind is not read as this one)."""
    try:
        found = _detect(path)
    except InputError:
        found = None  # not recognised (damaged?): the reader says what is wrong
    what = {"lmdb": "an LMDB", "leveldb": "a LevelDB directory",
            "hdf5": "an HDF5 source (an .h5 file or a list of .h5 files)"}
    if found is not None and found != backend:
        raise InputError("%s is %s, not %s: give --backend %s, or leave --backend out (auto)"
                         % (path, what[found], what[backend], found))
    if backend == "hdf5" and os.path.isdir(path):
        raise InputError("%s is a directory: --backend hdf5 reads %s" % (path, what["hdf5"]))
    if backend == "leveldb" and not os.path.isdir(path):
        raise InputError("%s is a file: --backend leveldb reads %s" % (path, what["leveldb"]))
    return backend


# ---------------------------------------------------------------------------------------
# What a scan finds.

class RuleCounter:
    """Findings of one source, listed up to ``cap`` per rule, every one counted."""

    def __init__(self, cap):
        self.cap = cap
        self.listed = []
        self.counts = {}
        self.first_over = {}

    def add(self, finding):
        count = self.counts.get(finding.rule, 0) + 1
        self.counts[finding.rule] = count
        if count <= self.cap:
            self.listed.append(finding)
        elif finding.rule not in self.first_over:
            self.first_over[finding.rule] = finding

    def findings(self, path):
        out = list(self.listed)
        for rule, count in sorted(self.counts.items()):
            if count > self.cap:
                sample = self.first_over[rule]
                out.append(Finding(path, 0, 0, rule, sample.severity,
                                   "%d more records with this fault (%d in all; --max-per-rule "
                                   "lists more)" % (count - self.cap, count),
                                   sample.fix, data={"count": count, "listed": self.cap}))
        return out


class LabelStats:
    """Label histogram of a source, and how often each class is missing from the batches
    Caffe builds by reading records in order (``batch_size`` consecutive records)."""

    MAX_DISTINCT = 100000

    def __init__(self, batch_size=None):
        self.counts = {}
        self.total = 0
        self.batch_size = batch_size
        self.batches = 0
        self.present_batches = {}   # label -> batches (in read order) that hold it
        self._batch = set()
        self._in_batch = 0
        self.too_many = False
        self.non_integer = 0

    def add(self, label):
        if self.too_many:
            return
        self.total += 1
        self.counts[label] = self.counts.get(label, 0) + 1
        if len(self.counts) > self.MAX_DISTINCT:
            self.too_many = True
            return
        if self.batch_size:
            self._batch.add(label)
            self._in_batch += 1
            if self._in_batch == self.batch_size:
                self.batches += 1
                for present in self._batch:
                    self.present_batches[present] = self.present_batches.get(present, 0) + 1
                self._batch.clear()
                self._in_batch = 0

    def classes(self, num_classes=None):
        labels = set(self.counts)
        if num_classes is not None:
            labels |= set(range(num_classes))
        elif self.counts and all(isinstance(l, int) for l in labels) and min(labels) >= 0:
            labels |= set(range(max(labels) + 1))
        return sorted(labels)

    def absent(self, num_classes=None, ignore_label=None):
        """Classes with no record: of [0, K) with K given, else the gaps below the largest."""
        return [c for c in self.classes(num_classes) if self.counts.get(c, 0) == 0 and c != ignore_label]

    def p_absent_random(self, label, batch):
        """P(a random batch of ``batch`` records holds no ``label``): hypergeometric,
        drawing without replacement from the whole set."""
        n, k = self.total, self.counts.get(label, 0)
        if batch > n - k:
            return 0.0
        if k == 0:
            return 1.0
        # C(n-k, b) / C(n, b), in logs.
        return math.exp(math.lgamma(n - k + 1) - math.lgamma(n - k - batch + 1)
                        - math.lgamma(n + 1) + math.lgamma(n - batch + 1))

    def batch_for(self, label, p_absent):
        """The smallest batch size at which a random batch misses ``label`` with
        probability at most ``p_absent`` (None when the class is absent)."""
        k = self.counts.get(label, 0)
        if k == 0:
            return None
        low, high = 1, max(1, self.total - k + 1)
        while low < high:
            mid = (low + high) // 2
            if self.p_absent_random(label, mid) <= p_absent:
                high = mid
            else:
                low = mid + 1
        return low

    def observed_absent(self, label):
        """Fraction of the full read-order batches without ``label`` (None: no batches)."""
        if not self.batches:
            return None
        return 1.0 - self.present_batches.get(label, 0) / self.batches

    def rows(self, num_classes=None, ignore_label=None):
        """One dict per class: label, count, share, likely_absent_up_to (largest batch
        size at which a random batch misses it half the time or more), batch_for_99
        (smallest batch holding it 99 % of the time), and at the batch size:
        p_absent_random and absent_in_read_order."""
        rows = []
        for label in self.classes(num_classes):
            count = self.counts.get(label, 0)
            half = self.batch_for(label, 0.5)
            row = {"label": label, "count": count,
                   "share": count / self.total if self.total else 0.0,
                   "likely_absent_up_to": (half - 1) if half is not None else None,
                   "batch_for_99": self.batch_for(label, 0.01),
                   "ignored": label == ignore_label}
            if self.batch_size:
                row["p_absent_random"] = self.p_absent_random(label, self.batch_size)
                row["absent_in_read_order"] = self.observed_absent(label)
            rows.append(row)
        return rows

    def as_dict(self, num_classes=None, ignore_label=None):
        return {"total": self.total, "batch_size": self.batch_size, "read_order_batches": self.batches,
                "histogram": {str(k): v for k, v in sorted(self.counts.items())},
                "classes": self.rows(num_classes, ignore_label),
                "absent": self.absent(num_classes, ignore_label),
                "not_class_labels": self.too_many or bool(self.non_integer)}


class SourceReport:
    """What a scan of one source found: findings, counts, labels, shape."""

    def __init__(self, target, cap):
        self.target = target
        self.rules = RuleCounter(cap)
        self.extra = []           # findings not about one record (labels, layers)
        self.records = 0
        self.shape = None
        self.encoded = 0
        self.encoded_unchecked = 0
        self.labels = LabelStats(target.batch_size)
        self.truncated_at = None  # --limit
        self.error = None         # why the scan stopped early (a corrupt database)

    def findings(self):
        return self.rules.findings(self.target.path) + self.extra

    def as_dict(self):
        t = self.target
        return {"path": t.path, "backend": t.backend, "layers": t.layers, "records": self.records,
                "limit_reached": self.truncated_at is not None, "error": self.error,
                "shape": list(self.shape) if self.shape else None, "encoded": self.encoded,
                "encoded_unchecked": self.encoded_unchecked, "fault_counts": self.rules.counts,
                "num_classes": t.num_classes, "classes_from": t.classes_from,
                "ignore_label": t.ignore_label,
                "labels": self.labels.as_dict(t.num_classes, t.ignore_label)}


def _progress(iterable, total, description):
    """tqdm on a terminal; the iterable itself otherwise (logs, pipes, CI)."""
    if not sys.stderr.isatty():
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=description, unit="rec", file=sys.stderr,
                leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------
# LMDB / LevelDB of Datums.

def _label_problem(label, target):
    """Why ``label`` is no class index of the net (None when it is one): negative (no
    class, whatever K), or at or past K where K is known."""
    if target.num_classes is not None and not 0 <= label < target.num_classes:
        return "label %d is outside [0, %d) (classes from %s)" % (label, target.num_classes,
                                                                 target.classes_from)
    if label < 0:
        return "label %d is negative: no class index (the loss reads it as one)" % label
    return None


def scan_database(report, limit):
    """Check every record (the first ``limit``) of an LMDB/LevelDB into ``report``."""
    import numpy
    from safe_layers.readers import datasets
    target = report.target
    path = target.path
    can_decode = datasets.image_library() is not None
    with datasets.open_database(path, target.backend) as db:
        total = db.count if limit is None or db.count is None else min(limit, db.count)
        records = _progress(db.records(limit=limit), total, os.path.basename(path.rstrip("/")))
        for record in records:
            report.records += 1

            def found(rule, message, fix, record=record, **data):
                key = record.key_text
                report.rules.add(Finding(path, 0, 0, rule, "error", "record %s (position %d): %s"
                                         % (key, record.position, message), fix,
                                         data=dict(data, key=key, position=record.position)))

            try:
                datum = datasets.parse_datum(record.value)
            except datasets.DatumError as exc:
                found("SL906", str(exc), "rebuild the database with Caffe's convert tools or "
                      "caffe.io.array_to_datum-equivalent code")
                continue
            shape = datasets.datum_shape(datum)
            if datum.encoded:
                report.encoded += 1
                if not can_decode:
                    report.encoded_unchecked += 1
                else:
                    try:
                        shape = datasets.decode_image(datum).shape
                    except datasets.DatumError as exc:
                        found("SL905", str(exc), "re-encode or drop this image")
                        shape = None
            else:
                expected = shape[0] * shape[1] * shape[2]
                if len(datum.data):
                    count, field = len(datum.data), "data"
                else:
                    count, field = len(datum.float_data), "float_data"
                if count == 0:
                    found("SL902", "no values: data and float_data are both empty "
                                   "(declared %dx%dx%d)" % shape,
                          "drop the record or fill it", declared=list(shape), values=0)
                    shape = None
                elif count != expected:
                    found("SL902", "%s holds %d values, channels x height x width = %dx%dx%d = %d"
                          % (field, count, shape[0], shape[1], shape[2], expected),
                          "fix channels/height/width or the data of this record",
                          field=field, values=count, declared=list(shape))
                    shape = None
                elif field == "float_data":
                    values = numpy.fromiter(datum.float_data, numpy.float32, count)
                    bad = ~numpy.isfinite(values)
                    if bad.any():
                        nan = int(numpy.isnan(values).sum())
                        posinf = int(numpy.isposinf(values).sum())
                        neginf = int(numpy.isneginf(values).sum())
                        first = int(numpy.flatnonzero(bad)[0])
                        index = [int(i) for i in numpy.unravel_index(first, shape)]
                        found("SL901", "float_data holds nan=%d +inf=%d -inf=%d of %d values; first "
                                       "at [c, h, w] = %s" % (nan, posinf, neginf, count, index),
                              "rebuild this record from its source, or guard the data layer with "
                              "a NaNGuard (action: clamp)",
                              nan=nan, posinf=posinf, neginf=neginf, first_index=index)
            if shape is not None:
                if report.shape is None:
                    report.shape = tuple(int(d) for d in shape)
                elif tuple(shape) != report.shape:
                    found("SL903", "shape %s differs from the first record's %s (Caffe shapes "
                                   "each batch from its first record: a record of another shape "
                                   "in that batch fails a CHECK, and the net was set up for the "
                                   "first record's)"
                          % ("x".join(map(str, shape)), "x".join(map(str, report.shape))),
                          "resize this record to %s or rebuild the set at one size"
                          % "x".join(map(str, report.shape)),
                          shape=list(shape), first_shape=list(report.shape))
            label = int(datum.label)
            if label == target.ignore_label:
                continue
            problem = _label_problem(label, target)
            if problem:
                found("SL904", problem, "relabel this record, or set the loss's ignore_label to it "
                      "if it means 'no label'", label=label)
                continue  # not a class: kept out of the label statistics
            report.labels.add(label)
        if limit is not None and report.records >= limit and (db.count is None or db.count > limit):
            report.truncated_at = limit
    if report.records == 0:
        report.rules.add(Finding(path, 0, 0, "SL907", "error", "the database holds no record: "
                                 "Caffe's Data layer waits for data or fails on it",
                                 "fill it, or point the data layer's source at the set meant"))
    if report.encoded_unchecked:
        report.extra.append(Finding(path, 0, 0, "SL905", "info",
                                    "%d encoded records not decoded: no image library (Pillow) is "
                                    "installed" % report.encoded_unchecked,
                                    "pip install Pillow to check them",
                                    data={"count": report.encoded_unchecked}))


# ---------------------------------------------------------------------------------------
# HDF5, as HDF5Data reads it.

def scan_hdf5(report, limit, label_name):
    """Check an HDF5Data source (list file or one .h5 file) into ``report``."""
    from safe_layers.readers import datasets, prototxt
    target = report.target
    path = target.path
    with open(path, "rb") as f:
        single = f.read(8) == b"\x89HDF\r\n\x1a\n"
    if single:
        entries, list_path = [(0, path)], None
    else:
        entries, list_path = datasets.hdf5_list(path), path
        if not entries:
            report.extra.append(Finding(path, 1, 1, "SL926", "error",
                                        "the HDF5 list names no file (HDF5Data aborts: "
                                        "'Must have at least 1 HDF5 filename listed')",
                                        "list the .h5 files, one per line"))
            return
    tops = target.tops
    first_shapes = {}
    rows_left = limit
    for line, name in entries:
        if rows_left is not None and rows_left <= 0:
            report.truncated_at = limit
            break
        if list_path is not None:
            file_path, note = prototxt.resolve_reference(name, list_path)
            if note == "does not exist":
                hint = (" (HDF5Data splits the list at white space: a path with a space in it "
                        "becomes two)" if _line_has_several_tokens(entries, line) else "")
                report.rules.add(Finding(list_path, line, 1, "SL920", "error",
                                         "listed file %r does not exist%s" % (name, hint),
                                         "fix the path (relative paths are opened from the working "
                                         "directory, %s)" % os.getcwd(), data={"file": name}))
                continue
        else:
            file_path = name
        with datasets.HDF5File(file_path) as h5:
            if tops is None:
                tops = h5.names()
                if not tops:
                    raise InputError("%s: no datasets in the file" % file_path)
            dim0 = {}
            for top in tops:
                if not h5.has(top):
                    report.rules.add(Finding(file_path, 0, 0, "SL921", "error",
                                             "no dataset named '%s' (the top's name): it has %s"
                                             % (top, ", ".join(h5.names()) or "none"),
                                             "name the top after a dataset, or add the dataset",
                                             data={"top": top}))
                    continue
                kind = h5.kind(top)
                if kind not in ("float", "integer"):
                    report.rules.add(Finding(file_path, 0, 0, "SL922", "error",
                                             "dataset '%s' is of type %s; HDF5Data reads only float "
                                             "and integer datasets" % (top, kind),
                                             "store it as float32", data={"top": top}))
                    continue
                shape = h5.shape(top)
                if not shape:
                    report.rules.add(Finding(file_path, 0, 0, "SL924", "error",
                                             "dataset '%s' is a scalar; HDF5Data needs at least one "
                                             "axis" % top, "store it with a row axis", data={"top": top}))
                    continue
                dim0[top] = shape[0]
                if top in first_shapes and first_shapes[top][1:] != shape[1:]:
                    report.rules.add(Finding(file_path, 0, 0, "SL925", "error",
                                             "dataset '%s' has rows of shape %s, the first file's "
                                             "has %s (HDF5Data shapes its top from the first file "
                                             "and would misread these rows)"
                                             % (top, list(shape[1:]), list(first_shapes[top][1:])),
                                             "store every file's '%s' with rows of one shape" % top,
                                             data={"top": top, "shape": list(shape)}))
                    continue
                first_shapes.setdefault(top, shape)
                if report.shape is None:
                    report.shape = shape[1:]
                _scan_hdf5_values(h5, top, file_path, report, rows_left, kind,
                                  top == label_name, target)
            if len(set(dim0.values())) > 1:
                report.rules.add(Finding(file_path, 0, 0, "SL924", "error",
                                         "the tops' datasets differ in dimension 0: %s (HDF5Data "
                                         "requires the same number of rows)"
                                         % ", ".join("%s=%d" % kv for kv in dim0.items()),
                                         "store the same number of rows in every dataset",
                                         data={"rows": dim0}))
            rows = max(dim0.values()) if dim0 else 0
            if rows_left is not None:
                rows = min(rows, rows_left)
                rows_left -= rows
            report.records += rows


def _line_has_several_tokens(entries, line):
    return sum(1 for number, _ in entries if number == line) > 1


def _scan_hdf5_values(h5, top, file_path, report, rows_left, kind, is_label, target):
    import numpy
    bad_rows, counts, overflow = [], {"nan": 0, "posinf": 0, "neginf": 0}, 0
    for start, block in h5.rows(top):
        if rows_left is not None and start >= rows_left:
            break
        if rows_left is not None:
            block = block[:rows_left - start]
        with numpy.errstate(over="ignore"):  # overflow to inf is what HDF5Data does too
            values = numpy.asarray(block, numpy.float32)
        if kind == "float":
            bad = ~numpy.isfinite(values)
            if bad.any():
                per_row = bad.reshape(len(values), -1).any(axis=1)
                bad_rows.extend(int(start + r) for r in numpy.flatnonzero(per_row))
                counts["nan"] += int(numpy.isnan(values).sum())
                counts["posinf"] += int(numpy.isposinf(values).sum())
                counts["neginf"] += int(numpy.isneginf(values).sum())
                original = numpy.asarray(block)
                overflow += int((bad & numpy.isfinite(original)).sum())
        if is_label:
            flat = values.reshape(len(values), -1)
            if flat.shape[1] == 1:
                for offset, value in enumerate(flat[:, 0].tolist()):
                    if not math.isfinite(value) or value != int(value):
                        report.labels.non_integer += 1
                        continue
                    label = int(value)
                    if label == target.ignore_label:
                        continue
                    problem = _label_problem(label, target)
                    if problem:
                        report.rules.add(Finding(
                            file_path, 0, 0, "SL904", "error",
                            "dataset '%s' row %d: %s" % (top, start + offset, problem),
                            "relabel the row, or set the loss's ignore_label to it",
                            data={"top": top, "row": start + offset, "label": label}))
                        continue
                    report.labels.add(label)
    if bad_rows:
        shown = bad_rows[:20]
        more = " and %d more" % (len(bad_rows) - len(shown)) if len(bad_rows) > len(shown) else ""
        why = (" (%d finite float64 values overflow float32, as HDF5Data converts them)" % overflow
               if overflow else "")
        report.rules.add(Finding(
            file_path, 0, 0, "SL923", "error",
            "dataset '%s': non-finite values in %d rows: %s%s (nan=%d +inf=%d -inf=%d)%s"
            % (top, len(bad_rows), shown, more, counts["nan"], counts["posinf"], counts["neginf"], why),
            "rebuild these rows, or guard the data layer with a NaNGuard (action: clamp)",
            data=dict(counts, top=top, rows=bad_rows, overflow_float32=overflow)))


# ---------------------------------------------------------------------------------------
# Labels: absent classes, the batch-size trap, label order.

def label_findings(report):
    target, stats = report.target, report.labels
    out = []
    if not stats.total or stats.too_many:
        return out
    where = target.path
    absent = stats.absent(target.num_classes, target.ignore_label)
    if absent:
        shown = absent[:30]
        more = " and %d more" % (len(absent) - len(shown)) if len(absent) > len(shown) else ""
        scope = ("of [0, %d) (from %s)" % (target.num_classes, target.classes_from)
                 if target.num_classes is not None else "below the largest label %d" % max(stats.counts))
        out.append(Finding(where, 0, 0, "SL910", "warning",
                           "%d classes %s never occur in %d records: %s%s"
                           % (len(absent), scope, stats.total, shown, more),
                           "add examples of them; a loss weighted by class frequency divides by "
                           "zero for them", data={"classes": absent}))
    batch = stats.batch_size
    if batch:
        rare = [row for row in stats.rows(target.num_classes, target.ignore_label)
                if row["count"] and not row["ignored"] and row["p_absent_random"] >= 0.5]
        if rare:
            rows = ", ".join("%s (%.0f%%)" % (r["label"], 100 * r["p_absent_random"]) for r in rare[:10])
            need = max(r["batch_for_99"] for r in rare)
            out.append(Finding(where, 0, 0, "SL911", "warning",
                               "at batch size %d, %d classes are missing from most random batches: "
                               "%s%s" % (batch, len(rare), rows, " ..." if len(rare) > 10 else ""),
                               "a loss normalised by each class's count in the batch divides by "
                               "zero then (SafeInfogainLoss class_weighting: batch_frequency stays "
                               "finite); a batch of %d holds each of them 99%% of the time" % need,
                               data={"batch_size": batch, "classes": [r["label"] for r in rare],
                                     "batch_for_99": need}))
        if stats.batches >= 2 and len(stats.counts) >= 2:
            expected = sum(1.0 - stats.p_absent_random(label, batch) for label in stats.counts)
            observed = sum(stats.present_batches.values()) / stats.batches
            if observed < 0.5 * expected and observed < len(stats.counts):
                out.append(Finding(where, 0, 0, "SL912", "warning",
                                   "records are stored in label order: read in key order, as Caffe's "
                                   "Data layer reads them, a batch of %d holds %.1f classes on "
                                   "average where a shuffled set would hold %.1f"
                                   % (batch, observed, expected),
                                   "rebuild the set shuffled (convert_imageset --shuffle) or shuffle "
                                   "the keys", data={"classes_per_batch": observed,
                                                     "shuffled_expectation": expected}))
    return out


def label_table(report, max_rows=20):
    """The label histogram as text, rarest classes first when there are many."""
    target, stats = report.target, report.labels
    if stats.too_many:
        return ["labels: more than %d distinct values (not class labels?); no histogram"
                % stats.MAX_DISTINCT]
    if not stats.total:
        return []
    rows = stats.rows(target.num_classes, target.ignore_label)
    batch = stats.batch_size
    header = "  %8s %9s %7s  %-24s %-14s" % ("label", "records", "share", "absent >=50% at batch",
                                              "present 99% at")
    if batch:
        header += " %-12s %s" % ("P(absent)@%d" % batch, "absent in read order")
    lines = ["labels (%d records, %d classes%s):" % (stats.total, len(rows),
                                                     ", batch size %d" % batch if batch else ""),
             header]
    shown = rows
    if len(rows) > max_rows:
        shown = sorted(rows, key=lambda r: (r["count"], r["label"]))[:max_rows]
        lines[0] = lines[0][:-1] + "; the %d rarest):" % max_rows
    for row in shown:
        up_to = ("<= %d" % row["likely_absent_up_to"] if row["likely_absent_up_to"]
                 else ("always" if row["count"] == 0 else "never"))
        need = str(row["batch_for_99"]) if row["batch_for_99"] is not None else "-"
        text = "  %8s %9d %6.2f%%  %-24s %-14s" % (row["label"], row["count"], 100 * row["share"],
                                                    up_to, need)
        if batch:
            observed = row["absent_in_read_order"]
            text += " %-12s %s" % ("%.1f%%" % (100 * row["p_absent_random"]),
                                   "%.1f%% of %d" % (100 * observed, stats.batches)
                                   if observed is not None else "-")
        if row["ignored"]:
            text += "  (ignore_label)"
        lines.append(text)
    return lines


# ---------------------------------------------------------------------------------------
# Plot.

def write_plot(reports, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [r for r in reports if r.labels.total and not r.labels.too_many]
    if not shown:
        raise InputError("--plot: no labels to plot")
    fig, axes = plt.subplots(len(shown), 2, figsize=(12, 3.6 * len(shown)), squeeze=False)
    for (hist_ax, curve_ax), report in zip(axes, shown):
        stats, target = report.labels, report.target
        rows = stats.rows(target.num_classes, target.ignore_label)
        labels = [r["label"] for r in rows]
        counts = [r["count"] for r in rows]
        colors = ["tab:red" if c == 0 else "tab:blue" for c in counts]
        hist_ax.bar(range(len(labels)), counts, color=colors)
        if len(labels) <= 40:
            hist_ax.set_xticks(range(len(labels)), [str(l) for l in labels], fontsize=7)
        hist_ax.set_xlabel("label (red: absent)")
        hist_ax.set_ylabel("records")
        hist_ax.set_title("%s: %d records" % (os.path.basename(target.path.rstrip("/")), stats.total),
                          fontsize=9)
        rare = sorted((r for r in rows if r["count"]), key=lambda r: r["count"])[:5]
        largest = max([r["batch_for_99"] or 1 for r in rare] + [stats.batch_size or 1, 8])
        sizes = sorted({max(1, int(round(largest * 1.5 * i / 200))) for i in range(1, 201)})
        for r in rare:
            curve_ax.plot(sizes, [stats.p_absent_random(r["label"], b) for b in sizes],
                          label="label %s (%d)" % (r["label"], r["count"]))
        if stats.batch_size:
            curve_ax.axvline(stats.batch_size, color="k", linestyle="--", linewidth=1,
                             label="batch size %d" % stats.batch_size)
        curve_ax.axhline(0.5, color="grey", linewidth=0.5)
        curve_ax.set_xlabel("batch size")
        curve_ax.set_ylabel("P(class absent from a random batch)")
        curve_ax.set_ylim(0, 1)
        curve_ax.legend(fontsize=7)
        curve_ax.set_title("the rarest classes", fontsize=9)
    fig.tight_layout()
    try:
        findings_module.save_png(fig, path)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------

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
    select = findings_module.rule_list(args.select, known=RULES, option="--select")
    ignore = findings_module.rule_list(args.ignore, known=RULES, option="--ignore")
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
