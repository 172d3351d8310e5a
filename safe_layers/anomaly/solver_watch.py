"""Anomaly mode for Caffe: a watch on a pycaffe solver (or net) through the stock hooks.

    solver = caffe.get_solver("solver.prototxt")
    w = safe_layers.watch(solver, solver_file="solver.prototxt", on_nonfinite="skip",
                          rollback_after=5, record_dir="faults/")
    solver.step(1000)          # the watch's step: skips and rollbacks happen inside

What it checks, without a prototxt edit (caffe-internals.md section 8):

* every layer's tops after its forward and its bottoms' and params' diffs after its
  backward (``Net.after_forward`` / ``after_backward``), naming the *producer*;
* each iteration (``Solver.add_callback``): the learning rate before the forward, the
  loss and every param diff before the update, every weight after it; optionally the
  growth of the weight and gradient norms, and a NaN-aware clip of the param diffs.

What stock pycaffe allows a skip to be (measured, tests/test_watch.py): an exception
raised from ``on_gradients_ready`` abandons ``Solver::Step`` before ``ApplyUpdate``,
so the weights, the momentum history, the lr schedule's step counter and ``iter`` are
all left exactly as they were (bit for bit). Zeroing the diffs instead would still
apply momentum and weight decay, and ``apply_update()`` always advances ``iter``.
The watch therefore replaces ``solver.step`` and ``solver.solve`` on the instance with
loops that catch its own exception and step on; ``iter`` counts updates, as in Caffe.
"""

import collections
import math
import os
import sys
import time

import numpy

from safe_layers.core import solver_iteration, lr_policy
from safe_layers import reporting
from safe_layers.anomaly import record as records
from safe_layers.anomaly.probe import NetProbe, accessors, blob_fault, blob_ok
from safe_layers.reporting import watch_lines
from safe_layers.reporting.watch_lines import Event, SolverFault
from safe_layers.kernels import clip as clip_kernels
from safe_layers.kernels.xp import host_scalar
from safe_layers.core.params import Field

ON_NONFINITE = ("stop", "skip", "warn")

OPTIONS = [
    Field("on_nonfinite", str, "stop", "an iteration with a non-finite loss or param diff: stop "
          "(raise NonFiniteError before the update), skip it (weights, momentum and iter untouched) "
          "or warn (report, let Caffe update)", choices=ON_NONFINITE),
    Field("rollback_after", int, None, "after this many bad iterations in a row (or at once when "
          "the weights go non-finite), restore the last checkpoint", low=1),
    Field("checkpoint_every", int, 100, "rollback: take a checkpoint (solver snapshot) every this "
          "many iterations, when the weights are finite and the training loss (mean of the last "
          "growth_window iterations) is at most checkpoint_loss_ratio times the loss of the run's "
          "first iteration", low=1),
    Field("checkpoint_loss_ratio", float, 1.5, "rollback: a state whose recent loss is above this "
          "many times the loss of the run's first iteration does worse than the net it started "
          "from, and is not checkpointed", low=1.0),
    Field("keep_checkpoints", int, 3, "rollback: checkpoints kept; a rollback whose checkpoint "
          "fails again before a newer one is taken goes one checkpoint further back", low=1),
    Field("lr_factor", float, None, "rollback: multiply base_lr by this at each rollback",
          low=0.0, high=1.0, low_open=True),
    Field("max_rollbacks", int, 5, "rollback: stop after this many", low=1),
    Field("max_skips", int, 100, "skip: stop after this many bad iterations in a row", low=1),
    Field("warn_growth", float, None, "early warning: the gradient L2 norm above this many times "
          "its median over the last growth_window iterations, or the weight norm above this many "
          "times its value growth_window iterations ago", low=1.0, low_open=True),
    Field("growth_window", int, 20, "early warning: iterations the growth is measured over", low=2),
    Field("clip_gradients", float, None, "clip the global L2 norm of the param diffs to this, "
          "NaN/Inf elements zeroed first (Caffe's clip_gradients lets a NaN norm through)",
          low=0.0, low_open=True),
    Field("record_dir", str, None, "on the first fault, write the batch, the weights and the "
          "report here (replay with safe_layers.anomaly.replay)"),
    Field("check_layers", bool, True, "check every layer's outputs (producer localization); "
          "false: only the loss, the param diffs, the weights and the rate"),
    Field("check_test_nets", bool, True, "check the test nets' forward passes too (reported, "
          "never stopped or skipped)"),
    Field("log_first", int, 5, "reports of each kind printed in full before the log switches "
          "to summaries", low=0),
    Field("log_every", int, 100, "after log_first, one summary line every this many", low=1),
]

_OPTION_FIELDS = {f.name: f for f in OPTIONS}


