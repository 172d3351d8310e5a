"""The watch's default mode (``check_layers: replay``): no layer probe on a healthy
iteration; on a fault, the iteration is run again, before its update, with every layer
checked, to name its producer as the always-on probes would have.

What a replay needs is what the iteration ran with: the weights (still those of before
the update: the fault is seen in ``on_gradients_ready``, src/caffe/solver.cpp:264, before
``ApplyUpdate`` at :267) and the batch, the tops of the layers without bottoms. Those tops
are still in the net after the backward (no layer writes them) when ``iter_size`` is 1 and
no layer works on one of them in place: then nothing at all is kept on a healthy iteration.
Otherwise a light ``after_forward`` hook copies them after each data layer's forward
(a memcpy of the batch) and sums the pass's loss, as the probes do with no layer checked.

The replay runs the net one layer at a time (``Net._forward(i, i)``, ``Net._backward(i,
i)``: Net::ForwardFromTo / BackwardFromTo, src/caffe/net.cpp), the data layers not run but
their recorded tops put back, the probes and the hold of a producer to stop on
(:mod:`.producers`) called where the layer hooks would call them. The param data (a
BatchNorm's running statistics move in every TRAIN forward) and the param diffs (a backward
adds to them) are put back as they were afterwards, so the policy then acts on the
iteration Caffe computed. Our own layers in the net (NaNGuard, GradientClip, ...) run
again as they ran, repairs included, but report and count nothing (their reports of the
iteration were made when it ran: ``reporting.replaying``). Where the replay finds no non-finite value, the fault did not
reproduce: a random layer (Dropout) drew anew, or a Python layer with state behaved
otherwise; the report says so and names those layers.
"""

import time

from safe_layers.reporting.fault_log import replaying

# Layers that draw random numbers in a TRAIN forward: a replay draws anew.
RANDOM_TYPES = ("Dropout", "DummyData", "RReLU")


