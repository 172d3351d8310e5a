"""Anomaly mode for Caffe: a watch on a pycaffe solver (or net) through the stock hooks.

    solver = caffe.get_solver("solver.prototxt")
    w = safe_layers.watch(solver, solver_file="solver.prototxt", on_nonfinite="skip",
                          rollback_after=5, record_dir="faults/")
    solver.step(1000)          # the watch's step: skips and rollbacks happen inside

What it checks, without a prototxt edit, through pycaffe's hooks (``Net.before_forward``
... ``after_backward``, python/caffe/_caffe.cpp:446-449, run around each layer by
src/caffe/net.cpp:523-582; ``Solver.add_callback``, _caffe.cpp:504, run by
src/caffe/solver.cpp:223 and :264, just before ``ApplyUpdate`` at :267):

* every layer's tops after its forward and its bottoms' and params' diffs after its
  backward (``Net.after_forward`` / ``after_backward``), naming the *producer*
  (:mod:`.probe`, :mod:`.producers`);
* each iteration (``Solver.add_callback``): the learning rate before the forward, the
  loss and every param diff before the update, every weight after it; optionally the
  growth of the weight and gradient norms, and a NaN-aware clip of the param diffs
  (:mod:`.checks`).

What stock pycaffe allows a skip to be (measured, tests/anomaly/test_watch.py): an exception
raised from ``on_gradients_ready`` abandons ``Solver::Step`` before ``ApplyUpdate``,
so the weights, the momentum history, the lr schedule's step counter and ``iter`` are
all left exactly as they were (bit for bit). Zeroing the diffs instead would still
apply momentum and weight decay, and ``apply_update()`` always advances ``iter``.
The watch therefore replaces ``solver.step`` and ``solver.solve`` on the instance with
loops that catch its own exception and step on; ``iter`` counts updates, as in Caffe.
A rollback restores a checkpoint (:mod:`.checkpoints`); what the watch prints, and where
it stops, is :mod:`.reports`.

On an older pycaffe, without the layer hooks or without ``Solver.add_callback``, the watch
runs reduced and says so once (:mod:`.pycaffe_hooks`): without the layer hooks the
solver-level checks run as ever, with no producer named; without ``add_callback`` as well
its ``step`` runs Caffe's ``solver.step(1)`` one iteration at a time and checks each after
its update (:meth:`Watch._step_once`), a bad one undone by a rollback, never skipped.
"""

import os
import time

from safe_layers import reporting
from safe_layers.anomaly.checkpoints import Checkpoints, LossGate, Rollback, check_snapshot_folder
from safe_layers.anomaly import replay_fault
from safe_layers.anomaly.checks import RollbackRequest, Skip, SolverChecks
from safe_layers.anomaly.options import WatchOptions
from safe_layers.anomaly.probe import NetProbe
from safe_layers.anomaly.producers import Producers
from safe_layers.anomaly.pycaffe_hooks import STEP, PycaffeHooks
from safe_layers.anomaly.reports import Reports
from safe_layers.core import lr_policy, solver_iteration
from safe_layers.readers import prototxt
from safe_layers.readers.prototxt import read_solver_param
from safe_layers.reporting import watch_lines
from safe_layers.reporting.watch_lines import Event


def _delegate(collaborator, name, settable=False):
    """A Watch attribute kept by one of its collaborators (``collaborator``.``name``)."""
    def get(self):
        return getattr(getattr(self, collaborator), name)

    def set_(self, value):
        setattr(getattr(self, collaborator), name, value)
    return property(get, set_ if settable else None,
                    doc="%s's %s" % (collaborator, name))


