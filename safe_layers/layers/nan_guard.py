"""NaNGuard: detect, localize, clamp or abort on non-finite blobs, forward and backward.

    layer {
      name: "conv1_guard" type: "Python" bottom: "conv1" top: "conv1"
      python_param { module: "safe_layers" layer: "NaNGuard"
                     param_str: "{name: conv1_guard, follows: conv1, action: abort}" }
    }
"""

import caffe

from safe_layers.kernels import finite
from safe_layers.core import backend, schemas
from safe_layers import reporting


SCHEMA = schemas.NAN_GUARD



class NaNGuard(caffe.Layer):
    """Checks each bottom's data in forward and each top's diff in backward."""

    def setup(self, bottom, top):
        self.params = p = SCHEMA.parse(self.param_str)
        if len(bottom) == 0 or len(top) != len(bottom):
            raise SCHEMA.error("needs as many tops as bottoms (at least one); got %d bottoms, %d tops"
                               % (len(bottom), len(top)), p.name)
        self.forward_action = p.action
        self.backward_action = p.backward_action or p.action
        self.bound = p.bound if p.bound is not None else (p.max_abs or schemas.CLAMP_BOUND)
        self.in_place = []
        for i in range(len(bottom)):
            # pycaffe blob vectors index, but do not iterate.
            top[i].reshape(*bottom[i].shape)
            self.in_place.append(backend.same_memory(bottom[i].data, top[i].data))
        self.fault_log = reporting.FaultLog.for_layer(self, "NaNGuard", p, every=p.log_every)
        if p.dump_dir:
            self.fault_log.recorder = reporting.FlightRecorder(self.fault_log, p.dump_dir,
                                                               p.dump_max_mb * 1e6)
        self.forward_calls = 0
        self.backward_calls = 0

    def reshape(self, bottom, top):
        for i, same in enumerate(self.in_place):
            if not same:
                top[i].reshape(*bottom[i].shape)

    def forward(self, bottom, top):
        with self.fault_log.running("forward"):
            self.forward_calls += 1
            arrays = []
            for i, same in enumerate(self.in_place):
                out = backend.data(top[i])
                if not same:
                    out[...] = backend.data(bottom[i])
                arrays.append(out)
            if self.params.check in ("forward", "both"):
                self._guard(arrays, "forward data", self.forward_calls, self.forward_action)

    def backward(self, top, propagate_down, bottom):
        with self.fault_log.running("backward"):
            self.backward_calls += 1
            arrays = []
            for i, same in enumerate(self.in_place):
                if not propagate_down[i]:
                    arrays.append(None)
                    continue
                grad = backend.diff(bottom[i])
                if not same:
                    grad[...] = backend.diff(top[i])
                arrays.append(grad)
            if self.params.check in ("backward", "both"):
                self._guard(arrays, "backward diff", self.backward_calls, self.backward_action)

    def _guard(self, arrays, pass_, call, action):
        p = self.params
        for index, array in enumerate(arrays):
            if array is None:
                continue
            # The flight recorder needs the blobs as they arrived: such a guard checks at once.
            if backend.deferred_checks(array) and not p.dump_dir:
                self._defer(array, pass_, call, action, index)
                continue
            report = self.fault_log.check(array, pass_, call, action, index, p.max_abs)
            if report is None:
                continue
            # Reported (and, on abort, raised) before any repair; the flight record holds
            # the blobs as they arrived.
            taken = self.fault_log.handle(
                report, {"bottom%d" % i: a for i, a in enumerate(arrays) if a is not None})
            if taken == "clamp":
                finite.clamp_(array, p.nan_value, self.bound, p.max_abs)
            elif taken == "zero":
                array.fill(0)

    def _defer(self, array, pass_, call, action, index):
        """The deferred check: statistics into the board's row, then the repair the action
        asks for, applied on the device only where the row is flagged. The report (and an
        abort, or an escalation to abort) comes when the board is read; a repair has been
        made by then, an abort has not stopped anything before it."""
        p = self.params
        row = self.fault_log.defer(array, pass_, call, action, index, p.max_abs)
        if action == "clamp":
            finite.clamp_flagged_(array, row, p.nan_value, self.bound, p.max_abs)
        elif action == "zero":
            finite.zero_flagged_(array, row)
