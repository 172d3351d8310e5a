"""Test-only Python layers for the deferred checks (module ``support.read_counter``; the tests
put tests/ on PYTHONPATH for the ``caffe`` binary).

* ``ReadCounter``: copies its bottom to its top; at each forward it appends to ``path`` a
  line "<forward call> <host reads so far>" (``safe_layers.kernels.xp.HOST_READS``), so a
  test sees the host reads of each iteration inside the ``caffe`` binary. It reads
  nothing itself.
* ``GradientBurst``: identity forward; in backward, multiplies the gradient by ``factor``
  (default 1e39: the float32 product overflows to +-Inf) at the chosen backward calls.

    param_str: "{path: reads.txt}"       "{calls: [5], factor: 1e39}"
"""

import caffe
import numpy
import yaml

from safe_layers.kernels import xp


class ReadCounter(caffe.Layer):
    def setup(self, bottom, top):
        self.path = yaml.safe_load(self.param_str)["path"]
        self.calls = 0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        self.calls += 1
        top[0].data[...] = bottom[0].data
        with open(self.path, "a") as f:
            f.write("%d %d\n" % (self.calls, xp.HOST_READS.count))

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff


class GradientBurst(caffe.Layer):
    def setup(self, bottom, top):
        params = yaml.safe_load(self.param_str or "{}") or {}
        self.at = set(params.get("calls", []))
        self.factor = float(params.get("factor", 1e39))
        self.calls = 0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        self.calls += 1
        if propagate_down[0]:
            with numpy.errstate(over="ignore"):
                # In float32 whatever NumPy's casting rules (NumPy 1 would compute a float32
                # array times a Python float too big for float32 in float64: finite).
                factor = numpy.float32(self.factor if self.calls in self.at else 1.0)
                bottom[0].diff[...] = top[0].diff * factor