class WatchOptions:
    """Validated watch options (see OPTIONS); a bad one raises ValueError naming the
    option, the value and what is allowed."""

    def __init__(self, **values):
        unknown = sorted(set(values) - set(_OPTION_FIELDS))
        if unknown:
            raise ValueError("watch: unknown option %s; allowed: %s"
                             % (", ".join(repr(k) for k in unknown), ", ".join(_OPTION_FIELDS)))
        for name, field in _OPTION_FIELDS.items():
            value = values.get(name)
            if value is None:
                setattr(self, name, field.default)
                continue
            converted = field.convert(value)
            if converted is None:
                raise ValueError("watch: option %r has value %r; allowed: %s"
                                 % (name, value, field.allowed()))
            setattr(self, name, converted)

    def as_dict(self):
        return {name: getattr(self, name) for name in _OPTION_FIELDS}


class NonFiniteError(FloatingPointError):
    """Raised where the watch stops training; ``report`` is the SolverFault or
    ProducerFault that says why. Raised before the update, so the weights are those
    of before the faulty iteration (except for a 'weights' fault, which is about them)."""

    def __init__(self, report):
        super().__init__(report.line())
        self.report = report


class _Skip(Exception):
    """Control flow: abandon this Solver::Step before its update."""


class _Rollback(Exception):
    """Control flow: abandon this Solver::Step and restore the last checkpoint."""

    def __init__(self, fault):
        super().__init__(fault.line())
        self.fault = fault


def _param_names(net):
    """[(label 'layer[k]', layer index, k, Blob)] of every param blob of ``net``."""
    out = []
    for i, (name, layer) in enumerate(zip(net._layer_names, net.layers)):
        for k in range(len(layer.blobs)):
            out.append(("%s[%d]" % (name, k), i, k, layer.blobs[k]))
    return out


def _sumsq(array):
    """Sum of squares: finite when every element is, NaN/Inf when one is not. One BLAS
    dot in the array's float32; only where that overflows (elements past ~1.8e19) is it
    redone in float64, to tell a large finite blob from a non-finite one."""
    flat = array.reshape(-1)
    if flat.size == 0:
        return 0.0
    with numpy.errstate(over="ignore", invalid="ignore"):
        total = host_scalar(flat.dot(flat))
        if not math.isfinite(total):
            wide = flat.astype("float64")
            total = host_scalar(wide.dot(wide))
    return total


class _Checkpoints:
    """Solver snapshots kept for rollback. Stock pycaffe exposes no other way to save
    and restore the momentum history and ``iter`` (``history_`` is not exposed,
    ``iter`` is read-only): ``solver.snapshot()`` writes ``<snapshot_prefix>_iter_N``
    files and ``solver.restore()`` reads them back exactly.

    Files the watch wrote are deleted once a newer checkpoint replaces them (and at
    :meth:`Watch.close`); a file that was there before the watch started is never
    written over (that iteration is not checkpointed) nor deleted.
    """

    def __init__(self, solver, param, every, started, keep):
        self.solver = solver
        self.prefix = param.snapshot_prefix
        self.h5 = param.snapshot_format == 0  # SolverParameter.HDF5 == 0, BINARYPROTO == 1
        self.every = every
        self.started = started
        self.keep = keep
        self.kept = []              # [(iteration, state path)], oldest first
        self.taken_since_rollback = 0
        self.owned = {}             # iteration -> [(path, mtime)]
        self.warned_existing = False
        self.seconds = 0.0
        self.count = 0

    def paths(self, iteration):
        stem = "%s_iter_%d" % (self.prefix, iteration)
        if self.h5:
            return stem + ".caffemodel.h5", stem + ".solverstate.h5"
        return stem + ".caffemodel", stem + ".solverstate"

    @property
    def latest(self):
        return self.kept[-1] if self.kept else None

    def maybe_save(self, iteration, log):
        if iteration % self.every or (self.latest and self.latest[0] == iteration):
            return
        model, state = self.paths(iteration)
        if os.path.exists(state) and os.path.getmtime(state) < self.started:
            if not self.warned_existing:
                self.warned_existing = True
                log(Event("checkpoint", iteration, "not taken: %s was there before this run and is "
                          "never written over (snapshot_prefix shared with an earlier run?)" % state))
            return
        if not os.path.exists(state):
            start = time.perf_counter()
            self.solver.snapshot()
            self.seconds += time.perf_counter() - start
            self.count += 1
            self.owned[iteration] = [(p, os.path.getmtime(p)) for p in (model, state)
                                     if os.path.exists(p)]
        self.kept.append((iteration, state))
        self.taken_since_rollback += 1
        while len(self.kept) > self.keep:
            self.forget(self.kept.pop(0)[0])
        log(Event("checkpoint", iteration, "rollback point %s" % state,
                  {"state": state, "owned": iteration in self.owned}))

    def target(self, previous):
        """The checkpoint to restore: the latest, unless the last rollback went to
        ``previous`` and failed again before a newer checkpoint was taken; then the one
        before ``previous`` (the oldest kept when there is none). Checkpoints after the
        target belong to the abandoned run and are dropped."""
        if previous is not None and self.taken_since_rollback == 0:
            older = [c for c in self.kept if c[0] < previous]
            chosen = older[-1] if older else self.kept[0]
        else:
            chosen = self.kept[-1]
        while self.kept[-1] != chosen:
            self.forget(self.kept.pop()[0])
        self.taken_since_rollback = 0
        return chosen

    def forget(self, iteration):
        for path, mtime in self.owned.pop(iteration, []):
            try:
                if os.path.getmtime(path) == mtime:  # rewritten since: someone else's now
                    os.remove(path)
            except OSError:
                pass

    def close(self):
        for iteration in list(self.owned):
            self.forget(iteration)


