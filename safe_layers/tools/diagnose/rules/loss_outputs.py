"""The loss outputs of a net with several: which went non-finite first, with their loss
weights and layers, which stayed finite, what feeds only the bad ones, and the advice that
fits the bad one's loss type.

Caffe prints every train net output on display iterations, a loss with its weight:
``Train net output #k: loss_bbox = nan (* 1 = nan loss)`` (solver.cpp:258). The layer
behind an output, and its type, are in the log only where the net is printed
("Initializing net from parameters:", net.cpp:62); without it the type is unknown, and
any word drawn from the output's name is labelled a guess.
"""

from safe_layers.tools.diagnose.series import fmt

# Loss layers by what makes them non-finite (type names of BVLC Caffe and its forks:
# py-faster-rcnn's SmoothL1Loss, the OHEM forks' SmoothL1LossOHEM / SoftmaxWithLossOHEM,
# SSD's MultiBoxLoss).
_BOX = "box regression"
_LABELS = "classification"
_SCALE = "regression on raw values"


def loss_kind(layer_type):
    """What a loss layer of ``layer_type`` computes (one of the kinds above), or None."""
    if not layer_type:
        return None
    if "SmoothL1" in layer_type or layer_type == "MultiBoxLoss":
        return _BOX
    if any(k in layer_type for k in ("Softmax", "SigmoidCrossEntropy", "MultinomialLogistic",
                                     "Infogain", "Hinge")):
        return _LABELS
    if "Euclidean" in layer_type:
        return _SCALE
    return None


def _kind_from_name(name):
    """A guess from an output's name only (no net in the log): said as a guess."""
    lowered = name.lower()
    if "bbox" in lowered or "box" in lowered or "loc" in lowered:
        return _BOX
    if "cls" in lowered or "conf" in lowered or "softmax" in lowered:
        return _LABELS
    return None


class LossOutput:
    """One weighted train output at the first failure: its track, layer and type."""

    def __init__(self, model, track):
        self.track = track
        self.name = track.name
        self.weight = track.weight
        producer = model.producer_of(track.name)
        self.layer = producer.name if producer is not None else None
        self.type = producer.type if producer is not None else None
        self.bottoms = list(producer.bottoms) if producer is not None else []

    def words(self):
        """"'loss_bbox' (SmoothL1Loss 'loss_bbox', loss_weight 1)"."""
        about = []
        if self.layer is not None:
            about.append("%s '%s'" % (self.type or "layer", self.layer))
        if self.weight is not None:
            about.append("loss_weight %s" % fmt(self.weight))
        return "'%s'%s" % (self.name, " (%s)" % ", ".join(about) if about else "")

    def as_dict(self, point=None):
        point = point or self.track.bad or self.track.last
        return {"name": self.name, "loss_weight": self.weight, "layer": self.layer,
                "type": self.type, "value": point.value if point else None,
                "iteration": point.iteration if point else None,
                "line": point.line if point else None}


