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
"""

import collections
import contextlib

import numpy

from safe_layers.kernels import clip, finite
from safe_layers.kernels.xp import array_module, to_numpy
from safe_layers.core import backend, schemas
from safe_layers import reporting
from safe_layers.layers.first_bottom import FirstBottomLayer


SCHEMA = schemas.GRADIENT_CLIP



class GradientClip(FirstBottomLayer):
    """Identity forward (in place: no copy); clipped gradient backward."""

    def setup(self, bottom, top):
        self.params = p = SCHEMA.parse(self.param_str)
        if len(bottom) != 1 or len(top) != 1:
            raise SCHEMA.error("takes one bottom and one top; got %d and %d"
                               % (len(bottom), len(top)), p.name)
        top[0].reshape(*bottom[0].shape)
        self.in_place = backend.same_memory(bottom[0].data, top[0].data)
        self.fault_log = reporting.FaultLog.for_layer(self, "GradientClip", p)
        self.stats = ClipStats(p.history, p.log_every, self.fault_log)
        self.backward_calls = 0

    def reshape(self, bottom, top):
        if not self.in_place:
            top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        if not self.in_place:
            backend.data(top[0])[...] = backend.data(bottom[0])


    def _backward(self, top, bottom):
        p = self.params
        self.backward_calls += 1
        grad = backend.diff(bottom[0])
        if not self.in_place:
            grad[...] = backend.diff(top[0])
        if grad.size == 0:
            return
        # keep: non-finite elements stay and are left out of the norm. Decided by the
        # parameter, not by the check: on a finite gradient both ways give the same norm.
        keep = p.nonfinite == "keep"
        deferred = backend.deferred_checks(grad)
        if deferred:
            row = self.fault_log.defer(grad, "backward diff", self.backward_calls, p.nonfinite)
            if p.nonfinite == "zero":
                finite.clamp_flagged_(grad, row, 0.0, 0.0)  # NaN and +-Inf -> 0 where flagged
        else:
            report = self.fault_log.check(grad, "backward diff", self.backward_calls, p.nonfinite)
            if report is not None and self.fault_log.handle(report) == "zero":  # raises for error
                clip.zero_nonfinite_(grad)
        xp = array_module(grad)
        # Deferred, a gradient that will abort (nonfinite: error) reaches the clipping.
        with numpy.errstate(invalid="ignore") if deferred else contextlib.nullcontext():
            if p.mode == "value":
                norm = clip.l2_norms(grad, finite_only=keep)
                if keep:
                    clipped = clip.clip_finite_by_value_(grad, p.clip)
                else:
                    clipped = xp.abs(grad).max() > p.clip
                    clip.clip_by_value_(grad, p.clip)
                self.stats.add(norm, clipped)
            else:
                norms = clip.clip_by_norm_(grad, p.max_norm, p.per_sample, finite_only=keep)
                largest = norms.max()
                self.stats.add(largest, largest > p.max_norm)


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
