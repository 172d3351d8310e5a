"""The solver-level checks of a watch, once per iteration: the learning rate before the
forward, the loss and every param diff before the update (with a NaN-aware clip of the
diffs, optionally) and the params a forward writes (BatchNorm's statistics), every weight
after the update where it could have made one non-finite, and the early warning of
growing norms.

A bad iteration is stopped (NonFiniteError), skipped (:class:`Skip`: the watch abandons
``Solver::Step`` before its update), rolled back (:class:`RollbackRequest`) or only reported,
as the options say. On a pycaffe without ``Solver.add_callback`` the same checks run after
Caffe's ``solver.step(1)``, its update applied: there a bad iteration cannot be skipped
(:meth:`SolverChecks._bad_step`; :mod:`.pycaffe_hooks`).
"""

import collections
import math

import numpy

from safe_layers.anomaly.fused_read import FusedReads, forward_written
from safe_layers.anomaly.liveness import Liveness
from safe_layers.anomaly.probe import accessors, blob_fault
from safe_layers.anomaly.pycaffe_hooks import STEP
from safe_layers.core import backend, lr_policy
from safe_layers.core.float_text import six_digits
from safe_layers.kernels import clip as clip_kernels
from safe_layers.reporting import watch_lines
from safe_layers.reporting.watch_lines import Event, SolverFault


# The weights after an update are read when the update could have made a finite weight
# non-finite, and every WEIGHTS_EVERY iterations besides (a weight set between steps by
# the caller). An update from finite ingredients (rate, diffs, weights, the solver's
# history, built from the same) is non-finite only where a product or a sum overflows
# float32 (3.4e38); below these bounds none can: the update of one iteration is at most
# about lr * lr_mult * (max(|diff|, 1) + decay_mult * weight_decay * |w|) / (1 - momentum)
# (max(|diff|, 1): Adam's, RMSProp's and AdaDelta's steps are about lr whatever the diff),
# an lr_mult of 100, a momentum of 0.999 and a decay_mult of 100 allowed for, and
# WEIGHTS_EVERY of them add up to far less than float32's largest value. |diff| < 1e18
# also keeps diff² (AdaGrad, RMSProp, AdaDelta and Adam's history,
# src/caffe/solvers/*.cpp) finite.
WEIGHTS_EVERY = 100
DIFF_BOUND = 1e18
STEP_BOUND = 1e28
WEIGHT_BOUND = 1e30


class Skip(Exception):
    """Control flow: abandon this Solver::Step before its update."""


class RollbackRequest(Exception):
    """Control flow: abandon this Solver::Step and restore the last checkpoint."""

    def __init__(self, fault):
        super().__init__(fault.line())
        self.fault = fault


def param_blobs(net, diff):
    """[(label 'layer[k]', layer index, k, Blob)] of every param blob of ``net`` that
    Caffe's update sees (its learnable params, Net::AppendParam, src/caffe/net.cpp): a
    blob shared by name (``param { name }``) is one, its first layer's; ``diff``: the blob
    accessor of the mode (shared blobs share their diff)."""
    out, seen = [], set()
    for i, (name, layer) in enumerate(zip(net._layer_names, net.layers)):
        for k in range(len(layer.blobs)):
            blob = layer.blobs[k]
            array = diff(blob)
            where = backend.address(array) if array.size else None  # empty: no memory
            if where is None or where not in seen:
                seen.add(where)
                out.append(("%s[%d]" % (name, k), i, k, blob))
    return out


class Growth:
    """The early warning (warn_growth): the gradient L2 norm against its median over the
    last growth_window iterations, the weight L2 norm against its value growth_window
    iterations before. ``last``: the iteration of the last warning."""

    def __init__(self, options, reports):
        self.factor = options.warn_growth
        self.reports = reports
        self.grad_norms = collections.deque(maxlen=options.growth_window)
        self.weight_norms = collections.deque(maxlen=options.growth_window + 1)
        self.last = -10 ** 9

    def restart(self):
        """After a rollback: the norms start over, and a warning of the abandoned
        iterations is not one of these."""
        self.grad_norms.clear()
        self.weight_norms.clear()
        self.last = -10 ** 9

    def gradients(self, iteration, norm):
        history = self.grad_norms
        factor = self.factor
        if len(history) >= min(5, history.maxlen):
            median = float(numpy.median(history))
            if median > 0 and norm > factor * median:
                self.last = iteration
                self.reports.fault(SolverFault(
                    "growth", "TRAIN", iteration,
                    "gradient L2 norm %s is %.3gx the median %s of the last %d iterations "
                    "(warn_growth %g)" % (six_digits(norm), norm / median, six_digits(median),
                                          len(history), factor),
                    "warn", details={"grad_norm": norm, "median": median}), "W")
        history.append(norm)

    def weights(self, iteration, norm):
        history = self.weight_norms
        factor = self.factor
        if len(history) == history.maxlen and history[0] > 0 and norm > factor * history[0]:
            self.last = iteration
            self.reports.fault(SolverFault(
                "growth", "TRAIN", iteration,
                "weight L2 norm %s is %.3gx its value %s %d iterations before (warn_growth %g)"
                % (six_digits(norm), norm / history[0], six_digits(history[0]),
                   len(history) - 1, factor),
                "warn", details={"weight_norm": norm}), "W")
        history.append(norm)


