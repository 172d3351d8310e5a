"""Labels: the histogram of a source's class labels, the classes absent from it or from
most batches at the net's batch size, records stored in label order (SL910-SL912), and a
label that is no class index of the net (SL904, for Datum records and HDF5 rows alike)."""

import math

from safe_layers.tools import rule_table
from safe_layers.tools.findings import Finding

LABEL_OUTSIDE = rule_table.rule(
    "scan", "SL904", "error", "a label outside [0, K)",
    doc="""
    SoftmaxWithLoss, InfogainLoss, Accuracy and MultinomialLogisticLoss use the label as an
    index into the class axis of their prediction, checked only by DCHECKs that a release
    build compiles out (softmax_loss_layer.cpp:104-106, accuracy_layer.cpp:67-69,
    infogain_loss_layer.cpp:150-156): a label at or past K, or a negative one, reads another
    sample's probability or memory outside the blob, and the loss turns into garbage or NaN
    without an error. K comes from --num-classes, else from the num_output of the layer
    feeding the net's classification loss; a label equal to the loss's ignore_label is
    skipped, as the losses skip it (softmax_loss_layer.cpp:101-103).
    """)
CLASSES_ABSENT = rule_table.rule(
    "scan", "SL910", "warning", "classes absent from the whole set",
    doc="""
    A class with no record never gets a gradient of its own: its score is only ever pushed
    down. Worse, a loss weighted by class frequency (an infogain H built from 1/frequency,
    a class-balanced loss) divides by its count of 0. Caffe itself does not look: the Data
    layer copies whatever label a record holds (data_layer.cpp:118-122). The classes are
    those of [0, K) with K known, else the gaps below the largest label.
    """)
ABSENT_FROM_BATCHES = rule_table.rule(
    "scan", "SL911", "warning", "classes likely absent from a batch at the batch size",
    doc="""
    Caffe computes each iteration's loss on one batch of batch_size records
    (data_layer.cpp:93-125). A rare class is then missing from most batches, and a loss
    normalised by each class's count in the batch divides by zero in those iterations: the
    label-frequency trap. scan gives, per class, the probability that a random batch misses
    it (hypergeometric, drawing without replacement) and the batch size that holds it 99%
    of the time; SafeInfogainLoss's class_weighting: batch_frequency stays finite there.
    """)
LABEL_ORDER = rule_table.rule(
    "scan", "SL912", "warning", "records stored in label order",
    doc="""
    The Data layer reads an LMDB or LevelDB in key order with a cursor and never shuffles
    (data_layer.cpp:70-77; DataParameter has no shuffle): a set written class by class, as
    convert_imageset writes it without --shuffle (convert_imageset.cpp:84-87), gives
    batches of one or two classes. Each update then pulls the net towards those classes,
    and the loss swings or diverges. scan compares the classes per read-order batch with
    what a shuffled set would hold.
    """)


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


def label_problem(label, target):
    """Why ``label`` is no class index of the net (None when it is one): negative (no
    class, whatever K), or at or past K where K is known."""
    if target.num_classes is not None and not 0 <= label < target.num_classes:
        return "label %d is outside [0, %d) (classes from %s)" % (label, target.num_classes,
                                                                 target.classes_from)
    if label < 0:
        return "label %d is negative: no class index (the loss reads it as one)" % label
    return None


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
        out.append(Finding(where, 0, 0, CLASSES_ABSENT, "warning",
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
            out.append(Finding(where, 0, 0, ABSENT_FROM_BATCHES, "warning",
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
                out.append(Finding(where, 0, 0, LABEL_ORDER, "warning",
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
