"""StableBatchNorm: a drop-in for Caffe's BatchNorm that cannot blow up.

Same three blobs (accumulated mean [C], accumulated variance [C], scale factor [1]), same
parameters and defaults, same statistics update and outputs, so a caffemodel moves
between this layer and stock BatchNorm in both directions (same layer name). Stable in
that moments are shifted two-pass sums, exact whatever the mean's magnitude (variance >= 0);
untrusted stored statistics (a zero or non-finite scale factor, non-finite mean/variance)
are not amplified by 1/sqrt(eps) but replaced by the batch's own (or rejected:
``on_bad_stats: error``); a non-finite batch, or one that would make the stored statistics
overflow float32, never enters the running averages; ``eps <= 0`` is rejected.

The statistics must not be learned. Caffe's BatchNorm forces that itself; a Python layer
cannot, so declare three ``param { lr_mult: 0 }`` (otherwise weight decay shrinks them):

    layer {
      name: "bn1" type: "Python" bottom: "conv1" top: "conv1"
      param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 }
      python_param { module: "safe_layers" layer: "StableBatchNorm" param_str: "{name: bn1}" }
    }
"""

import numpy

from safe_layers.kernels import batch_norm, finite
from safe_layers.kernels.xp import array_module, host_scalar
from safe_layers.core import backend, schemas
from safe_layers import reporting
from safe_layers.layers.first_bottom import FirstBottomLayer

SCHEMA = schemas.STABLE_BATCH_NORM



