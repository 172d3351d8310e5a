"""Rollback: the solver states a watch takes as checkpoints, which it keeps, and going
back to one (``rollback_after``).

A checkpoint is a solver snapshot. Stock pycaffe exposes no other way to save and
restore the momentum history and ``iter`` (``history_`` is not exposed, ``iter`` is
read-only): ``solver.snapshot()`` writes ``<snapshot_prefix>_iter_N`` files and
``solver.restore()`` reads them back exactly.
"""

import collections
import os
import time

from safe_layers.reporting import watch_lines
from safe_layers.reporting.watch_lines import Event, SolverFault


def check_snapshot_folder(solver_param):
    """ValueError unless the folder of the solver's snapshot_prefix is writable: Caffe's
    snapshot CHECK-fails (the process aborts) on a folder it cannot write, and the first
    checkpoint would take the run with it."""
    prefix = solver_param.snapshot_prefix
    folder = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(
            "watch: rollback_after needs checkpoints under the solver's snapshot_prefix %r, "
            "and folder %s %s (relative prefixes are read from the working directory, %s, "
            "as Caffe does): create it, or set snapshot_prefix"
            % (prefix, folder, "is not writable" if os.path.isdir(folder) else "does not exist",
               os.getcwd()))


class Checkpoints:
    """The solver snapshots kept for rollback, oldest first (``kept``).

    Files the watch wrote are deleted once a newer checkpoint replaces them (and at
    :meth:`close`); a file that was there before the watch started is never written
    over (that iteration is not checkpointed) nor deleted.
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


class LossGate:
    """The training loss a checkpoint is judged by: the loss of the run's first (good)
    iteration, and the losses of the last growth_window good ones."""

    def __init__(self, window, ratio):
        self.recent = collections.deque(maxlen=window)
        self.ratio = ratio
        self.start = None   # the loss of the run's first iteration (before any update)

    def add(self, loss):
        self.recent.append(loss)
        if self.start is None:
            self.start = loss

    def restart(self):
        self.recent.clear()

    def no_worse_than_at_start(self):
        """Whether the mean loss of the last growth_window iterations is at most
        checkpoint_loss_ratio times the loss of the run's first iteration: a net doing
        worse than the one it started from (a softmax blown up by a high base_lr sits at
        5-70 where it started at 2.3) is no state to return to. True before both are known,
        and for a first loss that is not positive."""
        if self.start is None or not self.recent:
            return True
        recent = sum(self.recent) / len(self.recent)
        return self.start <= 0 or recent <= self.ratio * self.start


class Rollback:
    """Going back to a checkpoint: ``checkpoints`` (None without rollback_after),
    ``count`` (rollbacks so far), ``rolled_back`` (the iterations they left)."""

    def __init__(self, solver, solver_param, options, reports, checkpoints):
        self.solver = solver
        self.param = solver_param
        self.options = options
        self.reports = reports
        self.checkpoints = checkpoints
        self.count = 0
        self.rolled_back = []
        self.rolled_to = None       # the checkpoint iteration the last rollback restored

    def go_back(self, cause, restart):
        """Restore a checkpoint for ``cause`` (the fault that asked for it), then call
        ``restart()`` (the checks start over), then apply lr_factor; stop
        (NonFiniteError) when there is no checkpoint yet or max_rollbacks is reached."""
        iteration = int(self.solver.iter)
        checkpoints = self.checkpoints
        latest = checkpoints.latest if checkpoints else None
        if self.count >= self.options.max_rollbacks or latest is None:
            why = ("%d rollbacks already (max_rollbacks)" % self.count if latest is not None
                   else "no checkpoint to roll back to yet (one is taken every %d iterations)"
                   % self.options.checkpoint_every)
            self.reports.stop(SolverFault("stopped", "TRAIN", cause.iteration, "%s; %s"
                                          % (cause.message, why), "stop", cause.params))
        further_back = self.rolled_to is not None and checkpoints.taken_since_rollback == 0
        previous = self.rolled_to
        latest = checkpoints.target(self.rolled_to)
        self.rolled_to = latest[0]
        self.count += 1
        start = time.perf_counter()
        self.solver.restore(latest[1])
        seconds = time.perf_counter() - start
        self.rolled_back.append(iteration)
        restart()
        details = {"to": latest[0], "from": iteration, "state": latest[1], "seconds": seconds}
        base_lr = self._lower_base_lr()
        if base_lr is not None:
            details.update(base_lr_from=base_lr[0], base_lr_to=base_lr[1])
        message = watch_lines.rollback_message(
            latest[1], latest[0], cause.kind, cause.iteration,
            further_back=further_back and latest[0] != previous,
            same_again=further_back and latest[0] == previous, base_lr=base_lr,
            rollbacks=self.count)
        self.reports.event(Event("rollback", latest[0], message, details))

    def _lower_base_lr(self):
        """base_lr times lr_factor, if set (in the solver and in the watch's copy of its
        parameters); returns (old, new) or None."""
        if not self.options.lr_factor:
            return None
        old = float(self.solver.param.base_lr)
        self.solver.param.base_lr = old * self.options.lr_factor
        new = float(self.solver.param.base_lr)
        if self.param is not None:
            self.param.base_lr = new
        return old, new