class SolverChecks:
    """The checks of one watched solver's iterations, and what they last saw: ``loss``,
    ``lr``, ``grad_norm``, ``weight_norm``; ``consecutive_bad`` (bad iterations in a
    row), ``skipped`` (iterations), ``guard_reports`` (the deferred checks' reports of
    the last iteration, the first flagged layer first). ``hooks``: what the pycaffe
    offers (:class:`~.pycaffe_hooks.PycaffeHooks`): whether the probes checked the
    layers, and whether the checks run before the update or after it."""

    def __init__(self, solver, solver_param, net, probe, options, reports, losses, hooks):
        self.solver = solver
        self.param = solver_param
        self.probe = probe        # the training net's: its pass losses, bad params, producers
        self.options = options
        self.reports = reports
        self.losses = losses      # the checkpoint gate's loss history (checkpoints.LossGate)
        self.growth = Growth(options, reports)
        self.data, self.diff = accessors()
        self.params = param_blobs(net, self.diff)
        self.labels = [label for label, _, _, _ in self.params]
        self.reads = FusedReads(probe, self.params, forward_written(net, self.params),
                                self.data, self.diff)
        self.weight_decay = float(solver_param.weight_decay) if solver_param is not None else 0.0
        self.loss = None
        self.lr = None
        self.grad_norm = None
        self.weight_norm = None
        self.consecutive_bad = 0
        self.skipped = []
        self.guard_reports = []
        self.pending_update = False  # gradients checked, the weights after the update not yet
        self.weights_due = True      # that update may have made a weight non-finite: read them
        self.lr_zero_warned = False
        self.probed = hooks.probed             # the layer probes checked this iteration's diffs
        self.after_update = hooks.mode == STEP  # checked after solver.step(1), update applied
        self.read_rate = hooks.solver_lr        # solver.lr exists (pycaffe since 2017-12)
        # The rate computed as Caffe computes it: without solver.lr, and for multistep, where
        # reading solver.lr would move Caffe's step counter (SGDSolver::GetLearningRate,
        # src/caffe/solvers/sgd_solver.cpp: current_step_++).
        self.rate_from_param = solver_param is not None and (
            solver_param.lr_policy == "multistep" or not self.read_rate)
        self.unnamed = hooks.unnamed()          # why a fault names no layer, or None
        self.weight_size = None                 # the weights' norm when last read
        self.written_reported = set()           # forward-written labels reported this iteration
        self.liveness = Liveness(probe, options) if solver is not None else None
        self.on_dead = options.on_dead or ("rollback" if options.rollback_after else "warn")
        # check_layers 'replay': called with a bad iteration before anything is done about
        # it; returns what its report adds where the replay named no producer, or None.
        self.on_fault = None
        self.on_sizes = None  # and with a good iteration's labels and diffs' sums of squares
        self.replay_note = None

    def restart(self):
        """After a rollback: no bad iteration in a row, no update to check, the growth
        and the recent losses measured anew."""
        self.consecutive_bad = 0
        self.pending_update = False
        self.weight_size = None  # read anew before the first bounded update counts on it
        self.growth.restart()
        self.losses.restart()
        if self.liveness is not None:
            self.liveness.restart(int(self.solver.iter))

    def worth_keeping(self, iteration):
        """Whether the state at the start of ``iteration`` may be a checkpoint: a state
        the early warning flagged (within checkpoint_every), one reached through bad
        iterations, or one doing worse than its own initialization is no state to come
        back to."""
        return (self.consecutive_bad == 0
                and iteration - self.growth.last > self.options.checkpoint_every
                and self.losses.no_worse_than_at_start()
                and not (self.liveness is not None and self.liveness.suspect()))

    def settle(self, updated_iteration, force=False):
        """Check the weights after the update of ``updated_iteration``, if not done yet,
        where it is due (see WEIGHTS_EVERY) or ``force`` (a checkpoint is taken of them)."""
        if not self.pending_update:
            return
        if force or self.weights_due or updated_iteration % WEIGHTS_EVERY == 0:
            self.weights(updated_iteration)
        else:
            self.pending_update = False

    def _update_is_bounded(self):
        """Whether the update about to be applied cannot make a finite weight non-finite
        (the bounds above WEIGHTS_EVERY), from the rate, the diffs' norm and the weights'
        norm last read."""
        lr, diff, weights = self.lr, self.grad_norm, self.weight_size
        if lr is None or diff is None or weights is None or not math.isfinite(lr):
            return False
        step = lr * (max(diff, 1.0) + 100 * self.weight_decay * weights) * 1e5
        return diff < DIFF_BOUND and weights < WEIGHT_BOUND and step < STEP_BOUND

    def learning_rate(self, iteration):
        """The rate of ``iteration``: non-finite or negative stops; 0 warns once. Without
        ``solver.lr`` (pycaffe before 2017-12) it is computed from the solver's prototxt,
        as Caffe computes it, and without that too it is not checked (``lr`` None)."""
        if self.rate_from_param:
            lr = lr_policy.rate(self.param, iteration)
        elif self.read_rate:
            lr = float(self.solver.lr)
        else:
            self.lr = None
            return
        self.lr = lr
        if math.isfinite(lr) and lr > 0:
            return
        if self.param is not None:
            message = lr_policy.describe(self.param, iteration, lr)
        else:
            message = ("lr = %g at iteration %d (give the watch solver_file= to name the lr_policy "
                       "fields that cause it)" % (lr, iteration))
        if lr == 0:
            if not self.lr_zero_warned:
                self.lr_zero_warned = True
                self.reports.fault(SolverFault("lr", "TRAIN", iteration, message + "; the weights "
                                               "will not move", "warn"), "W")
            return
        # No skip or rollback mends a schedule: the same iteration gives the same rate.
        self.reports.stop(SolverFault("lr", "TRAIN", iteration, message, "stop",
                                      details={"lr": lr, "lr_policy": self.param.lr_policy
                                               if self.param is not None else None}))

    def gradients(self, iteration, guard_reports, loss_from_tops=False):
        """Before the update: the loss and the param diffs (their norm, the clip and the
        growth warning where an option asks for it). ``loss_from_tops``: no probe summed
        the passes' losses, the loss tops hold the last one; it is read with the diffs'
        norms, in one host read (:mod:`.fused_read`)."""
        self.guard_reports = guard_reports
        probe = self.probe
        o = self.options
        need_norms = not (o.check_layers == "always" and self.probed) or o.warn_growth or o.clip_gradients
        squares = written = None  # sums of squares, in the order of self.params
        if need_norms or loss_from_tops:
            loss, squares, written = self.reads.gradients(loss_from_tops, need_norms)
            if loss_from_tops:
                probe.pass_losses = [loss]
        losses = probe.pass_losses or [numpy.float32("nan")]
        if len(losses) == 1:
            self.loss = float(numpy.float32(losses[0])) + 0.0  # as the sum from 0 below gives it
        else:
            loss = numpy.float32(0)
            for value in losses:
                loss = numpy.float32(loss + value)
            self.loss = float(numpy.float32(loss / numpy.float32(len(losses))))
        bad = []
        if probe.bad_params:
            bad = sorted(label for (layer, k), what in probe.bad_params.items() if what == "diff"
                         for label in ["%s[%d]" % (layer, k)])
        total = None
        if squares is not None:
            total = sum(squares)
            if not math.isfinite(total):
                labels = self.labels
                bad = sorted(set(bad) | {labels[m] for m, s in enumerate(squares)
                                         if not math.isfinite(s)})
                total = sum(s for s in squares if math.isfinite(s))
        # Read in full after this update unless shown harmless below.
        self.weights_due = self.pending_update = True
        faulty = bool(bad) or not math.isfinite(self.loss)
        if faulty:
            self._bad_iteration(iteration, bad)
        else:
            self.consecutive_bad = 0
            self.losses.add(self.loss)
            if self.liveness is not None:
                self._liveness(iteration, squares)
        if total is not None and not self.after_update:  # after it, the diffs hold the update
            norm = self.grad_norm = math.sqrt(total)
            if o.clip_gradients:
                self._clip(iteration, norm, bool(bad))
            if o.warn_growth:
                self.growth.gradients(iteration, norm)
        if written:
            self._written(iteration, written)
        # An update Caffe applies over a fault (on_nonfinite warn) is no bounded one.
        self.weights_due = (faulty or squares is None or self.after_update or bool(o.warn_growth)
                            or not self._update_is_bounded())

    def _written(self, iteration, written):
        """The params this iteration's forward wrote (BatchNorm's statistics; ``written``:
        the sums of squares of their data): a good iteration's loss and diffs say nothing
        of them (a variance that overflowed normalizes to zeros, and the loss stays finite)."""
        if math.isfinite(sum(written)):
            self.written_reported = set()
            return
        bad = [(label, self.data(blob)) for (label, _, _, blob), s in zip(self.reads.written, written)
               if not math.isfinite(s)]
        self.written_reported = {label for label, _ in bad}  # not again by the full read
        self._data_fault(iteration, bad, "after the forward of iteration %d" % iteration)

    def _bad_iteration(self, iteration, bad_params):
        self.replay_note = self.on_fault(iteration) if self.on_fault is not None else None
        self.consecutive_bad += 1
        message = self._bad_message(bad_params)
        kind = "gradients" if bad_params else "loss"
        o = self.options
        details = {"loss": self.loss, "lr": self.lr}
        if self.replay_note:
            details["replay"] = "not reproduced"
        if self.after_update:
            self._bad_step(iteration, kind, message, bad_params, details)
            return
        if o.on_nonfinite == "stop":
            self.reports.stop(SolverFault(kind, "TRAIN", iteration, message, "stop", bad_params,
                                          details))
        if o.rollback_after and self.consecutive_bad >= o.rollback_after:
            fault = SolverFault(kind, "TRAIN", iteration, message + "; %d bad in a row"
                                % self.consecutive_bad, "rollback", bad_params, details)
            self.reports.fault(fault, "E")
            raise RollbackRequest(fault)
        if o.on_nonfinite == "skip":
            if self.consecutive_bad >= o.max_skips:
                why = "%s; %d bad iterations in a row (max_skips)" % (message, self.consecutive_bad)
                self.reports.stop(SolverFault("stopped", "TRAIN", iteration, why, "stop",
                                              bad_params, details))
            fault = SolverFault(kind, "TRAIN", iteration, message, "skip", bad_params, details)
            self.reports.fault(fault, "W")
            self.skipped.append(iteration)
            self.reports.event(Event("skip", iteration, watch_lines.skip_message(len(self.skipped)),
                                     {"loss": self.loss, "params": bad_params}))
            raise Skip()
        self.reports.fault(SolverFault(kind, "TRAIN", iteration, message + "; Caffe applies this "
                                       "update", "warn", bad_params, details), "W")

    def _liveness(self, iteration, squares):
        """The dead-net checks of a good iteration (:mod:`.liveness`), from the magnitudes
        the finite checks read (the probe's, or ``squares``: the sums of squares read
        here), and what ``on_dead`` says to do when the net is found dead."""
        labels = self.labels
        if squares is None and self.probed and self.options.check_layers == "always":
            names = self.probe.names
            found = sorted(self.probe.diff_sizes.items())  # in the net's order, not backward's
            labels = ["%s[%d]" % (names[i], k) for (i, k), _ in found]
            squares = [size * size for _, size in found]
        if self.on_sizes is not None and squares is not None:
            self.on_sizes(iteration, labels, squares)
        # After solver.step(1) the diffs hold the update itself, lr applied.
        lr = 1.0 if self.after_update else self.lr
        state = self.liveness.observe(iteration, self.loss, lr, labels, squares,
                                      self.weight_size)
        if state is None:
            return
        details = dict(state.details(), loss=self.loss, lr=self.lr)
        fault = SolverFault("dead", "TRAIN", iteration, state.message(), self.on_dead,
                            details=details)
        if self.on_dead == "stop":
            self.reports.stop(fault)
        if self.on_dead == "rollback":
            self.reports.fault(fault, "E")
            raise RollbackRequest(fault)
        self.reports.fault(fault, "W")

    def _bad_step(self, iteration, kind, message, bad_params, details):
        """A bad iteration seen after ``solver.step(1)`` applied its update (a pycaffe
        without ``Solver.add_callback``): nothing is left to skip. 'skip' rolls back to the
        last checkpoint at once (with rollback_after; without it, it stops), 'stop' stops,
        'warn' reports, and rolls back after rollback_after bad steps in a row."""
        o = self.options
        message += ("; the update of iteration %d is applied (no Solver.add_callback: checked "
                    "after solver.step(1))" % iteration)
        if o.on_nonfinite == "skip" and not o.rollback_after:
            message += "; skip cannot undo it, and rollback_after is not set"
        if o.on_nonfinite == "stop" or (o.on_nonfinite == "skip" and not o.rollback_after):
            self.reports.stop(SolverFault(kind, "TRAIN", iteration, message, "stop", bad_params,
                                          details))
        if o.on_nonfinite == "skip" or (o.rollback_after
                                        and self.consecutive_bad >= o.rollback_after):
            if o.on_nonfinite != "skip":
                message += "; %d bad in a row" % self.consecutive_bad
            fault = SolverFault(kind, "TRAIN", iteration, message, "rollback", bad_params, details)
            self.reports.fault(fault, "E")
            raise RollbackRequest(fault)
        self.reports.fault(SolverFault(kind, "TRAIN", iteration, message, "warn", bad_params,
                                       details), "W")

    def _bad_message(self, bad_params):
        """What was non-finite, and the layer that produced or flagged it first."""
        parts = []
        if not math.isfinite(self.loss):
            parts.append("non-finite loss %s" % six_digits(self.loss))
        if bad_params:
            shown = ", ".join(bad_params[:8]) + (" ..." if len(bad_params) > 8 else "")
            parts.append("non-finite param diffs (%d blob%s: %s)"
                         % (len(bad_params), "" if len(bad_params) == 1 else "s", shown))
        message = " and ".join(parts)
        producer = next((p for p in self.probe.producers), None)
        if producer is not None:
            message += "; first produced by %s %s in %s" % (producer.layer_type, producer.layer,
                                                           producer.pass_)
        elif self.guard_reports:
            first = self.guard_reports[0]
            message += "; first flagged by %s in %s" % (first.where, first.pass_)
        elif self.replay_note:
            message += "; " + self.replay_note
        elif self.unnamed:
            message += "; " + self.unnamed
        return message

    def weights(self, updated_iteration):
        """The weights after the update of ``updated_iteration``."""
        self.pending_update = False
        o = self.options
        squares = self.reads.weights()
        total = sum(squares)
        bad = []
        if not math.isfinite(total):
            bad = [(label, self.data(blob)) for (label, _, _, blob), s in zip(self.params, squares)
                   if not math.isfinite(s) and label not in self.written_reported]
            total = sum(s for s in squares if math.isfinite(s))
        self.written_reported = set()
        if not bad:
            self.weight_size = math.sqrt(total)
        if o.warn_growth and not bad:
            self.weight_norm = math.sqrt(total)
            self.growth.weights(updated_iteration, self.weight_norm)
        if bad:
            self._data_fault(updated_iteration, bad,
                             "after the update of iteration %d" % updated_iteration)

    def _data_fault(self, iteration, bad, when):
        """Non-finite param data, [(label, data)] ``bad``: rolled back (rollback_after),
        reported (on_nonfinite warn) or stopped; a skip cannot mend it."""
        o = self.options
        label, data = bad[0]
        fault_text = blob_fault(data).text()
        message = ("non-finite param data %s: %s %s (%d param blobs: %s)"
                   % (when, label, fault_text, len(bad),
                      ", ".join(b[0] for b in bad[:8]) + (" ..." if len(bad) > 8 else "")))
        params = [b[0] for b in bad]
        if o.rollback_after:
            fault = SolverFault("weights", "TRAIN", iteration, message, "rollback", params)
            self.reports.fault(fault, "E")
            raise RollbackRequest(fault)
        if o.on_nonfinite == "warn":
            self.reports.fault(SolverFault("weights", "TRAIN", iteration, message, "warn",
                                           params), "W")
            return
        self.reports.stop(SolverFault("weights", "TRAIN", iteration, message, "stop", params))

    def _clip(self, iteration, norm, has_nonfinite):
        limit = self.options.clip_gradients
        if has_nonfinite:
            for _, _, _, blob in self.params:
                clip_kernels.zero_nonfinite_(self.diff(blob))
        if norm <= limit:
            return
        scale = limit / (norm + clip_kernels.TINY)
        for _, _, _, blob in self.params:
            self.diff(blob)[...] *= numpy.float32(scale)
        self.reports.event(Event("clip", iteration, "param diff L2 norm %s > %s: scaled by %s; %d "
                                 "clipped in all" % (six_digits(norm), six_digits(limit),
                                                     six_digits(scale),
                                                     self.reports.counts["clip"] + 1),
                                 {"norm": norm, "scale": scale}))
