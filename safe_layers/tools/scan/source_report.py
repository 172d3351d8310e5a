"""What a scan of one source gathers: its findings (listed up to a cap per rule, every one
counted), its record count and shape, and its labels."""

from safe_layers.tools.findings import Finding
from safe_layers.tools.scan.label_stats import LabelStats


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