class FaultReplay:
    """The default mode's state of one watched training net: ``passes`` (forward passes
    run under the solver before the current iteration), the batch kept when it has to be
    (``kept``: per pass, {blob id: copy}), and ``last`` (what the last replay found: a
    dict with ``reproduced``, ``seconds``, ``random_layers``, ``stateful_layers``)."""

    def __init__(self, net, probe, producers, iter_size):
        self.net = net
        self.probe = probe
        self.producers = producers
        self.iter_size = iter_size
        self.passes = 0
        self.replaying = False
        self.last = None
        data = set(probe.data_layers)
        data_tops = {j for i in data for j in probe.tops[i]}
        # A data top another layer writes in place is changed by the time of the fault.
        written = any(j in data_tops for i in range(len(probe.names)) if i not in data
                      for j in probe.tops[i])
        self.keep = iter_size > 1 or written
        self.kept = []
        names, types = probe.names, probe.types
        self.random_layers = [names[i] for i in range(len(names))
                              if types[i] in RANDOM_TYPES and i not in data]
        self.stateful_layers = [names[i] for i in range(len(names))
                                if types[i] == "Python" and i not in data]
        self.python_layers = [layer for i, layer in enumerate(net.layers)
                              if types[i] == "Python" and i not in data
                              and hasattr(layer, "__dict__")]
        self.layer_states = []
        self.trained = set()       # param labels whose diff was ever non-zero
        self.frozen = set()        # param labels Caffe computes no diff for (see frozen_params)
        self.first_iteration = None
        self.dead_after = 1
        self.read_boards = lambda: None  # the watch's: reads its net's deferred checks

    # -- each iteration ----------------------------------------------------------------
    def start(self):
        """An iteration (or its retry) starts: its passes are counted from here."""
        self.kept = []
        if self.python_layers:
            self.layer_states = [(layer, dict(vars(layer))) for layer in self.python_layers]
        self.first_pass = self.passes
        self.passes += self.iter_size
        probe = self.probe
        if not self.keep:
            probe.forward_calls = probe.backward_calls = self.first_pass + self.iter_size

    def after_forward(self, i):
        """The light hook (only where the batch must be kept): the pass's loss summed and
        the data layers' tops copied."""
        if self.replaying:
            return
        probe = self.probe
        probe.after_forward(i)  # check_layers off here: the pass count and its loss only
        if i in probe.data_layers:
            if i == probe.data_layers[0]:
                self.kept.append({})
            for j in probe.tops[i]:
                self.kept[-1][j] = probe.blobs[j].data.copy()

    def losses(self):
        """The loss of each forward pass of the iteration, as the probes sum it."""
        if self.keep:
            return list(self.probe.pass_losses)
        return [self.probe.read_loss()]

    # -- on a fault --------------------------------------------------------------------
    def replay(self, iteration):
        """Run ``iteration`` again with every layer checked; the
        producers found are reported as the always-on probes report them, a stop raising
        NonFiniteError from here. Returns ``last``."""
        probe = self.probe
        # pycaffe's host views: on a GPU, one copy of each blob to the host, on a fault only.
        batches = self.kept if self.keep else [{j: probe.blobs[j].data.copy()
                                                for i in probe.data_layers for j in probe.tops[i]}]
        params = [blob for blobs in probe.params for blob in blobs]
        saved = [(blob.data.copy(), blob.diff.copy()) for blob in params]
        # The Python layers' attributes: replayed from the iteration's start, put back as
        # they are now afterwards (a call counter is rebound, not changed in place).
        layers = [(layer, dict(vars(layer))) for layer, _ in self.layer_states]
        for layer, attributes in self.layer_states:
            vars(layer).clear()
            vars(layer).update(attributes)
        first = probe.forward_calls - len(batches)
        started = time.perf_counter()
        self.replaying = True
        faulty = False
        try:
            for blob in params:
                blob.diff[...] = 0  # Solver::Step's ClearParamDiffs
            check_layers, probe.check_layers = probe.check_layers, True
            try:
                with replaying():
                    try:
                        for k, batch in enumerate(batches):
                            probe.forward_calls = probe.backward_calls = first + k
                            self._pass(batch)
                            faulty = faulty or probe.faulty
                    finally:
                        # Our layers' deferred checks of the replay (a stop cut it short
                        # too), read while they are muted.
                        self.read_boards()
            finally:
                probe.check_layers = check_layers
                self.producers.stop_held()
        finally:
            faulty = faulty or probe.faulty  # a stop raised in the pass: reproduced
            self.replaying = False
            for layer, attributes in layers:
                vars(layer).clear()
                vars(layer).update(attributes)
            for blob, (data, diff) in zip(params, saved):
                blob.data[...] = data
                blob.diff[...] = diff
            self.last = {"iteration": iteration, "reproduced": faulty,
                         "seconds": time.perf_counter() - started,
                         "random_layers": list(self.random_layers),
                         "stateful_layers": list(self.stateful_layers)}
        return self.last

    def zeros(self, iteration, labels, squares):
        """The dead-layer check's evidence on a good iteration (``squares``: the param
        diffs' sums of squares, in the order of ``labels``): a layer whose top is all
        zeros leaves the params after it (and before it) with zero diffs, so only where a
        param that had learned has a zero diff now is the iteration replayed, its tops
        checked as the always-on probes check them (``probe.zero_producers``); no fault
        can be found there (it is finite)."""
        if self.first_iteration is None:
            self.first_iteration = iteration
        if 0.0 not in squares:  # every param learns (-0.0 == 0.0 counts too)
            if len(self.trained) < len(labels):
                self.trained.update(labels)
            return
        # A param whose diff was always zero may be frozen (lr_mult 0: no diff computed),
        # or dead from the start: looked at over the first dead_after iterations only.
        early = iteration - self.first_iteration < self.dead_after
        zero = False
        frozen = self.frozen
        for label, square in zip(labels, squares):
            if square:
                self.trained.add(label)
            elif (early and label not in frozen) or label in self.trained:
                zero = True
        if zero:
            self.replay(iteration)

    def _pass(self, batch):
        """One forward and backward of the net on ``batch``, checked layer by layer."""
        probe, net, producers = self.probe, self.net, self.producers
        probe.faulty = False
        probe._last_forward = len(probe.names)  # the next layer starts a pass
        probe._last_backward = -1
        for j, array in batch.items():
            blob = probe.blobs[j]
            if tuple(blob.data.shape) != array.shape:
                blob.reshape(*array.shape)
            blob.data[...] = array
        for i in range(len(probe.names)):
            if producers.held is not None:
                producers.before_layer(probe, i, "forward")
            if i not in probe.data_layers:
                net._forward(i, i)
            if producers.held is not None:
                producers.after_layer(probe, i, "forward")
            probe.after_forward(i)
        for i in range(len(probe.names) - 1, -1, -1):
            if producers.held is not None:
                producers.before_layer(probe, i, "backward")
            net._backward(i, i)
            if producers.held is not None:
                producers.after_layer(probe, i, "backward")
            probe.after_backward(i)