class LossOutputs:
    """The weighted train outputs split at the first failure: ``bad`` (non-finite at the
    first iteration any was), ``finite`` (finite there), ``later`` (non-finite after)."""

    def __init__(self, model):
        self.model = model
        tracks = [t for t in model.outputs.values() if t.weight is not None and t.weight != 0]
        self.several = len(tracks) > 1
        failed = [t.bad.iteration for t in tracks if t.bad is not None and t.bad.iteration is not None]
        self.iteration = min(failed) if failed else None
        self.bad, self.finite, self.later = [], [], []
        for track in tracks:
            output = LossOutput(model, track)
            if track.bad is not None and (track.bad.iteration == self.iteration or self.iteration is None):
                self.bad.append(output)
            elif track.bad is not None:
                self.later.append(output)
            else:
                self.finite.append(output)

    def split(self):
        """True when some loss outputs went non-finite while others stayed finite."""
        return self.several and bool(self.bad) and bool(self.finite or self.later)

    def words(self):
        """"output 'loss_bbox' (...) = nan at iteration 0, while 'loss_cls' (...) stayed
        finite (3.04)"; '' for a net with one loss."""
        if not self.several or not self.bad:
            return ""
        text = "%s %s at iteration %s%s" % (
            "output" if len(self.bad) == 1 else "outputs",
            ", ".join("%s = %s" % (o.words(), fmt(o.track.bad.value)) for o in self.bad),
            self.iteration, "" if any(o.track.recovered for o in self.bad)
            else " (not finite again in the log)")
        if self.finite:
            text += ", while %s stayed finite (%s)" % (
                ", ".join(o.words() for o in self.finite),
                ", ".join(_course(o.track) for o in self.finite))
        if self.later:
            text += "; %s went non-finite later (%s)" % (
                ", ".join("'%s'" % o.name for o in self.later),
                ", ".join("iteration %s" % o.track.bad.iteration for o in self.later))
        return text

    def data(self):
        """The JSON fields: the outputs named, their weights, the ones that stayed finite."""
        if not self.several:
            return {}
        first = self.bad[0] if self.bad else None
        return {"output": first.name if first else None,
                "loss_weight": first.weight if first else None,
                "outputs_nonfinite": [o.as_dict() for o in self.bad],
                "outputs_finite": [o.as_dict() for o in self.finite],
                "outputs_later": [o.as_dict() for o in self.later]}

    def layer(self):
        """The layer to name in the finding: the first bad output's, else its name."""
        if not self.several or not self.bad:
            return None
        return self.bad[0].layer or self.bad[0].name

    def only_bad_reads(self):
        """The blobs that feed the bad outputs' layers and none of the finite ones' (the
        net printed in the log; [] without it): where the non-finite value came from."""
        layers = self.model.train_layers()
        if not layers or not self.finite:
            return []
        bad_feed = _feeding(layers, [b for o in self.bad for b in o.bottoms])
        finite_feed = _feeding(layers, [b for o in self.finite for b in o.bottoms])
        return [b for o in self.bad for b in o.bottoms if b in bad_feed - finite_feed]

    def advice(self):
        """(advice for the first bad output's loss type, what it rests on: 'net' (the
        type from the net the log prints), 'name' (a guess from the output's name) or
        None)."""
        if not self.bad:
            return "", None
        output = self.bad[0]
        kind, basis = loss_kind(output.type), "net"
        if output.type is None:
            kind, basis = _kind_from_name(output.name), "name"
        if kind is None:
            return "", None
        text = _ADVICE[kind] % {"name": output.name}
        if basis == "name":
            text = ("the log does not print the net, so the layer type of '%s' is unknown; its "
                    "name suggests %s (a guess from the name only): %s" % (output.name, kind, text))
        return text, basis


def _course(track):
    """'3.04452 (iteration 0) -> 0.911402 (iteration 40)': a finite loss's logged course."""
    if track.last is None:
        return "no value"
    if track.first is track.last:
        return "%s at iteration %s" % (fmt(track.last.value), track.last.iteration)
    return "%s (iteration %s) -> %s (iteration %s)" % (
        fmt(track.first.value), track.first.iteration, fmt(track.last.value), track.last.iteration)


def _feeding(layers, blobs):
    """Every blob that ``blobs`` are computed from (themselves included)."""
    producers = {}
    for layer in layers:
        for top in layer.tops:
            producers.setdefault(top, []).append(layer)
    seen, stack = set(), list(blobs)
    while stack:
        blob = stack.pop()
        if blob in seen:
            continue
        seen.add(blob)
        for layer in producers.get(blob, []):
            stack.extend(b for b in layer.bottoms if b not in seen)
    return seen


_ADVICE = {
    _BOX: ("a box-regression loss is non-finite when its targets are: the size targets are "
           "log(gt_w / ex_w) and log(gt_h / ex_h) (py-faster-rcnn lib/fast_rcnn/"
           "bbox_transform.py:23-24), NaN or -inf for a box whose x2 - x1 + 1 or y2 - y1 + 1 "
           "is 0 or negative; check the annotations for degenerate boxes (py-faster-rcnn's "
           "pascal_voc.py:198-208 stores xmin - 1 as uint16: an xmin of 0 wraps to 65535) and "
           "the targets of '%(name)s' before they reach the loss"),
    _LABELS: ("a classification loss is non-finite when a label is outside [0, num_output) "
              "and not ignore_label (Caffe checks it only with DCHECK, softmax_loss_layer.cpp:"
              "104-105, so a release build reads past the probabilities) or its scores are "
              "non-finite; `safe-layers scan SOURCE --num-classes K` lists the labels out of "
              "range"),
    _SCALE: ("EuclideanLoss is the sum of squared differences over 2N (euclidean_loss_layer.cpp:"
             "26-27): unbounded, its value and gradient grow with the scale of the targets; "
             "scale the targets of '%(name)s' (to [0, 1] or unit variance) and check them for "
             "non-finite values"),
}
