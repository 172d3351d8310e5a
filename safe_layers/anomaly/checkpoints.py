"""Rollback: the solver states a watch takes as checkpoints, which it keeps, and going
back to one (``rollback_after``).

A checkpoint is a solver snapshot. Stock pycaffe exposes no other way to save and
restore the momentum history and ``iter`` (``history_`` is not exposed, ``iter`` is
read-only): ``solver.snapshot()`` writes ``<snapshot_prefix>_iter_N`` files and
``solver.restore()`` reads them back exactly. Only states this run took and can still
vouch for are restored: each checkpoint's files are digested when it is taken and checked
again before a restore; one watch at a time holds a prefix (:mod:`.checkpoint_files`).
"""

import collections
import errno
import os
import time

from safe_layers.anomaly import checkpoint_files as files
from safe_layers.reporting import watch_lines
from safe_layers.reporting.watch_lines import Event, SolverFault


def snapshot_space(solver, param, last_size=None):
    """Bytes a solver snapshot takes, with room to spare: the last one's size, or before
    the first the net's weights and the solver's history (two blobs per weight for Adam
    and AdaDelta) in float32. Caffe's snapshot aborts the process on a write that fails
    (io.cpp: CHECK of the serialized write), so room is looked for before it is written."""
    size = last_size
    if size is None:
        weights = 4 * sum(blob.count for blobs in solver.net.params.values() for blob in blobs)
        histories = 2 if (param.type in ("Adam", "AdaDelta")
                          or getattr(param, "solver_type", 0) in (4, 5)) else 1
        size = weights * (1 + histories) + (64 << 10)
    return size + size // 8 + files.SPACE_SLACK


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


class Checkpoint:
    """One rollback point: ``iteration``, its ``model`` and ``state`` files and their
    ``digests`` ({path: Digest}) when it was taken; ``owned``: the watch wrote it (and
    deletes it when it is dropped); ``resumed``: the state the run resumed from."""

    def __init__(self, iteration, model, state, digests, owned, resumed=False):
        self.iteration, self.model, self.state = iteration, model, state
        self.digests, self.owned, self.resumed = digests, owned, resumed

    def changed(self):
        """(path, how) of the first of its files that no longer holds the bytes it was
        taken with, or None."""
        for path in (self.model, self.state):
            how = files.change(path, self.digests[path])
            if how is not None:
                return path, how
        return None

    def __repr__(self):
        return "Checkpoint(%d, %r)" % (self.iteration, self.state)


def _digests(*paths):
    return {path: files.digest(path) for path in paths}


