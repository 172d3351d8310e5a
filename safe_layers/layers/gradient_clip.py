"""GradientClip: identity in forward; limits the gradient flowing back through it.

Caffe's solver-level ``clip_gradients`` clips only the global norm of all parameter
gradients, and lets a NaN norm pass silently (an Inf norm turns every gradient into NaN).
This layer clips the *activation* gradient at a chosen point, typically just above the
loss layer that explodes, without touching the rest of the net.

    layer {
      name: "fc8_clip" type: "Python" bottom: "fc8" top: "fc8"
      python_param { module: "safe_layers" layer: "GradientClip"
                     param_str: "{name: fc8_clip, mode: norm, max_norm: 10}" }
    }

Below a loss with several predictions (ContrastiveLoss's two features, MultiBoxLoss's
locations and confidences) one clip takes all of them, bottom i paired with top i: in
``mode: norm`` their gradients share one L2 norm and one scale, so the direction of the
whole gradient is kept (a clip per blob would scale each differently and turn it).
"""

import collections
import contextlib

import caffe
import numpy

from safe_layers.kernels import clip, finite
from safe_layers.kernels.xp import array_module, to_numpy
from safe_layers.core import backend, schemas
from safe_layers import reporting


SCHEMA = schemas.GRADIENT_CLIP



class GradientClip(caffe.Layer):
    """Identity forward (in place: no copy); clipped gradient backward, one norm over
    every bottom whose gradient Caffe asks for."""

    def setup(self, bottom, top):
        self.params = p = SCHEMA.parse(self.param_str)
        if not len(bottom) or len(bottom) != len(top):
            raise SCHEMA.error("takes one top for each bottom (at least one); got %d bottoms and %d tops"
                               % (len(bottom), len(top)), p.name)
        # Indexed: pycaffe's blob vectors cannot be iterated. A top is shaped before it is
        # compared: an empty one has no memory to tell apart.
        for i in range(len(bottom)):
            top[i].reshape(*bottom[i].shape)
        self.in_place = [backend.same_memory(bottom[i].data, top[i].data) for i in range(len(bottom))]
        self.reshape(bottom, top)
        self.fault_log = reporting.FaultLog.for_layer(self, "GradientClip", p)
        self.stats = ClipStats(p.history, p.log_every, self.fault_log)
        self.backward_calls = 0

    def reshape(self, bottom, top):
        p = self.params
        if p.per_sample and len(bottom) > 1:
            counts = [(tuple(bottom[i].shape) or (1,))[0] for i in range(len(bottom))]
            if len(set(counts)) > 1:
                raise SCHEMA.error("per_sample: every bottom must hold the same number of samples "
                                   "(axis 0); got %s" % ", ".join(str(n) for n in counts), p.name)
        for i, in_place in enumerate(self.in_place):
            if not in_place:
                top[i].reshape(*bottom[i].shape)

    def forward(self, bottom, top):
        for i, in_place in enumerate(self.in_place):
            if not in_place:
                backend.data(top[i])[...] = backend.data(bottom[i])

    def backward(self, top, propagate_down, bottom):
        chosen = [i for i in range(len(bottom)) if propagate_down[i]]
        if not chosen:
            return
        with self.fault_log.running("backward"):
            self._backward(top, bottom, chosen)

    def _backward(self, top, bottom, chosen):
        p = self.params
        self.backward_calls += 1
        grads = []  # (bottom index, gradient): what this call clips
        for i in chosen:
            grad = backend.diff(bottom[i])
            if not self.in_place[i]:
                grad[...] = backend.diff(top[i])
            if grad.size:
                grads.append((i, grad))
        if not grads:
            return
        # keep: non-finite elements stay and are left out of the norm. Decided by the
        # parameter, not by the check: on a finite gradient both ways give the same norm.
        keep = p.nonfinite == "keep"
        deferred = backend.deferred_checks(grads[0][1])
        for i, grad in grads:
            self._check(grad, i, deferred)
        arrays = [grad for _, grad in grads]
        # Deferred, a gradient that will abort (nonfinite: error) reaches the clipping.
        with numpy.errstate(invalid="ignore") if deferred else contextlib.nullcontext():
            if p.mode == "value":
                norm = clip.group_l2_norms(arrays, finite_only=keep)  # before the clipping
                self.stats.add(norm, self._clip_values(arrays, keep))
            else:
                norms = clip.clip_group_by_norm_(arrays, p.max_norm, p.per_sample, finite_only=keep)
                largest = norms.max()
                self.stats.add(largest, largest > p.max_norm)

    def _check(self, grad, index, deferred):
        """The non-finite check of bottom ``index``'s gradient, and its repair (zero)."""
        p = self.params
        if deferred:
            row = self.fault_log.defer(grad, "backward diff", self.backward_calls, p.nonfinite,
                                       blob_index=index)
            if p.nonfinite == "zero":
                finite.clamp_flagged_(grad, row, 0.0, 0.0)  # NaN and +-Inf -> 0 where flagged
        else:
            report = self.fault_log.check(grad, "backward diff", self.backward_calls, p.nonfinite,
                                          blob_index=index)
            if report is not None and self.fault_log.handle(report) == "zero":  # raises for error
                clip.zero_nonfinite_(grad)

    def _clip_values(self, arrays, keep):
        """Clip every element of ``arrays`` to [-clip, clip]; whether any was clipped (0-d)."""
        bound = self.params.clip
        clipped = None
        for grad in arrays:
            if keep:
                one = clip.clip_finite_by_value_(grad, bound)
            else:
                one = array_module(grad).abs(grad).max() > bound
                clip.clip_by_value_(grad, bound)
            clipped = one if clipped is None else clipped | one
        return clipped