class Watch:
    """A watch attached to a pycaffe solver (and its nets) or to a lone net.

    Use :func:`watch` to make one. Attributes worth reading: ``faults`` (every report,
    oldest first), ``events`` (skips, rollbacks, checkpoints, clips), ``counts`` (per
    kind), ``skipped`` / ``rolled_back`` (iterations), ``loss`` and ``lr`` of the last
    iteration, ``probes`` (one NetProbe per watched net: ``producers`` found).
    """

    def __init__(self, solver=None, net=None, solver_param=None, stream=None, listener=None,
                 phase="TRAIN", **options):
        self.options = o = WatchOptions(**options)
        if (solver is None) == (net is None):
            raise ValueError("watch: give a solver or a net")
        if solver is None and o.on_nonfinite == "skip":
            raise ValueError("watch: on_nonfinite 'skip' needs a solver (a lone net has no update "
                             "to skip); use stop or warn")
        if solver is None and o.rollback_after:
            raise ValueError("watch: rollback_after needs a solver")
        if o.rollback_after and solver_param is None:
            raise ValueError("watch: rollback_after needs the solver's prototxt (solver_file=...): "
                             "rollback restores the solver's own snapshots, named by its "
                             "snapshot_prefix, which pycaffe does not expose")
        if solver_param is not None:
            problem = lr_policy.fatal_problem(solver_param)
            if problem:
                raise ValueError("watch: " + problem)
        if o.rollback_after:
            # Caffe's snapshot CHECK-fails (the process aborts) on a folder it cannot write:
            # the first checkpoint would take the run with it.
            prefix = solver_param.snapshot_prefix
            folder = os.path.dirname(os.path.abspath(prefix))
            if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
                raise ValueError(
                    "watch: rollback_after needs checkpoints under the solver's snapshot_prefix %r, "
                    "and folder %s %s (relative prefixes are read from the working directory, %s, "
                    "as Caffe does): create it, or set snapshot_prefix"
                    % (prefix, folder, "is not writable" if os.path.isdir(folder) else "does not exist",
                       os.getcwd()))
        self.solver = solver
        self.param = solver_param
        self.stream = stream
        self.listener = listener
        self.closed = False
        self.started = time.time()
        self.faults, self.events = [], []
        self.counts = collections.Counter()
        self.skipped, self.rolled_back = [], []
        self.consecutive_bad = 0
        self.rollbacks = 0
        self.loss = None
        self.lr = None
        self.grad_norm = None
        self.weight_norm = None
        self._pending_update = False
        self._recorded = False
        self._lr_zero_warned = False
        self._last_growth = -10 ** 9
        self._grad_norms = collections.deque(maxlen=o.growth_window)
        self._weight_norms = collections.deque(maxlen=o.growth_window + 1)
        self._recent_losses = collections.deque(maxlen=o.growth_window)
        self._start_loss = None        # the loss of the run's first iteration (before any update)
        self._rolled_to = None         # the checkpoint iteration the last rollback restored
        self.net = solver.net if solver is not None else net
        self._data, self._diff = accessors()
        self.params = _param_names(self.net)
        self.iter_size = self._iter_size()
        self.probes = [NetProbe(self.net, "TRAIN" if solver is not None else phase,
                                self._on_producer, self.iteration, o.check_layers)]
        self._hook(self.net, self.probes[0], backward=True)
        if solver is not None:
            if getattr(solver, "_safe_layers_watch", None) is not None:
                raise ValueError("watch: this solver is watched already")
            if o.check_test_nets:
                for test_net in solver.test_nets:
                    probe = NetProbe(test_net, "TEST", self._on_producer, self.iteration, True)
                    self.probes.append(probe)
                    self._hook(test_net, probe, backward=False)
            solver.add_callback(self._on_start, self._on_gradients_ready)
            # The deferred checks of the training net's layers are read here, once per
            # iteration (safe_layers.core.deferred), not at the ends of its passes.
            self.boards = _boards(self.net)
            for board in self.boards:
                board.reader = self
            self.checkpoints = (_Checkpoints(solver, solver_param, o.checkpoint_every, self.started,
                                             o.keep_checkpoints)
                                if o.rollback_after else None)
            self._step, self._solve = solver.step, solver.solve
            solver.step, solver.solve = self.step, self.solve
            solver._safe_layers_watch = self
            self.base_lr = float(solver.param.base_lr)
        else:
            self.checkpoints = None
            self.boards = []
        self.guard_reports = []  # what the last read of the boards found, in execution order
        # A TRAIN producer under on_nonfinite 'stop', held until the next layer that uses its
        # blob: an in-place layer there (a NaNGuard in clamp / zero mode) may repair it.
        self._held = None

    def _read_boards(self):
        """Read the training net's deferred checks (one host read per board that has any):
        their reports are printed by their layers, an abort raises from here, before the
        update; returns the reports, the first flagged layer in execution order first."""
        found = []
        for board in self.boards:
            found.extend(board.read())
        return found

    def _iter_size(self):
        return int(self.param.iter_size) if self.param is not None else 1

    # -- hooks -----------------------------------------------------------------------
    def _hook(self, net, probe, backward):
        def before(pass_):
            def hook(i):
                if not self.closed:
                    solver_iteration.activate(self)
                    if self._held is not None:
                        self._before_held(probe, i, pass_)
            return hook

        def after_forward(i):
            if not self.closed:
                if self._held is not None:
                    self._after_held(probe, i, "forward")
                probe.after_forward(i)

        def after_backward(i):
            if not self.closed:
                if self._held is not None:
                    self._after_held(probe, i, "backward")
                probe.after_backward(i)

        before_forward, before_backward = before("forward"), before("backward")
        net.before_forward(before_forward)
        net.after_forward(after_forward)
        if backward:
            net.before_backward(before_backward)
            net.after_backward(after_backward)

    def iteration(self):
        """The solver's iteration (None for a lone net): what every report names."""
        return int(self.solver.iter) if self.solver is not None else None

    def _on_start(self):
        if self.closed:
            return
        self._drop_held()
        solver_iteration.activate(self)
        self._read_boards()  # left by a net.forward() of the caller's between steps
        iteration = self.iteration()
        if self._pending_update:
            self._check_weights(iteration - 1)
        self._check_lr(iteration)
        if (self.checkpoints is not None and self.consecutive_bad == 0
                and iteration - self._last_growth > self.options.checkpoint_every
                and self._loss_no_worse_than_at_start()):
            # A state the early warning flagged, or one doing worse than its own
            # initialization, is no state to come back to.
            self.checkpoints.maybe_save(iteration, self._log_event)
        for probe in self.probes:
            probe.producers = []
        self.probes[0].pass_losses = []
        self.probes[0].bad_params = {}

    def _on_gradients_ready(self):
        if self.closed:
            return
        self._stop_held()
        self.guard_reports = self._read_boards()
        iteration = self.iteration()
        probe = self.probes[0]
        losses = probe.pass_losses or [numpy.float32("nan")]
        loss = numpy.float32(0)
        for value in losses:
            loss = numpy.float32(loss + value)
        self.loss = float(numpy.float32(loss / numpy.float32(len(losses))))
        o = self.options
        need_norms = (not o.check_layers) or o.warn_growth or o.clip_gradients
        bad = sorted(label for (layer, k), what in probe.bad_params.items() if what == "diff"
                     for label in ["%s[%d]" % (layer, k)])
        norms = None
        if need_norms:
            norms = [(label, _sumsq(self._diff(blob))) for label, _, _, blob in self.params]
            bad = sorted(set(bad) | {label for label, s in norms if not math.isfinite(s)})
        if bad or not math.isfinite(self.loss):
            self._bad_iteration(iteration, bad)
        else:
            self.consecutive_bad = 0
            self._recent_losses.append(self.loss)
            if self._start_loss is None:
                self._start_loss = self.loss
        if norms is not None:
            total = math.sqrt(sum(s for _, s in norms if math.isfinite(s)))
            self.grad_norm = total
            if o.clip_gradients:
                self._clip(iteration, total, bool(bad))
            if o.warn_growth:
                self._check_grad_growth(iteration, total)
        self._pending_update = True

    # -- the checks ------------------------------------------------------------------
    def _check_lr(self, iteration):
        if self.param is not None and self.param.lr_policy == "multistep":
            lr = lr_policy.rate(self.param, iteration)
        else:
            lr = float(self.solver.lr)
        self.lr = lr
        if math.isfinite(lr) and lr > 0:
            return
        if self.param is not None:
            message = lr_policy.describe(self.param, iteration, lr)
        else:
            message = ("lr = %g at iteration %d (give the watch solver_file= to name the lr_policy "
                       "fields that cause it)" % (lr, iteration))
        if lr == 0:
            if not self._lr_zero_warned:
                self._lr_zero_warned = True
                self._fault(SolverFault("lr", "TRAIN", iteration, message + "; the weights will not "
                                        "move", "warn"), "W")
            return
        # No skip or rollback mends a schedule: the same iteration gives the same rate.
        self._stop(SolverFault("lr", "TRAIN", iteration, message, "stop",
                               details={"lr": lr, "lr_policy": self.param.lr_policy
                                        if self.param is not None else None}))

    def _bad_iteration(self, iteration, bad_params):
        self.consecutive_bad += 1
        parts = []
        if not math.isfinite(self.loss):
            parts.append("non-finite loss %s" % _num(self.loss))
        if bad_params:
            shown = ", ".join(bad_params[:8]) + (" ..." if len(bad_params) > 8 else "")
            parts.append("non-finite param diffs (%d blob%s: %s)"
                         % (len(bad_params), "" if len(bad_params) == 1 else "s", shown))
        message = " and ".join(parts)
        producer = next((p for p in self.probes[0].producers), None)
        if producer is not None:
            message += "; first produced by %s %s in %s" % (producer.layer_type, producer.layer,
                                                           producer.pass_)
        elif self.guard_reports:
            first = self.guard_reports[0]
            message += "; first flagged by %s in %s" % (first.where, first.pass_)
        kind = "gradients" if bad_params else "loss"
        o = self.options
        details = {"loss": self.loss, "lr": self.lr}
        if o.on_nonfinite == "stop":
            self._stop(SolverFault(kind, "TRAIN", iteration, message, "stop", bad_params, details))
        if o.rollback_after and self.consecutive_bad >= o.rollback_after:
            fault = SolverFault(kind, "TRAIN", iteration, message + "; %d bad in a row"
                                % self.consecutive_bad, "rollback", bad_params, details)
            self._fault(fault, "E")
            raise _Rollback(fault)
        if o.on_nonfinite == "skip":
            if self.consecutive_bad >= o.max_skips:
                self._stop(SolverFault("stopped", "TRAIN", iteration, "%s; %d bad iterations in a row "
                                       "(max_skips)" % (message, self.consecutive_bad), "stop",
                                       bad_params, details))
            fault = SolverFault(kind, "TRAIN", iteration, message, "skip", bad_params, details)
            self._fault(fault, "W")
            self.skipped.append(iteration)
            self._log_event(Event("skip", iteration, watch_lines.skip_message(len(self.skipped)),
                                  {"loss": self.loss, "params": bad_params}))
            raise _Skip()
        self._fault(SolverFault(kind, "TRAIN", iteration, message + "; Caffe applies this update",
                                "warn", bad_params, details), "W")

    def _check_weights(self, updated_iteration):
        """The weights after the update of ``updated_iteration``."""
        self._pending_update = False
        o = self.options
        bad, total = [], 0.0
        for label, _, _, blob in self.params:
            data = self._data(blob)
            if o.warn_growth:
                s = _sumsq(data)
                if math.isfinite(s):
                    total += s
                else:
                    bad.append((label, data))
            elif not blob_ok(data):
                bad.append((label, data))
        if o.warn_growth and not bad:
            self._check_weight_growth(updated_iteration, math.sqrt(total))
        if not bad:
            return
        label, data = bad[0]
        fault_text = blob_fault(data).text()
        message = ("non-finite param data after the update of iteration %d: %s %s (%d param blobs: "
                   "%s)" % (updated_iteration, label, fault_text, len(bad),
                            ", ".join(b[0] for b in bad[:8]) + (" ..." if len(bad) > 8 else "")))
        params = [b[0] for b in bad]
        if o.rollback_after:
            fault = SolverFault("weights", "TRAIN", updated_iteration, message, "rollback", params)
            self._fault(fault, "E")
            raise _Rollback(fault)
        if o.on_nonfinite == "warn":
            self._fault(SolverFault("weights", "TRAIN", updated_iteration, message, "warn", params), "W")
            return
        self._stop(SolverFault("weights", "TRAIN", updated_iteration, message, "stop", params))

    def _clip(self, iteration, norm, has_nonfinite):
        limit = self.options.clip_gradients
        if has_nonfinite:
            for _, _, _, blob in self.params:
                clip_kernels.zero_nonfinite_(self._diff(blob))
        if norm <= limit:
            return
        scale = limit / (norm + clip_kernels.TINY)
        for _, _, _, blob in self.params:
            self._diff(blob)[...] *= numpy.float32(scale)
        self._log_event(Event("clip", iteration, "param diff L2 norm %s > %s: scaled by %s; %d clipped "
                              "in all" % (_num(norm), _num(limit), _num(scale),
                                          self.counts["clip"] + 1),
                              {"norm": norm, "scale": scale}))

    def _loss_no_worse_than_at_start(self):
        """Whether the mean loss of the last growth_window iterations is at most
        checkpoint_loss_ratio times the loss of the run's first iteration: a net doing
        worse than the one it started from (a softmax blown up by a high base_lr sits at
        5-70 where it started at 2.3) is no state to return to. True before both are known,
        and for a first loss that is not positive."""
        if self._start_loss is None or not self._recent_losses:
            return True
        recent = sum(self._recent_losses) / len(self._recent_losses)
        return self._start_loss <= 0 or recent <= self.options.checkpoint_loss_ratio * self._start_loss

    def _check_grad_growth(self, iteration, norm):
        history = self._grad_norms
        factor = self.options.warn_growth
        if len(history) >= min(5, history.maxlen):
            median = float(numpy.median(history))
            if median > 0 and norm > factor * median:
                self._last_growth = iteration
                self._fault(SolverFault("growth", "TRAIN", iteration,
                                        "gradient L2 norm %s is %.3gx the median %s of the last %d "
                                        "iterations (warn_growth %g)"
                                        % (_num(norm), norm / median, _num(median), len(history),
                                           factor), "warn", details={"grad_norm": norm,
                                                                     "median": median}), "W")
        history.append(norm)

    def _check_weight_growth(self, iteration, norm):
        self.weight_norm = norm
        history = self._weight_norms
        factor = self.options.warn_growth
        if len(history) == history.maxlen and history[0] > 0 and norm > factor * history[0]:
            self._last_growth = iteration
            self._fault(SolverFault("growth", "TRAIN", iteration,
                                    "weight L2 norm %s is %.3gx its value %s %d iterations before "
                                    "(warn_growth %g)" % (_num(norm), norm / history[0],
                                                          _num(history[0]), len(history) - 1, factor),
                                    "warn", details={"weight_norm": norm}), "W")
        history.append(norm)

    # -- reports ---------------------------------------------------------------------
    def _on_producer(self, fault):
        # The watched net's own faults act (a solver's training net, or a lone net in
        # whatever phase); a solver's test nets are reported only.
        train = fault.phase == self.probes[0].phase
        stop = train and self.options.on_nonfinite == "stop"
        self._stop_held()  # never two at once; the first producer is the one to stop on
        if stop and fault.role != "param" and self.solver is not None:
            # Under a solver a pass always runs to its end (Solver::Step), so the layer
            # after the producer is sure to come and settle the hold.
            probe = self.probes[0]
            i, k = fault.layer_index, fault.blob_index
            blob = probe.tops[i][k] if fault.role == "top" else probe.bottoms[i][k]
            if not (i == probe.last if fault.pass_ == "forward" else i == 0):
                self._held = (probe, fault, blob)
                return
        fault.action = "stop" if stop else "report"
        if stop:
            self._stop(fault)
        self._fault(fault, "E" if train else "W")

    @staticmethod
    def _in_place_on(probe, i, blob):
        return blob in probe.tops[i] and blob in probe.bottoms[i]

    def _before_held(self, probe, i, pass_):
        """Before layer ``i`` of a pass: the held producer's blob goes on to it unrepaired
        unless ``i`` works on that blob in place (it may repair it): stop here, before
        layer ``i`` runs."""
        held_probe, fault, blob = self._held
        if held_probe is not probe or fault.pass_ != pass_ or i == fault.layer_index:
            self._stop_held()  # another pass began: whatever held it, it was not repaired
            return
        if not self._in_place_on(probe, i, blob):
            self._stop_held()

    def _after_held(self, probe, i, pass_):
        """After the in-place layer ``i`` that followed the held producer: its blob finite
        now (a NaNGuard in repair mode: what the rest of the net sees is finite, so the
        run the user hardened goes on) or not (stop, before any later layer runs)."""
        held_probe, fault, blob = self._held
        if held_probe is not probe or fault.pass_ != pass_ or i == fault.layer_index:
            return
        array = probe.data(probe.blobs[blob]) if pass_ == "forward" else probe.diff(probe.blobs[blob])
        if self._in_place_on(probe, i, blob) and blob_ok(array):
            self._release_held("report", "repaired in place by %s %s" % (probe.types[i], probe.names[i]))
        else:
            self._stop_held()

    def _drop_held(self):
        """A hold left by a pass that an exception cut short (a strict guard's abort right
        after the producer): reported, never raised later on a clean pass."""
        self._release_held("report", "the pass ended (an exception) before the next layer ran")

    def _stop_held(self):
        """Stop on the held producer, if any (nothing repaired it)."""
        self._release_held("stop")

    def _release_held(self, action, note=None):
        """Let go of the held producer, if any: ``stop`` raises with it, ``report`` logs it
        with ``note`` added to its own."""
        if self._held is None:
            return
        fault = self._held[1]
        self._held = None
        fault.action = action
        if note:
            fault.note = "%s; %s" % (fault.note, note) if fault.note else note
        if action == "stop":
            self._stop(fault)
        self._fault(fault, "W")

    def _fault(self, fault, severity):
        self.faults.append(fault)
        key = fault.kind
        self.counts[key] += 1
        count = self.counts[key]
        o = self.options
        if count <= o.log_first or severity == "E" and fault.action == "stop":
            self._write(severity, fault.line())
        elif (count - o.log_first) % o.log_every == 0:
            self._write(severity, watch_lines.repeat_line(count, key, fault))
        if self.listener:
            self.listener(fault)
        if not self._recorded and self.options.record_dir and fault.kind != "growth":
            self._record(fault)

    def _log_event(self, event):
        self.events.append(event)
        self.counts[event.kind] += 1
        count = self.counts[event.kind]
        o = self.options
        if event.kind in ("rollback", "lr") or count <= o.log_first or \
                (count - o.log_first) % o.log_every == 0:
            self._write("W" if event.kind in ("skip", "rollback", "lr") else "I", event.line())
        if self.listener:
            self.listener(event)

    def _stop(self, fault):
        self.faults.append(fault)
        self.counts[fault.kind] += 1
        self._write("E", fault.line())
        if self.listener:
            self.listener(fault)
        if not self._recorded and self.options.record_dir:
            self._record(fault)
        raise NonFiniteError(fault)

    def _record(self, fault):
        self._recorded = True
        try:
            path = records.write_record(self.options.record_dir, self.iteration(), fault,
                                        self.probes[0].input_arrays(), self.net)
        except Exception as exc:  # noqa: BLE001 - a record never kills a run
            self._write("W", watch_lines.record_failed_line(self.options.record_dir, exc))
            return
        self.record_path = path
        self._write("I", watch_lines.record_line(path))

    def _write(self, severity, text):
        stream = self.stream or sys.stderr
        try:
            stream.write(reporting.glog_prefix(severity) + text + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed stream never hides the exception that follows

    # -- stepping --------------------------------------------------------------------
    def step(self, iters=1, until_rollback=False):
        """``solver.step(iters)`` under the watch: runs until ``iter`` reaches its value
        at the call plus ``iters``; skipped iterations are retried with the next batch; a
        rollback moves ``iter`` back to the checkpoint and training goes on from there
        (``until_rollback``: returns right after it instead, for a caller that accounts
        for every iteration itself)."""
        if self.closed:
            return self._step(iters)
        target = int(self.solver.iter) + int(iters)
        while True:
            try:
                if int(self.solver.iter) >= target:
                    if self._pending_update:
                        self._check_weights(int(self.solver.iter) - 1)
                    return
                self._step(target - int(self.solver.iter))
            except _Skip:
                continue
            except _Rollback as request:
                self._rollback(request.fault)
                if until_rollback:
                    return
            finally:
                solver_iteration.deactivate(self)

    def solve(self, resume_file=None):
        """``solver.solve()`` under the watch (Caffe's Solve: Step to max_iter, then its
        final snapshot, display and test), re-entered after each skip or rollback."""
        if self.closed:
            return self._solve(resume_file) if resume_file else self._solve()
        first = True
        while True:
            try:
                if first and resume_file:
                    self._solve(resume_file)
                else:
                    self._solve()
                first = False
                if self._pending_update:
                    self._check_weights(int(self.solver.iter) - 1)
                return
            except _Skip:
                first = False
            except _Rollback as request:
                first = False
                self._rollback(request.fault)
            finally:
                solver_iteration.deactivate(self)

    def _rollback(self, cause):
        iteration = int(self.solver.iter)
        latest = self.checkpoints.latest if self.checkpoints else None
        if self.rollbacks >= self.options.max_rollbacks or latest is None:
            why = ("%d rollbacks already (max_rollbacks)" % self.rollbacks if latest is not None
                   else "no checkpoint to roll back to yet (one is taken every %d iterations)"
                   % self.options.checkpoint_every)
            self._stop(SolverFault("stopped", "TRAIN", cause.iteration, "%s; %s" % (cause.message, why),
                                   "stop", cause.params))
        further_back = self._rolled_to is not None and self.checkpoints.taken_since_rollback == 0
        previous = self._rolled_to
        latest = self.checkpoints.target(self._rolled_to)
        self._rolled_to = latest[0]
        self.rollbacks += 1
        start = time.perf_counter()
        self.solver.restore(latest[1])
        seconds = time.perf_counter() - start
        self.rolled_back.append(iteration)
        self.consecutive_bad = 0
        self._pending_update = False
        self._grad_norms.clear()
        self._weight_norms.clear()
        self._recent_losses.clear()
        self._last_growth = -10 ** 9  # a warning of the abandoned iterations, not of these
        details = {"to": latest[0], "from": iteration, "state": latest[1], "seconds": seconds}
        base_lr = None
        if self.options.lr_factor:
            old = float(self.solver.param.base_lr)
            self.solver.param.base_lr = old * self.options.lr_factor
            new = float(self.solver.param.base_lr)
            if self.param is not None:
                self.param.base_lr = new
            base_lr = (old, new)
            details.update(base_lr_from=old, base_lr_to=new)
        message = watch_lines.rollback_message(
            latest[1], latest[0], cause.kind, cause.iteration,
            further_back=further_back and latest[0] != previous,
            same_again=further_back and latest[0] == previous, base_lr=base_lr,
            rollbacks=self.rollbacks)
        self._log_event(Event("rollback", latest[0], message, details))

    def close(self):
        """Stop watching: the hooks stay registered (pycaffe cannot remove them) but do
        nothing; ``solver.step`` / ``solve`` are Caffe's again; the watch's own
        checkpoint files are deleted."""
        if self.closed:
            return
        self._drop_held()
        self.closed = True
        solver_iteration.deactivate(self)
        for board in self.boards:
            board.reader = None
        if self.solver is not None:
            del self.solver.step
            del self.solver.solve
            self.solver._safe_layers_watch = None
        if self.checkpoints is not None:
            self.checkpoints.close()

    def summary(self):
        """One line: what the watch saw and did."""
        kinds = ("producer", "lr", "loss", "gradients", "weights", "growth", "stopped")
        return watch_lines.summary_line(len(self.faults), {k: v for k, v in self.counts.items()
                                                      if k in kinds and v},
                                   len(self.skipped), self.rollbacks,
                                   self.checkpoints.count if self.checkpoints else 0,
                                   self.counts["clip"])


def _boards(net):
    """The deferred-check boards (safe_layers.core.deferred) of the layers of ``net``."""
    boards = []
    for layer in net.layers:
        board = getattr(getattr(layer, "fault_log", None), "board", None)
        if board is not None and all(board is not b for b in boards):
            boards.append(board)
    return boards


def _num(value):
    if value is None:
        return "none"
    return "%.6g" % value


def read_solver_param(path):
    """The SolverParameter of ``path`` as Caffe builds it (``snapshot_prefix`` defaulted
    and resolved the way ``ReadSolverParamsFromTextFileOrDie`` does)."""
    from safe_layers.readers.prototxt import read_solver
    param = read_solver(path).message
    resolve_snapshot_prefix(param, path)
    return param


def resolve_snapshot_prefix(param, solver_path):
    """Caffe's ``UpgradeSnapshotPrefixProperty``: no prefix -> the solver file's path
    without extension; a directory -> that directory / the solver file's stem."""
    if not param.HasField("snapshot_prefix"):
        param.snapshot_prefix = os.path.splitext(solver_path)[0]
    elif os.path.isdir(param.snapshot_prefix):
        stem = os.path.splitext(os.path.basename(solver_path))[0]
        param.snapshot_prefix = os.path.join(param.snapshot_prefix, stem)
    return param


def watch(target, solver_file=None, stream=None, phase=None, **options):
    """Attach a watch to ``target``: a pycaffe solver, a ``caffe.Net``, or the path of a
    solver prototxt (the solver is then built with ``caffe.get_solver``; read it back
    as ``watch.solver``). ``solver_file`` (the solver's prototxt) lets the watch name
    the lr_policy fields behind a bad rate and find its snapshots for rollback.
    ``options``: see OPTIONS (on_nonfinite, rollback_after, checkpoint_every, lr_factor,
    max_rollbacks, max_skips, warn_growth, growth_window, clip_gradients, record_dir,
    check_layers, check_test_nets, log_first, log_every). ``phase`` ('TRAIN' / 'TEST'):
    what a lone net's reports say it is; by default the phase our layers in it were built
    in (pycaffe does not expose a net's own), else 'NET'. Returns the :class:`Watch`.
    """
    param = None
    if isinstance(target, (str, os.PathLike)):
        solver_file = os.fspath(target)
        param = read_solver_param(solver_file)
        problem = lr_policy.fatal_problem(param)
        if problem:  # before get_solver: Caffe would abort the process at the first update
            raise ValueError("watch: %s: %s" % (solver_file, problem))
        import caffe
        target = caffe.get_solver(solver_file)
    elif solver_file is not None:
        param = read_solver_param(os.fspath(solver_file))
    if hasattr(target, "add_callback"):
        return Watch(solver=target, solver_param=param, stream=stream, **options)
    if phase not in (None, "TRAIN", "TEST"):
        raise ValueError("watch: phase %r; allowed: 'TRAIN', 'TEST' (a lone net's)" % (phase,))
    if hasattr(target, "after_forward"):
        if phase is None:
            phases = {layer.fault_log.phase for layer in reporting.layers_of(target)}
            phase = phases.pop() if len(phases) == 1 else "NET"
        return Watch(net=target, stream=stream, phase=phase, **options)
    raise TypeError("watch: expected a caffe solver, a caffe.Net or a solver prototxt path, got %r"
                    % (target,))
