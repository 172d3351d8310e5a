"""SafeInfogainLoss: a drop-in for Caffe's InfogainLoss that does not go NaN quietly.

Same semantics as Caffe's layer today (bottom[0] logits with its own softmax, bottom[1]
labels, H from bottom[2] or a file; axis, ignore_label, normalization), plus:
H validated at setup (finite, non-negative, K x K) and optionally row-normalized; a
stable log-softmax; out-of-range labels as a clear error; optional per-batch class
weighting that stays finite when a class is absent; non-finite logits reported like
NaNGuard does. A Python layer has no default loss weight: write ``loss_weight: 1``.

    layer {
      name: "loss" type: "Python" bottom: "fc8" bottom: "label" top: "loss" loss_weight: 1
      python_param { module: "safe_layers" layer: "SafeInfogainLoss"
                     param_str: "{name: loss, source: H.binaryproto, normalize_h: rows}" }
    }
"""

import contextlib

import numpy

from safe_layers.kernels import finite, infogain
from safe_layers.kernels.xp import array_module, host_scalar, to_numpy
from safe_layers.core import backend, params, schemas
from safe_layers.readers.infogain_matrix import load_infogain_matrix
from safe_layers import reporting
from safe_layers.layers.first_bottom import FirstBottomLayer

SCHEMA = schemas.SAFE_INFOGAIN_LOSS