def not_reproduced(last):
    """What a fault's report says when its replay found every layer's outputs finite."""
    causes = []
    if last["random_layers"]:
        causes.append("random layers drew anew (%s)" % ", ".join(last["random_layers"]))
    if last["stateful_layers"]:
        causes.append("Python layers may hold state (%s)" % ", ".join(last["stateful_layers"]))
    why = "; ".join(causes) or "the net is not deterministic"
    return ("no producer named: the replay of this iteration with every layer checked found "
            "every value finite (%s); check_layers: always names the producer of such nets"
            % why)


def attach(watch, options):
    """The FaultReplay of ``watch``'s training net under ``options`` (check_layers
    'replay'), its probe switched to count passes only, or None in another mode."""
    if options.check_layers != "replay":
        return None
    probe = watch.probes[0]
    probe.check_layers = False
    replay = FaultReplay(watch.net, probe, watch.producers, watch.iter_size)
    replay.dead_after = options.dead_after
    replay.frozen = frozen_params(watch.net, watch.train_net_param())
    replay.read_boards = watch._read_boards

    def on_fault(iteration):
        replay.last = None
        try:
            replay.replay(iteration)  # a producer to stop on raises NonFiniteError
        finally:
            if replay.last is not None:
                keep_event(watch.reports, replay_event(replay.last),
                           printed=not replay.last["reproduced"])
        return None if replay.last["reproduced"] else not_reproduced(replay.last)
    watch.checks.on_fault = on_fault
    watch.checks.on_sizes = replay.zeros
    return replay


def frozen_params(net, net_param):
    """The labels ('layer[k]') of the params of ``net`` whose diff Caffe never computes:
    lr_mult 0 (Net::AppendParam: set_param_propagate_down(false), src/caffe/net.cpp), as
    every BatchNorm's statistics are (its LayerSetUp forces it,
    src/caffe/layers/batch_norm_layer.cpp), and as ``net_param`` (the solver's training
    net, or None) says of the others. Their zero diffs are no sign of a dead layer."""
    specs = {}
    if net_param is not None:
        for layer in net_param.layer:
            specs.setdefault(layer.name, [spec.lr_mult if spec.HasField("lr_mult") else 1.0
                                          for spec in layer.param])
    frozen = set()
    for name, layer in zip(net._layer_names, net.layers):
        mults = specs.get(name, [])
        for k in range(len(layer.blobs)):
            if layer.type == "BatchNorm" or (k < len(mults) and mults[k] == 0):
                frozen.add("%s[%d]" % (name, k))
    return frozen


def replay_event(last):
    """The event that says a replay ran, what it found and what it cost."""
    from safe_layers.reporting.watch_lines import Event
    return Event("replay", last["iteration"], "run again with every layer checked: %s, %.1f ms"
                 % ("fault reproduced" if last["reproduced"] else "NOT reproduced",
                    1000 * last["seconds"]),
                 {"reproduced": last["reproduced"], "seconds": last["seconds"],
                  "random_layers": last["random_layers"],
                  "stateful_layers": last["stateful_layers"]})


def keep_event(reports, event, printed):
    """Keep ``event`` among the watch's events (and hand it to its listener); print it
    only when ``printed``: a replay that named the producer adds no line to the log."""
    if printed:
        reports.event(event)
        return
    reports.events.append(event)
    reports.counts[event.kind] += 1
    if reports.listener:
        reports.listener(event)
