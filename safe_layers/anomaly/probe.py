"""Per-layer checks of one net through pycaffe's layer hooks: which layer produced the
first non-finite value, forward and backward.

``Net.after_forward(f)`` / ``after_backward(f)`` call ``f(i)`` after layer ``i``'s pass
(src/caffe/net.cpp:529-530 and :581-582). After each forward the probe checks the layer's tops,
after each backward its bottoms' diffs and its params' diffs. It keeps, per blob,
whether its data (and its diff) is known to be non-finite, so a layer whose inputs were
already bad is not blamed: only a *producer* is reported, a layer whose inputs (bottom
data, params; in backward also top diffs and the forward values) were all finite.
"""

import math
import operator

import numpy

from safe_layers.core import backend
from safe_layers.reporting.watch_lines import BlobFault, ProducerFault
from safe_layers.kernels import finite
from safe_layers.kernels.xp import array_module, host_scalar, to_numpy


def accessors():
    """(data, diff): functions from a Blob to its arrays. On the CPU the blob's own NumPy
    views (``backend.data`` asks the mode on every call, which costs more than the check
    of a small blob); on GPU the backend's device arrays. Chosen once, when a watch
    attaches: the mode does not change under a running solver."""
    if backend.mode() == "cpu":
        return operator.attrgetter("data"), operator.attrgetter("diff")
    return backend.data, backend.diff


def blob_ok(array):
    """Every element finite: the fast check (one reduction), and when it fails an exact
    one, since the fast check's sums overflow on finite data near float32's limit (a blob
    of 1e38s is finite; blaming it would name the wrong producer and stop a healthy run)."""
    if finite.all_finite(array):
        return True
    xp = array_module(array)
    return bool(host_scalar(xp.isfinite(array).all()))


def blob_check(array):
    """(every element finite, how large the array is): one pass and one host read, as
    :func:`blob_ok` (the magnitude is :func:`finite.magnitude`'s: the L2 norm on the host,
    max |x| on a device; Inf for a finite array whose squares overflow, NaN when not ok)."""
    size = finite.magnitude(array)
    if math.isfinite(size):
        return True, size
    ok = blob_ok(array)
    return ok, (math.inf if ok else math.nan)


def is_zero(array, size):
    """Whether an array of magnitude ``size`` (:func:`blob_check`) is all zeros: a device's
    max |x| says it exactly; a host's 0 is confirmed (squares below ~1e-45 underflow)."""
    if size != 0:
        return False
    return array_module(array) is not numpy or finite.all_zero(array)


def blob_fault(array):
    """Exact counts, first bad element and the samples hit (indices along axis 0)."""
    counts = finite.count_faults(array)
    first_index, first_value = finite.first_fault(array)
    xp = array_module(array)
    if array.ndim:
        rows = array.reshape(array.shape[0], -1)
        hit = to_numpy(~xp.isfinite(rows).all(axis=1))
        samples = [int(s) for s in numpy.flatnonzero(hit)]
    else:
        samples = [0] if counts["nan"] or counts["posinf"] or counts["neginf"] else []
    return BlobFault(array.shape, counts["nan"], counts["posinf"], counts["neginf"],
                     first_index, first_value, samples)


def input_stats(role, name, array):
    low, high, mean_abs = finite.finite_stats(array)
    return {"role": role, "blob": name, "min": low, "max": high, "mean_abs": mean_abs}