class Watch:
    """A watch attached to a pycaffe solver (and its nets) or to a lone net.

    Use :func:`watch` to make one. Attributes worth reading: ``faults`` (every report,
    oldest first), ``events`` (skips, rollbacks, checkpoints, clips), ``counts`` (per
    kind), ``skipped`` / ``rolled_back`` (iterations), ``loss`` and ``lr`` of the last
    iteration, ``probes`` (one NetProbe per watched net: ``producers`` found), ``hooks``
    (what the pycaffe offers: :class:`~.pycaffe_hooks.PycaffeHooks`, its ``mode``).
    """

    stream = _delegate("reports", "stream", settable=True)
    listener = _delegate("reports", "listener", settable=True)
    faults = _delegate("reports", "faults")
    events = _delegate("reports", "events")
    counts = _delegate("reports", "counts")
    record_path = _delegate("reports", "record_path")
    loss = _delegate("checks", "loss")
    lr = _delegate("checks", "lr")
    grad_norm = _delegate("checks", "grad_norm")
    weight_norm = _delegate("checks", "weight_norm")
    consecutive_bad = _delegate("checks", "consecutive_bad")
    skipped = _delegate("checks", "skipped")
    guard_reports = _delegate("checks", "guard_reports")
    params = _delegate("checks", "params")
    checkpoints = _delegate("rollback", "checkpoints")
    rollbacks = _delegate("rollback", "count")
    rolled_back = _delegate("rollback", "rolled_back")

    def __init__(self, solver=None, net=None, solver_param=None, stream=None, listener=None,
                 phase="TRAIN", resumed_from=None, **options):
        self.options = o = WatchOptions(**options)
        _check_arguments(solver, net, solver_param, o)
        if solver is not None and getattr(solver, "_safe_layers_watch", None) is not None:
            raise ValueError("watch: this solver is watched already")
        self.solver = solver
        self.param = solver_param
        self.closed = False
        self.started = time.time()
        self.net = solver.net if solver is not None else net
        self.hooks = hooks = PycaffeHooks(solver, self.net)
        problem = hooks.refusal(o)
        if problem:
            raise ValueError(problem)
        self.stepped = None  # the iteration whose update a step-by-step watch checks
        self.iter_size = int(solver_param.iter_size) if solver_param is not None else 1
        train = NetProbe(self.net, "TRAIN" if solver is not None else phase, self._on_producer,
                         self.iteration, o.check_layers != "off")
        train.track_zeros = solver is not None  # the dead-layer check (.liveness)
        self.probes = [train]
        self.reports = Reports(o, stream, listener, self.iteration, train, self._net_name,
                               "solver" if solver is not None else "net")
        self.producers = Producers(train, o, self.reports, under_solver=solver is not None)
        self.checks = SolverChecks(solver, solver_param, self.net, train, o, self.reports,
                                   LossGate(o.growth_window, o.checkpoint_loss_ratio), hooks)
        self.replay = replay_fault.attach(self, o) if solver is not None and hooks.probed else None
        # No probe sums the passes' losses: the loss tops hold the last, read with the diffs.
        self.loss_from_tops = not hooks.probed or (self.replay is not None and not self.replay.keep)
        # Before any hook: a prefix another watch holds refuses this one here.
        checkpoints = (Checkpoints(solver, solver_param, o.checkpoint_every, self.started,
                                   o.keep_checkpoints, self.reports.event, resumed_from)
                       if solver is not None and o.rollback_after else None)
        self.rollback = Rollback(solver, solver_param, o, self.reports, checkpoints)
        self.boards = []
        try:
            if hooks.probed and self.replay is None:
                self._hook(self.net, train, backward=True)
            elif self.replay is not None and self.replay.keep:
                self.net.after_forward(lambda i: self.closed or self.replay.after_forward(i))
            if solver is not None:
                self._attach(solver)
        except BaseException:
            self.closed = True  # hooks already registered stay, doing nothing
            if checkpoints is not None:
                checkpoints.close()
            raise
        self.reports.open()
        notice = hooks.notice(o, solver_param)
        if notice:
            self.reports.event(Event("reduced", self.iteration(), notice,
                                     {"warning": True, "mode": hooks.mode,
                                      "missing": hooks.missing()}))

    def _attach(self, solver):
        """Hook the test nets, the solver's callbacks and its step and solve (as far as
        this pycaffe has them)."""
        if self.options.check_test_nets and self.hooks.probed:
            for test_net in solver.test_nets:
                probe = NetProbe(test_net, "TEST", self._on_producer, self.iteration, True)
                self.probes.append(probe)
                self._hook(test_net, probe, backward=False)
        if self.hooks.callbacks:
            solver.add_callback(self._on_start, self._on_gradients_ready)
        # The deferred checks of the training net's layers are read here, once per
        # iteration (safe_layers.core.deferred), not at the ends of its passes.
        self.boards = _boards(self.net)
        for board in self.boards:
            board.reader = self
        self._step, self._solve = solver.step, solver.solve
        solver.step, solver.solve = self.step, self.solve
        solver._safe_layers_watch = self
        self.base_lr = (float(solver.param.base_lr) if self.hooks.base_lr else
                        float(self.param.base_lr) if self.param is not None else None)

    def _read_boards(self):
        """Read the training net's deferred checks (one host read per board that has any):
        their reports are printed by their layers, an abort raises from here, before the
        update; returns the reports, the first flagged layer in execution order first."""
        found = []
        for board in self.boards:
            found.extend(board.read())
        return found

    # -- hooks -----------------------------------------------------------------------
    def _hook(self, net, probe, backward):
        producers = self.producers
        reports = self.reports

        def before(pass_):
            def hook(i):
                if not self.closed:
                    if i == 0:
                        reports.running()
                    solver_iteration.activate(self)
                    if producers.held is not None:
                        producers.before_layer(probe, i, pass_)
            return hook

        def after_forward(i):
            if not self.closed:
                if producers.held is not None:
                    producers.after_layer(probe, i, "forward")
                probe.after_forward(i)

        def after_backward(i):
            if not self.closed:
                if producers.held is not None:
                    producers.after_layer(probe, i, "backward")
                probe.after_backward(i)

        before_forward, before_backward = before("forward"), before("backward")
        net.before_forward(before_forward)
        net.after_forward(after_forward)
        if backward:
            net.before_backward(before_backward)
            net.after_backward(after_backward)

    def _on_producer(self, fault):
        self.producers.found(fault)

    def iteration(self):
        """The solver's iteration (None for a lone net): what every report names; while a
        step-by-step watch checks a step, the iteration of that step."""
        if self.solver is None:
            return None
        return self.stepped if self.stepped is not None else int(self.solver.iter)

    def _net_name(self):
        """The name in the solver's net prototxt, or None: what the watch's lines are
        tagged with where another watch runs beside it."""
        net_param = self.train_net_param()
        return net_param.name or None if net_param is not None else None

    def train_net_param(self):
        """The training net's NetParameter as the solver names it, or None (no solver
        prototxt, or one that does not read)."""
        param = self.param
        if param is None:
            return None
        for field in ("net_param", "train_net_param"):
            if param.HasField(field):
                return getattr(param, field)
        for field in ("net", "train_net"):
            if param.HasField(field):
                try:
                    return prototxt.read_net(getattr(param, field)).message
                except Exception:  # noqa: BLE001 - what it gives is a nicety (a name, a hint)
                    return None
        return None

    def _on_start(self):
        if self.closed:
            return
        self.producers.drop_held()
        self.reports.running()
        solver_iteration.activate(self)
        self._read_boards()  # left by a net.forward() of the caller's between steps
        iteration = self.iteration()
        checkpoints = self.rollback.checkpoints
        # A checkpoint is of weights read and found finite.
        self.checks.settle(iteration - 1, force=checkpoints is not None and checkpoints.due(iteration))
        self.checks.learning_rate(iteration)
        if checkpoints is not None and self.checks.worth_keeping(iteration):
            checkpoints.maybe_save(iteration)
        for probe in self.probes:
            probe.producers = []
        train = self.probes[0]
        train.pass_losses = []
        train.bad_params = {}
        train.diff_sizes = {}
        train.zero_producers = None
        if self.replay is not None:
            self.replay.start()

    def _on_gradients_ready(self):
        if self.closed:
            return
        self.producers.stop_held()
        guard_reports = self._read_boards()
        if not self.loss_from_tops and self.replay is not None:
            self.probes[0].pass_losses = self.replay.losses()
        self.checks.gradients(self.iteration(), guard_reports, loss_from_tops=self.loss_from_tops)

    def forward_loss(self):
        """The loss of the training net's last forward."""
        probe = self.probes[0]
        return probe.read_loss() if self.loss_from_tops else probe.loss

    # -- stepping --------------------------------------------------------------------
    def step(self, iters=1, until_rollback=False, check_weights=False):
        """``solver.step(iters)`` under the watch: runs until ``iter`` reaches its value
        at the call plus ``iters``; skipped iterations are retried with the next batch; a
        rollback moves ``iter`` back to the checkpoint and training goes on from there
        (``until_rollback``: returns right after it instead, for a caller that accounts
        for every iteration itself). ``check_weights``: every weight is read before it
        returns (the caller snapshots them next), not only where an update was suspect."""
        if self.closed:
            return self._step(iters)
        target = int(self.solver.iter) + int(iters)
        while True:
            try:
                if int(self.solver.iter) >= target:
                    self.checks.settle(int(self.solver.iter) - 1, force=check_weights)
                    return
                if self.hooks.mode == STEP:
                    self._step_once()
                else:
                    self._step(target - int(self.solver.iter))
            except Skip:
                continue
            except RollbackRequest as request:
                self._roll_back(request.fault)
                if until_rollback:
                    return
            finally:
                solver_iteration.deactivate(self)

    def _step_once(self):
        """One iteration on a pycaffe without ``Solver.add_callback``: the checks of its
        start (the rate, a checkpoint), Caffe's ``solver.step(1)``, then those of before
        and after its update (the loss, the param diffs, the weights), which it has
        applied already."""
        iteration = int(self.solver.iter)
        self._on_start()
        self._step(1)
        self.stepped = iteration
        try:
            self._on_gradients_ready()
            self.checks.settle(iteration)
        finally:
            self.stepped = None

    def solve(self, resume_file=None):
        """``solver.solve()`` under the watch (Caffe's Solve: Step to max_iter, then its
        final snapshot, display and test), re-entered after each skip or rollback."""
        if self.closed:
            return self._solve(resume_file) if resume_file else self._solve()
        if self.hooks.mode == STEP:
            return self._solve_by_steps(resume_file)
        first = True
        while True:
            try:
                if first and resume_file:
                    self._solve(resume_file)
                else:
                    self._solve()
                first = False
                self.checks.settle(int(self.solver.iter) - 1)
                return
            except Skip:
                first = False
            except RollbackRequest as request:
                first = False
                self._roll_back(request.fault)
            finally:
                solver_iteration.deactivate(self)

    def _solve_by_steps(self, resume_file):
        """``solve()`` without ``Solver.add_callback``: Caffe's Solve is Step(max_iter -
        iter) and then its final snapshot, display and test (src/caffe/solver.cpp:
        Solver::Solve), so the watch steps to max_iter itself, checked step by step, and
        then lets Caffe's Solve do the rest (its Step has nothing left to do)."""
        if self.param is None:
            raise ValueError("watch: solve() on this pycaffe (no Solver.add_callback) steps to "
                             "the solver's max_iter itself: give the watch solver_file=")
        if resume_file:
            self.solver.restore(resume_file)
        self.step(max(0, int(self.param.max_iter) - int(self.solver.iter)))
        self._solve()

    def _roll_back(self, cause):
        self.rollback.go_back(cause, self.checks.restart)

    def close(self):
        """Stop watching: the hooks stay registered (pycaffe cannot remove them) but do
        nothing; ``solver.step`` / ``solve`` are Caffe's again; the watch's own
        checkpoint files are deleted and its snapshot_prefix is free again."""
        if self.closed:
            return
        self.producers.drop_held()
        self.closed = True
        self.reports.close()
        solver_iteration.deactivate(self)
        for board in self.boards:
            board.reader = None
        if self.solver is not None:
            del self.solver.step
            del self.solver.solve
            self.solver._safe_layers_watch = None
        if self.rollback.checkpoints is not None:
            self.rollback.checkpoints.close()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        """``with watch(solver) as w:`` closes the watch at the end of the block, an
        exception's too (which goes on up)."""
        self.close()
        return False

    def summary(self):
        """One line: what the watch saw and did."""
        kinds = ("producer", "lr", "loss", "gradients", "weights", "growth", "dead", "stopped")
        counts = self.counts
        checkpoints = self.rollback.checkpoints
        dead = self.dead
        return watch_lines.summary_line(len(self.faults), {k: v for k, v in counts.items()
                                                           if k in kinds and v},
                                        len(self.skipped), self.rollbacks,
                                        checkpoints.count if checkpoints else 0, counts["clip"],
                                        dead.since if dead is not None else None)

    @property
    def dead(self):
        """The :class:`~.liveness.DeadState` of the net as it is now (found dead and not
        learning again since), or None."""
        liveness = self.checks.liveness
        return liveness.state if liveness is not None else None