class Checkpoints:
    """The solver snapshots kept for rollback, oldest first (``kept``: Checkpoint).

    While it lives it holds the snapshot_prefix (:class:`~.checkpoint_files.PrefixClaim`;
    ValueError when another watch does) and removes what a killed watch of it left. Files
    the watch wrote are deleted once a newer checkpoint replaces them (and at
    :meth:`close`); a file that was there before the watch started is never written over
    (that iteration is not checkpointed) nor deleted. The state the solver was resumed
    from (``resumed_from``, else ``<prefix>_iter_<iter>`` when it holds the solver's
    weights) is the first checkpoint. ``log``: where its events go.
    """

    def __init__(self, solver, param, every, started, keep, log, resumed_from=None):
        self.solver = solver
        self.param = param
        self.prefix = param.snapshot_prefix
        self.h5 = param.snapshot_format == 0  # SolverParameter.HDF5 == 0, BINARYPROTO == 1
        self.every = every
        self.started = started
        self.keep = keep
        self.log = log
        self.kept = []
        self.taken_since_rollback = 0
        self.warned_existing = False
        self.failing = False        # the last checkpoint failed (said once until one is taken)
        self.last_size = None       # bytes of the last checkpoint taken
        self.seconds = 0.0
        self.count = 0
        self.claim = files.PrefixClaim(self.prefix)
        try:
            self._start(int(solver.iter), resumed_from)
        except BaseException:
            self.claim.release()
            raise

    def _start(self, iteration, resumed_from):
        if self.claim.fd is None:
            self._warn(iteration, "snapshot_prefix %s: its file system has no locks (flock); "
                       "another watch of it would not be told" % self.prefix)
        self._remove_leftovers(iteration)
        resumed = self._resumed(iteration, resumed_from)
        if resumed is not None:
            self.kept.append(resumed)
            self.taken_since_rollback = 1
            self.log(Event("checkpoint", iteration, "rollback point %s (the state this run resumed "
                           "from: never deleted)" % resumed.state,
                           {"state": resumed.state, "owned": False, "resumed": True}))

    def paths(self, iteration):
        stem = "%s_iter_%d" % (self.prefix, iteration)
        if self.h5:
            return stem + ".caffemodel.h5", stem + ".solverstate.h5"
        return stem + ".caffemodel", stem + ".solverstate"

    @property
    def latest(self):
        return self.kept[-1] if self.kept else None

    def _warn(self, iteration, message, **details):
        """A warning event (always printed)."""
        self.log(Event("checkpoint", iteration, message, dict(details, warning=True)))

    # -- start ------------------------------------------------------------------------
    def _remove_leftovers(self, iteration):
        pid, paths = self.claim.leftovers()
        for path in paths:
            files.remove_quietly(path)
        self._record()
        if paths:
            self._warn(iteration, "removed %d checkpoint file%s that the watch of process %s left "
                       "under this snapshot_prefix when it ended without closing (killed?): %s"
                       % (len(paths), "" if len(paths) == 1 else "s", pid if pid else "?",
                          ", ".join(paths)), removed=paths)

    def _resumed(self, iteration, resumed_from):
        """The Checkpoint of the state the solver was restored from, or None."""
        if resumed_from is None:
            if iteration == 0:
                return None
            state = self.paths(iteration)[1]
            if not os.path.exists(state):
                return None
        else:
            state = os.fspath(resumed_from)
        model = files.learned_net(state)
        problem = None
        if model is None:
            problem = "names no model"
        elif not os.path.exists(model):
            problem = "names model %s, which does not exist" % model
        else:
            problem = (files.incomplete(state, "state") or files.incomplete(model, "model")
                       or files.state_problem(state, model, self.solver))
        if problem is None:
            try:
                return Checkpoint(iteration, model, state, _digests(model, state), owned=False,
                                  resumed=True)
            except OSError as exc:
                problem = "cannot be read (%s)" % exc.strerror
        self._warn(iteration, "not a rollback point: %s %s; the first checkpoint is taken at "
                   "iteration %d" % (state, problem, iteration + (-iteration) % self.every),
                   state=state)
        return None

    # -- taking -----------------------------------------------------------------------
    def due(self, iteration):
        """Whether a checkpoint of the state at the start of ``iteration`` is to be taken."""
        return not (iteration % self.every or (self.latest and self.latest.iteration == iteration))

    def maybe_save(self, iteration):
        """Take (or adopt) the checkpoint of ``iteration`` when one is due."""
        if not self.due(iteration):
            return
        model, state = self.paths(iteration)
        if os.path.lexists(model) or os.path.lexists(state):
            checkpoint = self._adopt(iteration, model, state)
        else:
            checkpoint = self._take(iteration, model, state)
        if checkpoint is None:
            return
        self.failing = False
        self.kept.append(checkpoint)
        self.taken_since_rollback += 1
        while len(self.kept) > self.keep:
            self._drop(self.kept.pop(0))
        self._record()
        self.log(Event("checkpoint", iteration, "rollback point %s" % state,
                       {"state": state, "owned": checkpoint.owned}))

    def _adopt(self, iteration, model, state):
        """The snapshot of ``iteration`` written during this run by someone else (the
        training loop's own snapshot of this very state), as a checkpoint not ours; None
        for one that was there before the run (said once), or that holds another state."""
        if not (os.path.exists(state) and os.path.getmtime(state) >= self.started
                and os.path.exists(model)):
            if not self.warned_existing:
                self.warned_existing = True
                there = state if os.path.lexists(state) else model
                self.log(Event("checkpoint", iteration, "not taken: %s was there before this run and "
                               "is never written over (snapshot_prefix shared with an earlier run?)"
                               % there))
            return None
        problem = (files.incomplete(model, "model") or files.incomplete(state, "state")
                   or files.state_problem(state, model, self.solver))
        if problem is not None:
            return self._failed(iteration, state, None, "written during this run, not by this "
                                "watch, and it %s (another run on this snapshot_prefix?)" % problem)
        try:
            return Checkpoint(iteration, model, state, _digests(model, state), owned=False)
        except OSError as exc:
            return self._failed(iteration, exc.filename or state, exc.errno, exc.strerror)

    def _space_needed(self):
        return snapshot_space(self.solver, self.param, self.last_size)

    def _take(self, iteration, model, state):
        """Snapshot the solver as the checkpoint of ``iteration``; None (said once) where it
        would not fit, or did not come out whole (its files are then removed)."""
        folder = os.path.dirname(os.path.abspath(state))
        need = self._space_needed()
        try:
            free = files.free_bytes(folder)
        except OSError:
            free = None
        if free is not None and free < need:
            return self._failed(iteration, state, errno.ENOSPC, "%s has %d bytes free and a "
                                "checkpoint takes about %d (Caffe would abort the process on "
                                "the failed write)" % (folder, free, need))
        try:
            self._record(pending=(model, state))
        except OSError as exc:
            return self._failed(iteration, exc.filename or self.claim.manifest_path, exc.errno,
                                exc.strerror)
        start = time.perf_counter()
        try:
            self.solver.snapshot()
        except Exception as exc:  # noqa: BLE001 - a checkpoint never kills a run
            return self._discard(iteration, model, state, getattr(exc, "errno", None), str(exc))
        self.seconds += time.perf_counter() - start
        layers = len(self.solver.net.layers)
        for path, kind in ((model, "model"), (state, "state")):
            problem = files.incomplete(path, kind, layers if kind == "model" else None)
            if problem is not None:
                return self._discard(iteration, model, state, None, "%s %s" % (path, problem))
        try:
            digests = _digests(model, state)
        except OSError as exc:
            return self._discard(iteration, model, state, exc.errno, exc.strerror)
        self.count += 1
        self.last_size = sum(d.size for d in digests.values())
        return Checkpoint(iteration, model, state, digests, owned=True)

    def _discard(self, iteration, model, state, number, reason):
        """A snapshot that did not come out whole: its files go, the run goes on."""
        for path in (model, state):
            files.remove_quietly(path)
        try:
            self._record()
        except OSError:
            pass
        return self._failed(iteration, state, number, reason + "; its files removed")

    def _failed(self, iteration, path, number, reason):
        """Say (once until a checkpoint is taken again) that ``iteration``'s was not."""
        if not self.failing:
            self.failing = True
            self._warn(iteration, "not taken: %s: %s%s; training goes on without this "
                       "rollback point" % (path, reason, " (%s)" % files.errno_name(number)
                                           if number else ""),
                       state=path, errno=number)
        return None

    def _record(self, pending=()):
        """The manifest: the files of the checkpoints this watch wrote and keeps."""
        owned = {path: d for c in self.kept if c.owned for path, d in c.digests.items()}
        try:
            self.claim.record(owned, pending)
        except OSError:
            if pending:
                raise

    # -- going back -------------------------------------------------------------------
    def target(self, previous, before=None):
        """The checkpoint to restore: the latest (from before iteration ``before``, when
        given: those of a net already dead are dropped), unless the last rollback went to
        ``previous`` and failed again before a newer checkpoint was taken; then the one
        before ``previous`` (the oldest kept when there is none). Checkpoints after the
        target belong to the abandoned run and are dropped; one whose files changed or
        went since it was taken is dropped with a warning, and the one before it is taken
        instead. None when none is left."""
        while before is not None and self.kept and self.kept[-1].iteration >= before:
            self._drop(self.kept.pop())
        if not self.kept:
            self._record()
            return None
        if previous is not None and self.taken_since_rollback == 0:
            older = [c for c in self.kept if c.iteration < previous]
            chosen = older[-1] if older else self.kept[0]
        else:
            chosen = self.kept[-1]
        while self.kept[-1] is not chosen:
            self._drop(self.kept.pop())
        self.taken_since_rollback = 0
        while self.kept:
            chosen = self.kept[-1]
            changed = chosen.changed()
            if changed is None:
                break
            self._drop(self.kept.pop())
            self._warn(chosen.iteration, "not restored: %s %s since this run took it as a "
                       "checkpoint; %s" % (changed[0], changed[1], "one checkpoint further back"
                                           if self.kept else "no other is kept"),
                       state=chosen.state, changed=changed[0])
        self._record()
        return self.kept[-1] if self.kept else None

    def _drop(self, checkpoint):
        """Forget ``checkpoint``; delete its files if the watch wrote them and no one has
        written them since."""
        if checkpoint.owned and self.claim.ours:
            for path, taken in checkpoint.digests.items():
                if files.same_write(path, taken):
                    files.remove_quietly(path)

    def close(self):
        for checkpoint in self.kept:
            self._drop(checkpoint)
        self.kept = []
        self.claim.release()


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
        (NonFiniteError) when there is no checkpoint yet, none left whose files are as
        they were taken, or max_rollbacks is reached."""
        iteration = int(self.solver.iter)
        checkpoints = self.checkpoints
        latest = checkpoints.latest if checkpoints else None
        if self.count >= self.options.max_rollbacks or latest is None:
            why = ("%d rollbacks already (max_rollbacks)" % self.count if latest is not None
                   else "no checkpoint to roll back to yet (one is taken every %d iterations)"
                   % self.options.checkpoint_every)
            self._stop(cause, why)
        further_back = self.rolled_to is not None and checkpoints.taken_since_rollback == 0
        previous = self.rolled_to
        # A net found dead: only a checkpoint from before it died is one to return to.
        before = cause.details.get("since") if cause.kind == "dead" else None
        if before is not None and not any(c.iteration < before for c in checkpoints.kept):
            before = cause.details.get("evidence_since", before)  # else before the evidence
        if before is not None and not any(c.iteration < before for c in checkpoints.kept):
            self._stop(cause, "no checkpoint from before iteration %d, when the net died"
                       % before)
        chosen = checkpoints.target(self.rolled_to, before)
        if chosen is None:
            self._stop(cause, "no checkpoint to roll back to: the files of those kept were changed "
                       "or removed since they were taken")
        self.rolled_to = chosen.iteration
        self.count += 1
        start = time.perf_counter()
        self.solver.restore(chosen.state)
        seconds = time.perf_counter() - start
        self.rolled_back.append(iteration)
        restart()
        details = {"to": chosen.iteration, "from": iteration, "state": chosen.state,
                   "seconds": seconds}
        base_lr = self._lower_base_lr()
        if base_lr is not None:
            details.update(base_lr_from=base_lr[0], base_lr_to=base_lr[1])
        message = watch_lines.rollback_message(
            chosen.state, chosen.iteration, cause.kind, cause.iteration,
            further_back=further_back and chosen.iteration != previous,
            same_again=further_back and chosen.iteration == previous, base_lr=base_lr,
            rollbacks=self.count)
        self.reports.event(Event("rollback", chosen.iteration, message, details))

    def _stop(self, cause, why):
        self.reports.stop(SolverFault("stopped", "TRAIN", cause.iteration, "%s; %s"
                                      % (cause.message, why), "stop", cause.params))

    def _lower_base_lr(self):
        """base_lr times lr_factor, if set (in the solver and in the watch's copy of its
        parameters); returns (old, new) or None."""
        if self.options.lr_factor in (None, 1) or not hasattr(getattr(self.solver, "param", None),
                                                               "base_lr"):
            return None  # a pycaffe before December 2017 has no solver.param.base_lr
        old = float(self.solver.param.base_lr)
        self.solver.param.base_lr = old * self.options.lr_factor
        new = float(self.solver.param.base_lr)
        if self.param is not None:
            self.param.base_lr = new
        return old, new
