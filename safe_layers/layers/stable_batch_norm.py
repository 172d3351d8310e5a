"""StableBatchNorm: a drop-in for Caffe's BatchNorm that cannot blow up.

Same three blobs (accumulated mean [C], accumulated variance [C], scale factor [1]), same
parameters and defaults, same statistics update and outputs, so a caffemodel moves
between this layer and stock BatchNorm in both directions (same layer name). Stable in
that moments are two-pass float64 (variance >= 0); untrusted stored statistics (a zero or
non-finite scale factor, non-finite mean/variance) are not amplified by 1/sqrt(eps) but
replaced by the batch's own (or rejected: ``on_bad_stats: error``); a non-finite batch
never enters the running averages; ``eps <= 0`` is rejected.

The statistics must not be learned. Caffe's BatchNorm forces that itself; a Python layer
cannot, so declare three ``param { lr_mult: 0 }`` (otherwise weight decay shrinks them):

    layer {
      name: "bn1" type: "Python" bottom: "conv1" top: "conv1"
      param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 }
      python_param { module: "safe_layers" layer: "StableBatchNorm" param_str: "{name: bn1}" }
    }
"""

import caffe
import numpy

from safe_layers import backend, reporting, schemas
from safe_layers.kernels import batch_norm

SCHEMA = schemas.STABLE_BATCH_NORM



class StableBatchNorm(caffe.Layer):
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
        self._saved = None

    def release_buffers(self):
        """The net is gone (Caffe keeps the layer object itself): drop the saved batch."""
        self._saved = None

    def reshape(self, bottom, top):
        if bottom[0].shape[1] != self.blobs[0].count:
            raise ValueError(self.fault_log.error("bottom now has %d channels; its statistics have %d"
                                                  % (bottom[0].shape[1], self.blobs[0].count)))
        if not self.in_place:
            top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        p = self.params
        self.forward_calls += 1
        x = backend.data(bottom[0])
        report = self.fault_log.check(x, "forward data", self.forward_calls, p.action)
        if report is not None:
            self.fault_log.handle(report)
        stats = [backend.data(self.blobs[i]) for i in range(3)]
        use_batch = not self.use_global_stats
        mean_var = None if use_batch else batch_norm.running_stats(*stats)
        if mean_var is None and not use_batch:
            self._bad_stored_stats(stats)
            use_batch = True
        if use_batch:
            mean_var = batch_norm.batch_moments(x)
            if not self.use_global_stats and report is None:
                batch_norm.update_running_stats(*stats, *mean_var, x.size // x.shape[1],
                                                p.moving_average_fraction)
        y, inv_std = batch_norm.normalize(x, *mean_var, p.eps)
        backend.data(top[0])[...] = y
        # In-place use (and a Scale after it) overwrites the top: keep y for backward.
        self._saved = (y, inv_std, use_batch)

    def _bad_stored_stats(self, stats):
        p = self.params
        s = float(stats[2].reshape(-1)[0])
        message = ("stored statistics unusable under use_global_stats (scale factor %r%s); "
                   % (s, "" if s != 0 and numpy.isfinite(s) else
                      ": untrained, or a renamed layer that received no weights"))
        if p.on_bad_stats == "error":
            raise ValueError(self.fault_log.error(message + "on_bad_stats: error"))
        if not self.bad_stats_reported:
            self.bad_stats_reported = True
            self.fault_log.warn(message + "normalizing with batch statistics instead of x/sqrt(eps) "
                                "(reported once)")

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        y, inv_std, used_batch = self._saved
        dy = backend.diff(top[0])
        if used_batch:
            dx = batch_norm.backward_batch_stats(dy, y, inv_std)
        else:
            dx = batch_norm.backward_global_stats(dy, inv_std)
        backend.diff(bottom[0])[...] = dx  # dx is a new array: safe when top is bottom