def _check_arguments(solver, net, solver_param, options):
    """ValueError where a watch of ``solver`` or ``net`` with ``options`` cannot work."""
    if (solver is None) == (net is None):
        raise ValueError("watch: give a solver or a net")
    if solver is None and options.on_nonfinite == "skip":
        raise ValueError("watch: on_nonfinite 'skip' needs a solver (a lone net has no update "
                         "to skip); use stop or warn")
    if solver is None and options.rollback_after:
        raise ValueError("watch: rollback_after needs a solver")
    if options.rollback_after and solver_param is None:
        raise ValueError("watch: rollback_after needs the solver's prototxt (solver_file=...): "
                         "rollback restores the solver's own snapshots, named by its "
                         "snapshot_prefix, which pycaffe does not expose")
    if solver_param is not None:
        problem = lr_policy.fatal_problem(solver_param)
        if problem:
            raise ValueError("watch: " + problem)
    if options.on_dead == "rollback" and not options.rollback_after:
        raise ValueError("watch: on_dead 'rollback' needs rollback_after (the checkpoints it "
                         "rolls back to are taken only then)")
    if options.rollback_after:
        check_snapshot_folder(solver_param)


def _boards(net):
    """The deferred-check boards (safe_layers.core.deferred) of the layers of ``net``."""
    boards = []
    for layer in net.layers:
        board = getattr(getattr(layer, "fault_log", None), "board", None)
        if board is not None and all(board is not b for b in boards):
            boards.append(board)
    return boards