class ClipStats:
    """How often a GradientClip clipped, and the norms it saw over its last calls.

    Norms and flags arrive as 0-d (device) arrays and are read on the host only when a
    summary is printed, so the GPU path does not synchronise per call for statistics.
    """

    def __init__(self, history, every, fault_log):
        self.every = every
        self.fault_log = fault_log
        self.norms = collections.deque(maxlen=history)
        self.flags = collections.deque(maxlen=history)
        self._unread_flags = []
        self._clipped_read = 0
        self.calls = 0
        fault_log.on_final(self.final_summary)

    def add(self, norm, clipped):
        if reporting.is_replaying():
            return  # this call's norm is counted already (see reporting.replaying)
        self.calls += 1
        self.norms.append(norm)
        self.flags.append(clipped)
        self._unread_flags.append(clipped)
        if len(self._unread_flags) >= self.flags.maxlen:
            self.clipped_total()  # bounded memory when summaries are rare (log_every: 0)
        if self.every and self.calls % self.every == 0:
            self.fault_log.note(self.summary())

    def _read(self, *groups):
        """The values of each group (a list of 0-d arrays), in one host read."""
        values = [v for group in groups for v in group]
        if not values:
            return [numpy.zeros(0) for _ in groups]
        xp = array_module(values[0])
        host = to_numpy(xp.stack([xp.asarray(v, dtype=xp.float64) for v in values]))
        out, start = [], 0
        for group in groups:
            out.append(host[start:start + len(group)])
            start += len(group)
        return out

    def clipped_total(self):
        self._clipped_read += int(numpy.count_nonzero(self._read(self._unread_flags)[0]))
        self._unread_flags = []
        return self._clipped_read

    def norm_stats(self):
        """(min, median, max) of the norms seen over the last ``history`` calls."""
        values = self._read(list(self.norms))[0]
        return float(values.min()), float(numpy.median(values)), float(values.max())

    def statistics(self):
        """The :class:`reporting.ClipStatistics` of the calls so far (one host read)."""
        norms, flags, unread = self._read(list(self.norms), list(self.flags), self._unread_flags)
        self._clipped_read += int(numpy.count_nonzero(unread))
        self._unread_flags = []
        return reporting.ClipStatistics(
            subject=self.fault_log.subject, calls=self.calls,
            recent_clipped=int(numpy.count_nonzero(flags)), window=len(self.flags),
            total_clipped=self._clipped_read, norm_window=len(self.norms),
            norm_min=float(norms.min()), norm_median=float(numpy.median(norms)),
            norm_max=float(norms.max()))

    def summary(self):
        return self.statistics().text()

    def final_summary(self):
        if self.calls:
            self.fault_log.note("final summary: " + self.summary())
