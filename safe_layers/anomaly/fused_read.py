"""The solver-level checks' host reads, fused: everything they need of an iteration is
reduced on the arrays' own device into one small array and read to the host at once.

Before the update (``on_gradients_ready``) that is the sum of each loss top (the loss, as
Layer::Forward sums it), every param diff's sum of squares (its finiteness and its L2
norm, for the clip, the growth warning and the vanished-update check) and the sum of
squares of the params a forward writes (BatchNorm's mean, variance and scale factor,
src/caffe/layers/batch_norm_layer.cpp: Forward_cpu; a Python layer's or an unknown
type's, which may): one host read per healthy iteration on a GPU, whatever the number
of param blobs. Every weight's sum of squares (:meth:`FusedReads.weights`) is read after
an update only where the update could have made a finite weight non-finite (see
checks.SolverChecks.settle). A sum of squares that is not finite costs one more read
for that blob (see :func:`wide`).
"""

import math

import numpy

from safe_layers.kernels.xp import HOST_READS, array_module, host_scalar, to_numpy


def wide(array):
    """The sum of squares of ``array`` in float64 (one host read): the float32 one of a
    finite array overflows for elements past ~1.8e19, the float64 one never does, so it
    is non-finite exactly when an element is."""
    flat = array.reshape(-1).astype("float64")
    with numpy.errstate(over="ignore", invalid="ignore"):
        return host_scalar(flat.dot(flat))


def _host_sum(array):
    """``array.sum()`` as a float, an overflow to inf or nan without a warning."""
    with numpy.errstate(over="ignore", invalid="ignore"):
        return float(array.sum())


def read_reductions(summed, squared):
    """([sum of each array of ``summed``], [sum of squares of each of ``squared``]) as
    Python floats, from one host read (plus one per non-finite float32 sum of squares,
    redone by :func:`wide`). The float32 reductions are those of a lone ``x.sum()`` and
    ``x.dot(x)``: the same values as when each was read alone."""
    first = summed[0] if summed else squared[0] if squared else None
    if first is None:
        return [], []
    xp = array_module(first)
    if xp is numpy:
        return _host_reductions(summed, squared)
    out = xp.empty(len(summed) + len(squared), numpy.float64)
    with numpy.errstate(over="ignore", invalid="ignore"):
        for m, array in enumerate(summed):
            out[m] = array.sum()
        for m, array in enumerate(squared, len(summed)):
            flat = array.reshape(-1)
            out[m] = flat.dot(flat) if flat.size else 0
    host = [float(v) for v in to_numpy(out)]  # the one read
    return host[:len(summed)], _finite_or_wide(host[len(summed):], squared)


def _host_reductions(summed, squared):
    """:func:`read_reductions` of NumPy arrays. On the host there is nothing to fuse: each
    value is there already (counted as the one read), and an array to gather them costs
    more than the reductions of a small net (a millisecond iteration's watch,
    bench/bench_watch.py)."""
    HOST_READS.add()
    sums = [array.item() if array.size == 1 else _host_sum(array) for array in summed]
    # vdot (BLAS) raises no floating-point warning: an overflow gives inf quietly.
    squares = [float(numpy.vdot(array, array)) for array in squared]
    return sums, _finite_or_wide(squares, squared)


def _finite_or_wide(squares, arrays):
    """``squares``, each non-finite one redone by :func:`wide`."""
    if math.isfinite(sum(squares)):
        return squares
    return [value if math.isfinite(value) else wide(array)
            for value, array in zip(squares, arrays)]


# Layer types whose param blobs only the solver's update changes (their Forward reads
# them): the forward-written params are those of every other type, a fork's included.
SOLVER_WRITTEN = frozenset(("Convolution", "Deconvolution", "InnerProduct", "Scale", "Bias",
                            "PReLU", "Embed", "RNN", "LSTM"))


def forward_written(net, params):
    """The entries of ``params`` (:func:`~.checks.param_blobs`) whose layer may write them
    in its Forward."""
    return [p for p in params if net.layers[p[1]].type not in SOLVER_WRITTEN]


class FusedReads:
    """The fused reads of one watched training net: ``probe`` (its loss tops), ``params``
    (:func:`~.checks.param_blobs`), ``written`` (those a forward writes), ``data`` /
    ``diff`` (the blob accessors). Sums of squares come as lists in the order of
    ``params`` (``written``)."""

    def __init__(self, probe, params, written, data, diff):
        self.probe = probe
        self.params = params
        self.written = written
        self.data, self.diff = data, diff
        self.param_blobs = [blob for _, _, _, blob in params]
        self.written_blobs = [blob for _, _, _, blob in written]
        # Every loss top with its weight, in the net's order (Net::ForwardFromTo sums them so).
        loss_tops = [pair for tops in probe.loss_tops for pair in tops] if probe is not None else []
        self.top_blobs = [probe.blobs[j] for j, _ in loss_tops]
        self.top_weights = [weight for _, weight in loss_tops]

    def gradients(self, with_loss, with_diffs):
        """(the loss of the net's last forward as a float32, or None without
        ``with_loss``; the sums of squares of every param diff and of the forward-written
        params' data, or None and None without ``with_diffs``): one host read."""
        tops = [self.data(blob) for blob in self.top_blobs] if with_loss else []
        squared = []
        if with_diffs:
            squared = ([self.diff(blob) for blob in self.param_blobs]
                       + [self.data(blob) for blob in self.written_blobs])
        sums, squares = read_reductions(tops, squared)
        loss = None
        if with_loss:
            loss = numpy.float32(0)
            for weight, value in zip(self.top_weights, sums):
                loss = numpy.float32(loss + numpy.float32(value * weight))  # probe._add_loss
        if not with_diffs:
            return loss, None, None
        count = len(self.params)
        return loss, squares[:count], squares[count:]

    def weights(self):
        """The sums of squares of every param blob's data: one host read."""
        return read_reductions([], [self.data(blob) for blob in self.param_blobs])[1]