def watch(target, solver_file=None, stream=None, phase=None, **options):
    """Attach a watch to ``target``: a pycaffe solver, a ``caffe.Net``, or the path of a
    solver prototxt (the solver is then built with ``caffe.get_solver``; read it back
    as ``watch.solver``). ``solver_file`` (the solver's prototxt) lets the watch name
    the lr_policy fields behind a bad rate and find its snapshots for rollback.
    ``options``: see OPTIONS (on_nonfinite, rollback_after, checkpoint_every, lr_factor,
    max_rollbacks, max_skips, warn_growth, growth_window, clip_gradients, record_dir,
    check_layers, check_test_nets, log_first, log_every). ``resumed_from``: the
    ``.solverstate`` a solver was restored from, its first rollback point (by default
    ``<snapshot_prefix>_iter_<iter>``, when it holds the solver's weights). With
    ``rollback_after`` the watch holds the snapshot_prefix until :meth:`Watch.close`: a
    second watch of it is refused (ValueError). ``phase`` ('TRAIN' / 'TEST'):
    what a lone net's reports say it is; by default the phase our layers in it were built
    in (pycaffe does not expose a net's own), else 'NET'. Returns the :class:`Watch`, a
    context manager too: ``with watch(solver) as w:`` closes it at the block's end.
    """
    param = None
    if isinstance(target, (str, os.PathLike)):
        solver_file = os.fspath(target)
        param = read_solver_param(solver_file)
        problem = lr_policy.fatal_problem(param)
        if problem:  # before get_solver: Caffe would abort the process at the first update
            raise ValueError("watch: %s: %s" % (solver_file, problem))
        import caffe  # deferred: pycaffe is heavy, and a caller may pass a built solver
        target = caffe.get_solver(solver_file)
    elif solver_file is not None:
        param = read_solver_param(os.fspath(solver_file))
    # Not by the hooks alone: an older pycaffe's solver has no add_callback, its net no
    # after_forward (the watch then runs reduced, or refuses a lone net, saying why).
    if hasattr(target, "add_callback") or (hasattr(target, "step") and hasattr(target, "net")):
        return Watch(solver=target, solver_param=param, stream=stream, **options)
    if phase not in (None, "TRAIN", "TEST"):
        raise ValueError("watch: phase %r; allowed: 'TRAIN', 'TEST' (a lone net's)" % (phase,))
    if hasattr(target, "after_forward") or hasattr(target, "_layer_names"):
        if phase is None:
            phases = {layer.fault_log.phase for layer in reporting.layers_of(target)}
            phase = phases.pop() if len(phases) == 1 else "NET"
        return Watch(net=target, stream=stream, phase=phase, **options)
    raise TypeError("watch: expected a caffe solver, a caffe.Net or a solver prototxt path, got %r"
                    % (target,))