class SafeInfogainLoss(FirstBottomLayer):
    """bottom: logits (or probabilities), labels[, H]; top: loss[, probabilities]."""

    def setup(self, bottom, top):
        self.params = p = SCHEMA.parse(self.param_str)
        name = p.name
        if len(bottom) not in (2, 3) or len(top) not in (1, 2):
            raise SCHEMA.error("takes bottoms (scores, labels[, H]) and tops (loss[, prob]); "
                               "got %d bottoms and %d tops" % (len(bottom), len(top)), name)
        if (len(bottom) == 3) == (p.source is not None):
            raise SCHEMA.error("needs H from exactly one place: a third bottom or key 'source'", name)
        ndim = len(bottom[0].shape)
        self.axis = p.axis + ndim if p.axis < 0 else p.axis
        if not 0 <= self.axis < ndim:
            raise SCHEMA.error("key 'axis' has value %d; bottom[0] has %d axes (allowed: %d..%d)"
                               % (p.axis, ndim, -ndim, ndim - 1), name)
        self.num_classes = int(bottom[0].shape[self.axis])
        self.file_matrix = None
        if p.source is not None:
            try:
                self.file_matrix = self._prepare_matrix(load_infogain_matrix(p.source))
            except (ValueError, FileNotFoundError) as exc:
                raise SCHEMA.error("key 'source' = %r: %s" % (p.source, exc), name) from None
        self.fault_log = reporting.FaultLog.for_layer(self, "SafeInfogainLoss", p)
        self.forward_calls = 0
        self._saved = None

    def release_buffers(self):
        """The net is gone (Caffe keeps the layer object itself): drop the saved batch."""
        self._saved = None

    def _prepare_matrix(self, h):
        return infogain.check_infogain_matrix(h, self.num_classes,
                                              rows=self.params.normalize_h == "rows")

    def reshape(self, bottom, top):
        shape = tuple(bottom[0].shape)
        if shape[self.axis] != self.num_classes:
            raise ValueError(self.fault_log.error("bottom[0] now has %d classes on axis %d, not %d"
                                                  % (shape[self.axis], self.axis, self.num_classes)))
        self.outer = int(numpy.prod(shape[:self.axis], dtype=numpy.int64))
        self.inner = int(numpy.prod(shape[self.axis + 1:], dtype=numpy.int64))
        if bottom[1].count != self.outer * self.inner:
            raise ValueError(self.fault_log.error(
                "%d labels for %d positions (bottom[0] shape %s, axis %d: outer %d x inner %d)"
                % (bottom[1].count, self.outer * self.inner, shape, self.axis, self.outer, self.inner)))
        if len(bottom) == 3 and bottom[2].count != self.num_classes ** 2:
            raise ValueError(self.fault_log.error("bottom[2] (H) has %d values; K = %d classes need %d"
                                                  % (bottom[2].count, self.num_classes,
                                                     self.num_classes ** 2)))
        top[0].reshape()
        if len(top) == 2:
            top[1].reshape(*shape)

    def forward(self, bottom, top):
        with self.fault_log.running("forward"):
            self._forward(bottom, top)

    def _forward(self, bottom, top):
        p = self.params
        self.forward_calls += 1
        x = backend.data(bottom[0])
        xp = array_module(x)
        if self.forward_calls == 1:
            self._check_loss_weight(top)
        deferred = backend.deferred_checks(x)
        logits_row = report = taken = None
        if deferred:
            # Checked when the board is read; the repair, on a copy, only where flagged.
            logits_row = self.fault_log.defer(x, "forward data", self.forward_calls, p.action)
            if p.action == "clamp":
                x = finite.clamp_flagged_(x.copy(), logits_row, 0.0, schemas.CLAMP_BOUND)
        else:
            report = self.fault_log.check(x, "forward data", self.forward_calls, p.action)
            if report is not None:
                taken = self.fault_log.handle(report)
                if taken == "clamp":
                    # On a copy: the bottom belongs to the layer below (and to Caffe's backward).
                    x = finite.clamp_(x.copy(), 0.0, schemas.CLAMP_BOUND)
        scores = x.reshape(self.outer, self.num_classes, self.inner)
        labels = backend.data(bottom[1]).reshape(self.outer, self.inner)
        try:
            y, valid, bad = infogain.checked_labels(labels, self.num_classes, p.ignore_label)
            facts = infogain.bad_label_facts(labels, bad)
            if deferred:
                self.fault_log.board.add(_BadLabels(self), self.fault_log, "forward",
                                         labels)[:3] = facts
            else:
                # Raised before anything is computed with them (Caffe reads out of bounds).
                self._raise_bad_labels(to_numpy(facts))
            h = (self._prepare_matrix(backend.data(bottom[2])) if self.file_matrix is None
                 else self._device_matrix(xp))
        except ValueError as exc:
            # Printed first: the caffe binary may show no traceback.
            raise ValueError(self.fault_log.error(str(exc))) from None
        if p.class_weighting == "batch_frequency":
            weights = infogain.batch_frequency_weights(y, valid, self.num_classes)
        else:
            weights = valid.astype(xp.float64)
        # Deferred, faulty logits reach the math (their report comes when the board is read).
        with numpy.errstate(invalid="ignore") if deferred else contextlib.nullcontext():
            if p.input == "logits":
                prob, log_prob = infogain.log_softmax(scores, axis=1)
            else:
                prob, log_prob = scores, infogain.probability_log(scores)
        norm = infogain.normalizer(p.normalization, self.outer, self.inner, valid.sum())
        value = infogain.infogain_loss(log_prob, y, weights, h) / norm
        loss = backend.data(top[0])
        with numpy.errstate(over="ignore"):  # a loss float32 cannot hold is reported below
            loss[...] = value
        if deferred:
            self._defer_loss_check(loss, value, logits_row)
        elif report is None or taken == "clamp":  # else the logits' report has said why
            self._check_loss(loss, value)
        if len(top) == 2:
            backend.data(top[1])[...] = prob.reshape(x.shape)
        self._saved = (prob, y, weights, h, norm)

    def _raise_bad_labels(self, facts):
        p = self.params
        error = infogain.bad_label_error(facts, (self.outer, self.inner), self.num_classes,
                                         p.ignore_label)
        if error is not None:
            raise error

    def _check_loss_weight(self, top):
        # Net::Init writes each top's loss_weight into its diff before the first forward; a
        # Python layer has no default weight, so 0 means the net ignores this loss.
        if reporting.phase_name(self.phase) != "TRAIN":
            return
        if host_scalar(backend.diff(top[0]).reshape(-1)[0]) == 0:
            self.fault_log.warn(
                "top[0] has loss weight 0 (no loss_weight in the prototxt, or loss_weight: 0): the "
                "net does not add this loss and never calls its backward, so nothing learns from it; "
                "write loss_weight: 1 in the layer (with a second top: loss_weight: 1 loss_weight: 0)")

    def _check_loss(self, loss, value):
        """Report a loss that float32 cannot hold (huge finite logits with normalization NONE
        give one) like any other fault."""
        p = self.params
        report = self.fault_log.check(loss, "forward data", self.forward_calls, p.action,
                                      blob="top")
        if report is None:
            return
        value = host_scalar(value)
        if numpy.isfinite(value):
            report.detail = "the loss %.7g overflows float32" % value
        if self.fault_log.handle(report) == "clamp":
            # The largest float32: a loss clamped to anything plausible would hide the fault.
            finite.clamp_(loss, 0.0, params.FLOAT32_MAX)

    def _defer_loss_check(self, loss, value, logits_row):
        """:meth:`_check_loss`, deferred: the loss's row carries the float64 loss (for the
        overflow detail) and whether the logits were at fault (then their report has
        said why, unless they were clamped)."""
        p = self.params
        xp = array_module(loss)
        explained = None if p.action == "clamp" else (lambda r: r[finite.EXTRA + 1] != 0)
        row = self.fault_log.defer(loss, "forward data", self.forward_calls, p.action, blob="top",
                                   detail=self._loss_detail, skip=explained)
        row[finite.EXTRA] = xp.asarray(value, dtype=xp.float64)
        row[finite.EXTRA + 1] = logits_row[:finite.FIRST].sum()
        if p.action == "clamp":
            finite.clamp_flagged_(loss, row, 0.0, params.FLOAT32_MAX)

    @staticmethod
    def _loss_detail(row):
        if finite.row_faulty(row) and numpy.isfinite(row[finite.EXTRA]):
            return "the loss %.7g overflows float32" % row[finite.EXTRA]
        return None

    def _device_matrix(self, xp):
        if xp is not numpy and isinstance(self.file_matrix, numpy.ndarray):
            self.file_matrix = xp.asarray(self.file_matrix)
        return self.file_matrix


    def _backward(self, top, bottom):
        # Labels and H get no gradient (Caffe's layer aborts if asked for one).
        prob, y, weights, h, norm = self._saved
        scale = backend.diff(top[0]).reshape(-1)[0] / norm  # the loss weight, from Caffe
        if self.params.input == "logits":
            grad = infogain.infogain_grad_logits(prob, y, weights, h, scale)
        else:
            grad = infogain.infogain_grad_probabilities(prob, y, weights, h, scale)
        diff = backend.diff(bottom[0])
        diff[...] = grad.reshape(diff.shape)


class _BadLabels:
    """The deferred label check's entry: its row holds :func:`infogain.bad_label_facts`;
    read, it raises the error the check at once raises (Caffe would read out of bounds;
    here the bad labels were read as class 0 until then, and nothing has been updated)."""

    def __init__(self, layer):
        self.layer = layer

    def resolve(self, row):
        try:
            self.layer._raise_bad_labels(row[:3])
        except ValueError as exc:
            raise ValueError(self.layer.fault_log.error(str(exc))) from None
