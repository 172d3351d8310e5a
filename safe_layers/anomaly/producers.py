"""What a watch does with a producer its probes found (the first layer whose output went
non-finite): a test net's is reported; the watched net's stops training under
``on_nonfinite`` 'stop', else is reported. Under a solver a TRAIN producer to stop on is
first *held* until the next layer that uses its blob: an in-place layer there (a NaNGuard
in clamp or zero mode) may repair it, and then the run the user hardened goes on."""

from safe_layers.anomaly.probe import blob_ok


class Producers:
    """The producers of one watch's nets, and the one held (``held``: (probe, fault, blob
    id) or None)."""

    def __init__(self, train_probe, options, reports, under_solver):
        self.train_probe = train_probe  # the watched net's probe: its faults act
        self.options = options
        self.reports = reports
        self.under_solver = under_solver
        self.held = None

    def found(self, fault):
        """A probe's report of a producer."""
        # The watched net's own faults act (a solver's training net, or a lone net in
        # whatever phase); a solver's test nets are reported only.
        train = fault.phase == self.train_probe.phase
        stop = train and self.options.on_nonfinite == "stop"
        self.stop_held()  # never two at once; the first producer is the one to stop on
        if stop and fault.role != "param" and self.under_solver:
            # Under a solver a pass always runs to its end (Solver::Step), so the layer
            # after the producer is sure to come and settle the hold.
            probe = self.train_probe
            i, k = fault.layer_index, fault.blob_index
            blob = probe.tops[i][k] if fault.role == "top" else probe.bottoms[i][k]
            if not (i == probe.last if fault.pass_ == "forward" else i == 0):
                self.held = (probe, fault, blob)
                return
        fault.action = "stop" if stop else "report"
        if stop:
            self.reports.stop(fault)
        self.reports.fault(fault, "E" if train else "W")

    @staticmethod
    def _in_place_on(probe, i, blob):
        return blob in probe.tops[i] and blob in probe.bottoms[i]

    def before_layer(self, probe, i, pass_):
        """Before layer ``i`` of a pass: the held producer's blob goes on to it unrepaired
        unless ``i`` works on that blob in place (it may repair it): stop here, before
        layer ``i`` runs."""
        held_probe, fault, blob = self.held
        if held_probe is not probe or fault.pass_ != pass_ or i == fault.layer_index:
            self.stop_held()  # another pass began: whatever held it, it was not repaired
            return
        if not self._in_place_on(probe, i, blob):
            self.stop_held()

    def after_layer(self, probe, i, pass_):
        """After the in-place layer ``i`` that followed the held producer: its blob finite
        now (a NaNGuard in repair mode: what the rest of the net sees is finite, so the
        run the user hardened goes on) or not (stop, before any later layer runs)."""
        held_probe, fault, blob = self.held
        if held_probe is not probe or fault.pass_ != pass_ or i == fault.layer_index:
            return
        array = probe.data(probe.blobs[blob]) if pass_ == "forward" else probe.diff(probe.blobs[blob])
        if self._in_place_on(probe, i, blob) and blob_ok(array):
            self._release("report", "repaired in place by %s %s" % (probe.types[i], probe.names[i]))
        else:
            self.stop_held()

    def drop_held(self):
        """A hold left by a pass that an exception cut short (a strict guard's abort right
        after the producer): reported, never raised later on a clean pass."""
        self._release("report", "the pass ended (an exception) before the next layer ran")

    def stop_held(self):
        """Stop on the held producer, if any (nothing repaired it)."""
        self._release("stop")

    def _release(self, action, note=None):
        """Let go of the held producer, if any: ``stop`` raises with it, ``report`` logs it
        with ``note`` added to its own."""
        if self.held is None:
            return
        fault = self.held[1]
        self.held = None
        fault.action = action
        if note:
            fault.note = "%s; %s" % (fault.note, note) if fault.note else note
        if action == "stop":
            self.reports.stop(fault)
        self.reports.fault(fault, "W")