class StableBatchNorm(FirstBottomLayer):
    """bottom: N x C x ... ; top: the same shape (in place works)."""

    def setup(self, bottom, top):
        self.params = p = SCHEMA.parse(self.param_str)
        if len(bottom) != 1 or len(top) != 1:
            raise SCHEMA.error("takes one bottom and one top; got %d and %d" % (len(bottom), len(top)), p.name)
        shape = tuple(bottom[0].shape)
        if len(shape) < 2:
            raise SCHEMA.error("needs a bottom of at least 2 axes (N x C x ...); got shape %s" % (shape,), p.name)
        channels = shape[1]
        self.use_global_stats = (p.use_global_stats if p.use_global_stats is not None
                                 else reporting.phase_name(self.phase) == "TEST")
        if len(self.blobs) == 0:
            # Caffe's order and shapes, zero-initialized: a caffemodel of either layer loads.
            self.blobs.add_blob(channels)
            self.blobs.add_blob(channels)
            self.blobs.add_blob(1)
            for i in range(3):
                self.blobs[i].data[...] = 0
        top[0].reshape(*shape)
        self.in_place = backend.same_memory(bottom[0].data, top[0].data)
        self.fault_log = reporting.FaultLog.for_layer(self, "StableBatchNorm", p)
        self.forward_calls = 0
        self.bad_stats_reported = False
        self.work = batch_norm.Workspace()
        self._saved = None

    def release_buffers(self):
        """The net is gone (Caffe keeps the layer object itself): drop the buffers."""
        self._saved = None
        self.work.release()

    def reshape(self, bottom, top):
        if bottom[0].shape[1] != self.blobs[0].count:
            raise ValueError(self.fault_log.error("bottom now has %d channels; its statistics have %d"
                                                  % (bottom[0].shape[1], self.blobs[0].count)))
        if not self.in_place:
            top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        with self.fault_log.running("forward"):
            x = backend.data(bottom[0])
            if backend.deferred_checks(x):
                self._forward_deferred(x, top)
            else:
                self._forward(x, top)

    def _forward(self, x, top):
        p = self.params
        self.forward_calls += 1
        xp = array_module(x)
        # The channel sums are the first pass of the moments and the fast finiteness check.
        sums = batch_norm.channel_sums(x)
        report = self.fault_log.check(x, "forward data", self.forward_calls, p.action,
                                      fast=host_scalar(xp.isfinite(sums).all()))
        if report is not None:
            self.fault_log.handle(report)  # raises for action: abort
        stats = [backend.data(self.blobs[i]) for i in range(3)]
        stored = None if not self.use_global_stats else batch_norm.running_stats(*stats)
        if self.use_global_stats and stored is not None:
            # y straight into the top: backward needs only inv_std here.
            inv_std = batch_norm.normalize_global(x, *stored, p.eps, backend.data(top[0]))
            self._saved = (None, None, inv_std)
            return
        if self.use_global_stats:
            self._bad_stored_stats(stats)
        # x - mean is kept for backward: in place (and with a Scale after it) the top is
        # overwritten before backward runs.
        centered = self.work.get("centered", x)
        # The statistics are decided on, and an overflow reported, before y is written:
        # in place, y takes x's memory.
        mean, var, inv_std, offset = batch_norm.batch_statistics(x, p.eps, centered, sums)
        if not self.use_global_stats and report is None:
            overflow = batch_norm.update_running_stats(*stats, mean, var, x.size // x.shape[1],
                                                       p.moving_average_fraction)
            if overflow is not None:
                self._report_overflow(x, overflow)
        batch_norm.write_normalized(centered, inv_std, backend.data(top[0]))
        self._saved = (centered, offset, inv_std)

    def _forward_deferred(self, x, top):
        """:meth:`_forward` without a host decision (``safe_layers.core.deferred``): the check
        of x goes into a board row with the statistics of x as it arrived (the top may be
        x); the running statistics are updated on the device where the batch is finite and
        float32 holds them, the facts of an overflow going into the row for the report. Under
        use_global_stats one read decides between the stored statistics and the batch's
        own (it changes what runs)."""
        p = self.params
        self.forward_calls += 1
        row = self.fault_log.defer(x, "forward data", self.forward_calls, p.action,
                                   detail=self._overflow_detail)
        row[finite.EXTRA] = 0  # no overflow, unless the update below says so
        sums = batch_norm.channel_sums(x)
        stats = [backend.data(self.blobs[i]) for i in range(3)]
        stored = None if not self.use_global_stats else batch_norm.running_stats(*stats)
        out = backend.data(top[0])
        if stored is not None:
            inv_std = batch_norm.normalize_global(x, *stored, p.eps, out)
            self._saved = (None, None, inv_std)
            return
        if self.use_global_stats:
            self._bad_stored_stats(stats)
        centered = self.work.get("centered", x)
        with numpy.errstate(invalid="ignore", over="ignore"):  # a faulty x: reported when read
            mean, var, inv_std, offset = batch_norm.normalize_batch(x, p.eps, centered, out, sums)
        if not self.use_global_stats:
            clean = row[finite.NAN] + row[finite.POSINF] + row[finite.NEGINF] == 0
            row[finite.EXTRA:finite.EXTRA + 4] = batch_norm.update_running_stats_where(
                *stats, mean, var, x.size // x.shape[1], p.moving_average_fraction, clean)
        self._saved = (centered, offset, inv_std)

    @staticmethod
    def _overflow_detail(row):
        if not row[finite.EXTRA]:
            return None
        name = batch_norm.OVERFLOW_NAMES[int(row[finite.EXTRA + 1])]
        return ("the running %s would overflow float32 (channel %d: %s); this batch is kept out "
                "of the running statistics" % (name, int(row[finite.EXTRA + 2]),
                                              "%.7g" % row[finite.EXTRA + 3]))

    def _report_overflow(self, x, overflow):
        """A finite batch whose statistics update float32 cannot hold: the update was skipped;
        report it like a non-finite batch."""
        name, channel, value = overflow
        report = reporting.inspect(
            x, always=True, detail="the running %s would overflow float32 (channel %d: %s); "
            "this batch is kept out of the running statistics" % (name, channel, "%.7g" % value),
            **self.fault_log.context("forward data", self.forward_calls, self.params.action))
        self.fault_log.handle(report)

    def _bad_stored_stats(self, stats):
        p = self.params
        s = host_scalar(stats[2].reshape(-1)[0])
        why = ("scale factor %r%s" % (s, "" if s != 0 and numpy.isfinite(s) else
                                      ": untrained, or a renamed layer that received no weights"))
        if p.on_bad_stats == "error":
            raise ValueError(self.fault_log.error(
                "stored statistics unusable under use_global_stats (%s); on_bad_stats: error" % why))
        if self.bad_stats_reported:
            return
        # One line for every layer of this phase in the same state (a net loaded without
        # its statistics has them all so), not 53 lines for a ResNet-50.
        alike = [layer for layer in reporting.LIVE.owners("StableBatchNorm", self.fault_log.phase,
                                                          self.fault_log.net)
                 if layer is self or (layer.use_global_stats and not layer.bad_stats_reported
                                      and layer.params.on_bad_stats == "batch"
                                      and not layer.stored_stats_usable())]
        for layer in alike:
            layer.bad_stats_reported = True
        others = [layer.fault_log.layer for layer in alike if layer is not self]
        self.fault_log.warn(
            "stored statistics unusable under use_global_stats (%s)%s; normalizing with batch "
            "statistics instead of x/sqrt(eps) (reported once)"
            % (why, "; so are those of %d more StableBatchNorm layers in %s: %s"
               % (len(others), self.fault_log.phase, ", ".join(others)) if others else ""))

    def stored_stats_usable(self):
        return batch_norm.running_stats(*[backend.data(self.blobs[i]) for i in range(3)]) is not None


    def _backward(self, top, bottom):
        centered, offset, inv_std = self._saved
        dy, dx = backend.diff(top[0]), backend.diff(bottom[0])  # the same memory in place
        if centered is not None:  # normalized with the batch's own statistics
            batch_norm.backward_batch_stats(dy, centered, offset, inv_std, dx, self.work)
        else:
            batch_norm.backward_global_stats(dy, inv_std, dx)