class NetProbe:
    """The layer structure of one ``caffe.Net`` and the per-blob fault state of the
    pass in progress. ``report(fault)`` is called with each producer found."""

    def __init__(self, net, phase, report, iteration, check_layers=True):
        self.net = net
        self.phase = phase
        self.report = report
        self.iteration = iteration  # callable -> int or None
        self.check_layers = check_layers
        self.data, self.diff = accessors()
        self.names = list(net._layer_names)
        self.types = [layer.type for layer in net.layers]
        self.blob_names = list(net._blob_names)
        blobs = net._blobs
        self.blobs = [blobs[j] for j in range(len(self.blob_names))]
        n = len(self.names)
        self.tops = [list(net._top_ids(i)) for i in range(n)]
        self.bottoms = [list(net._bottom_ids(i)) for i in range(n)]
        self.params = [[layer.blobs[k] for k in range(len(layer.blobs))] for layer in net.layers]
        weights = list(net._blob_loss_weights)
        self.loss_tops = [[(j, weights[j]) for j in self.tops[i] if weights[j] != 0]
                          for i in range(n)]
        self.data_layers = [i for i in range(n) if not self.bottoms[i]]
        self.last = n - 1
        self.forward_calls = 0
        self.backward_calls = 0
        self._last_forward = n      # a layer index not above the last one seen starts a pass
        self._last_backward = -1
        self.pass_losses = []       # the loss of each forward pass (the watch empties it)
        self.bad_data = set()   # blob ids whose data is non-finite in this pass
        self.bad_diff = set()   # blob ids whose diff is non-finite in this pass
        self.bad_params = {}    # (layer, k) -> 'data' / 'diff' found non-finite
        self.loss = numpy.float32(0)
        self.producers = []     # ProducerFaults found in this pass
        self.faulty = False     # any non-finite value seen in this pass
        # The watch's liveness checks (its training net only): which layers put out all
        # zeros, and how large each param diff was, from the finite checks' own reads.
        self.track_zeros = False
        self.zero_data = set()      # blob ids whose data is all zeros in this pass
        self._pass_zero = []
        self.zero_producers = None  # [(layer, top k)] all zeros in every pass (the watch resets)
        self.diff_sizes = {}        # (layer, k) -> magnitude of that param's diff (the watch resets)
        with_params = [i for i in range(n) if self.params[i]]
        # A layer can only die of training when something at or before it is trained.
        self.first_trained = with_params[0] if with_params else n

    # -- forward ---------------------------------------------------------------------
    def begin_forward(self):
        self.forward_calls += 1
        self.bad_data.clear()
        self.zero_data.clear()
        self._pass_zero = []
        self.loss = numpy.float32(0)
        self._last_forward = -1

    def after_forward(self, i):
        if i <= self._last_forward:
            self.begin_forward()
        self._last_forward = i
        self.loss = self._add_loss(self.loss, i)
        if i == self.last:
            self.pass_losses.append(self.loss)
        if not self.check_layers:
            return
        checked = [blob_check(self.data(self.blobs[j])) for j in self.tops[i]]
        bad = [k for k, (ok, _) in enumerate(checked) if not ok]
        if self.track_zeros:
            self._zeros(i, checked)
        inputs_bad = any(j in self.bad_data for j in self.bottoms[i])
        for k, j in enumerate(self.tops[i]):
            if k in bad:
                self.bad_data.add(j)
            else:
                self.bad_data.discard(j)
        if not bad:
            return
        self.faulty = True
        if inputs_bad:
            return  # it passed a non-finite input on: not the producer
        note = self._bad_weights_note(i)
        k = bad[0]
        j = self.tops[i][k]
        inputs = [input_stats("bottom[%d]" % b, self.blob_names[jb], self.data(self.blobs[jb]))
                  for b, jb in enumerate(self.bottoms[i])]
        self._report("forward", i, "top", k, self.blob_names[j], "data",
                     self.data(self.blobs[j]), inputs, note, self.forward_calls)

    def _zeros(self, i, checked):
        """Note layer ``i``'s tops that are all zeros (``checked``: their blob_check), and
        the layer as a zero *producer* where one of its bottoms was not all zeros: a
        trained layer's, with a top per sample (not a loss, not a scalar). At the pass's
        last layer, the producers of every pass of the iteration so far are kept."""
        zero_in = all(j in self.zero_data for j in self.bottoms[i])
        eligible = (self.bottoms[i] and not zero_in and i >= self.first_trained
                    and not self.loss_tops[i])
        for k, j in enumerate(self.tops[i]):
            ok, size = checked[k]
            array = self.data(self.blobs[j])
            if ok and is_zero(array, size):
                self.zero_data.add(j)
                if eligible and array.ndim >= 2:
                    self._pass_zero.append((i, k))
            else:
                self.zero_data.discard(j)
        if i == self.last:
            previous = self.zero_producers
            self.zero_producers = (list(self._pass_zero) if previous is None
                                   else [p for p in previous if p in self._pass_zero])

    # -- backward --------------------------------------------------------------------
    def begin_backward(self):
        self.backward_calls += 1
        self.bad_diff.clear()
        self._last_backward = len(self.names)

    def after_backward(self, i):
        if i >= self._last_backward:
            self.begin_backward()
        self._last_backward = i
        if not self.check_layers:
            return
        bad_bottoms = [k for k, j in enumerate(self.bottoms[i])
                       if not blob_ok(self.diff(self.blobs[j]))]
        bad_params = []
        for k, blob in enumerate(self.params[i]):
            ok, size = blob_check(self.diff(blob))
            self.diff_sizes[(i, k)] = size
            if not ok:
                bad_params.append(k)
        inputs_bad = (any(j in self.bad_diff for j in self.tops[i])
                      or any(j in self.bad_data for j in self.bottoms[i] + self.tops[i]))
        for k, j in enumerate(self.bottoms[i]):
            if k in bad_bottoms:
                self.bad_diff.add(j)
            else:
                self.bad_diff.discard(j)
        for k in bad_params:
            self.bad_params[(self.names[i], k)] = "diff"
        if not (bad_bottoms or bad_params):
            return
        self.faulty = True
        if inputs_bad:
            return
        note = self._bad_weights_note(i)
        inputs = [input_stats("top[%d] diff" % t, self.blob_names[jt], self.diff(self.blobs[jt]))
                  for t, jt in enumerate(self.tops[i])]
        if bad_bottoms:
            k = bad_bottoms[0]
            j = self.bottoms[i][k]
            self._report("backward", i, "bottom", k, self.blob_names[j], "diff",
                         self.diff(self.blobs[j]), inputs, note, self.backward_calls)
        else:
            k = bad_params[0]
            self._report("backward", i, "param", k, "%s[%d]" % (self.names[i], k), "diff",
                         self.diff(self.params[i][k]), inputs, note, self.backward_calls)

    # -- shared ----------------------------------------------------------------------
    def _add_loss(self, loss, i):
        """``loss`` plus layer ``i``'s: Layer::Forward's loss += dot(top data, loss
        weights), in the net's float."""
        for j, weight in self.loss_tops[i]:
            data = self.data(self.blobs[j])
            loss = numpy.float32(loss + numpy.float32(host_scalar(data.sum()) * weight))
        return loss

    def read_loss(self):
        """The loss of the net's last forward, read from its loss tops now, as
        after_forward sums it during the pass: the loss a watch without layer hooks has."""
        loss = numpy.float32(0)
        for i in range(len(self.names)):
            loss = self._add_loss(loss, i)
        return loss

    def _bad_weights_note(self, i):
        bad = [k for k, blob in enumerate(self.params[i]) if not blob_ok(self.data(blob))]
        if not bad:
            return ""
        for k in bad:
            self.bad_params[(self.names[i], k)] = "data"
        return "its weights are non-finite already (%s): ruined by an earlier update" % ", ".join(
            "%s[%d]" % (self.names[i], k) for k in bad)

    def _report(self, pass_, i, role, k, blob, what, array, inputs, note, call):
        fault = ProducerFault(pass_=pass_, phase=self.phase, iteration=self.iteration(),
                              call=call, layer=self.names[i], layer_type=self.types[i],
                              layer_index=i, role=role, blob_index=k, blob=blob, what=what,
                              fault=blob_fault(array), inputs=inputs, note=note, action=None)
        self.producers.append(fault)
        self.report(fault)

    def input_arrays(self):
        """{blob name: array} of the tops of layers without bottoms (data and Input
        layers): the batch itself, for a replayable record."""
        out = {}
        for i in self.data_layers:
            for j in self.tops[i]:
                out[self.blob_names[j]] = to_numpy(self.data(self.blobs[j])).copy()
        return out
