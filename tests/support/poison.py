"""A test-only Python layer (module ``support.poison``): copies its bottom to its top and
writes NaN into one sample at chosen forward calls, so a test can place a fault at an
exact pass; or into the diff it passes down at chosen backward calls (a finite loss over
non-finite gradients).

    param_str: "{calls: [18], sample: 2}"   # NaN into sample 2 at the 18th forward call
    param_str: "{backward_calls: [3]}"      # NaN into sample 0's diff at the 3rd backward
"""

import caffe
import numpy
import yaml


class PoisonAtCall(caffe.Layer):
    def setup(self, bottom, top):
        params = yaml.safe_load(self.param_str or "{}") or {}
        self.calls = set(params.get("calls", []))
        self.sample = int(params.get("sample", 0))
        self.value = float(params.get("value", "nan"))
        self.backward_calls = set(params.get("backward_calls", []))
        self.count = self.backward_count = 0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        self.count += 1
        top[0].data[...] = bottom[0].data
        if self.count in self.calls:
            top[0].data[self.sample].flat[0] = self.value

    def backward(self, top, propagate_down, bottom):
        self.backward_count += 1
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff
            if self.backward_count in self.backward_calls:
                bottom[0].diff[self.sample].flat[0] = self.value


class ArrayData(caffe.Layer):
    """Serves batches of a .npy array (and its labels) in order, wrapping around: a
    data layer whose every batch the test chooses (a NaN in one sample, say).

    param_str: "{data: x.npy, labels: y.npy, batch_size: 64}"
    """

    def setup(self, bottom, top):
        params = yaml.safe_load(self.param_str)
        self.data = numpy.load(params["data"], mmap_mode="r")
        self.labels = numpy.load(params["labels"], mmap_mode="r")
        self.batch_size = int(params["batch_size"])
        self.position = 0

    def reshape(self, bottom, top):
        top[0].reshape(self.batch_size, *self.data.shape[1:])
        top[1].reshape(self.batch_size)

    def forward(self, bottom, top):
        n = len(self.data)
        rows = [(self.position + i) % n for i in range(self.batch_size)]
        self.position = (self.position + self.batch_size) % n
        top[0].data[...] = self.data[rows]
        top[1].data[...] = self.labels[rows]

    def backward(self, top, propagate_down, bottom):
        pass
