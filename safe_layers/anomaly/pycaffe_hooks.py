"""What the pycaffe under a watch offers it, and what the watch does without it.

The watch's full checks rest on pycaffe's hooks. Forks older than them lack them, and
the watch then runs reduced, saying once, when it attaches, what is missing and what that
costs (:meth:`PycaffeHooks.notice`, a ``WATCH reduced`` warning):

* ``Net.before_forward`` ... ``after_backward`` (python/caffe/_caffe.cpp:446-449; BVLC
  commit e21b420, November 2016, in Caffe 1.0) run the per-layer probes, which name the
  *producer* of a fault. Without them (mode ``solver``) the watch still checks, through
  ``Solver.add_callback``, the rate before each iteration, the loss (read from the loss
  tops after the pass: with ``iter_size`` > 1, the last pass's) and every param diff
  before the update, every weight after it, and skip works as ever; a fault names no
  layer (unless a NaNGuard flagged one) and the test nets go unchecked.
* ``Solver.add_callback`` (_caffe.cpp:494; commit dec2381, September 2015) is the only
  door between the backward and the update (src/caffe/solver.cpp:264-267). Without it
  (mode ``step``) the watch runs Caffe's ``solver.step(1)`` one iteration at a time and
  checks the loss, the param diffs (the update Caffe applied) and the weights after each
  step: a bad update is applied before it is seen, so nothing can be skipped.
  ``on_nonfinite`` 'skip' becomes a rollback to the last checkpoint at the first bad step
  (``rollback_after`` gives the checkpoints; without it a bad step stops, as 'stop'
  does); 'stop' stops after the step, the report saying the update was applied;
  ``clip_gradients``, which acts before the update, is refused. The param diffs read
  after the step hold Caffe's update (rate and momentum applied), not the gradient: no
  gradient-growth warning there (``grad_norm`` None; the weight norm's still warns), and
  a rollback leaves from the iteration after the bad step (``rolled_back``).

Two more pycaffe fields came late: ``Solver.lr`` and a settable ``solver.param.base_lr``
(commit cfcf74f, December 2017: not in Caffe 1.0). Without ``Solver.lr`` the rate is
computed from the solver's prototxt (``solver_file=``), as Caffe computes it, or not
checked; without ``solver.param.base_lr`` an ``lr_factor`` given is refused (its default
is not applied, and the notice says so). What the watch
cannot work without at all (the net's structure, from 2015) is refused with a ValueError
naming it, never met as an AttributeError in the middle of a run.
"""

LAYER_HOOKS = ("before_forward", "after_forward", "before_backward", "after_backward")

# What the watch reads a net's layers, blobs and loss weights through (pycaffe since
# August 2015: _caffe.cpp's Net "_top_ids", "_bottom_ids", "_blob_loss_weights").
NET_STRUCTURE = ("layers", "_layer_names", "_blob_names", "_blobs", "_top_ids", "_bottom_ids",
                 "_blob_loss_weights")

FULL, SOLVER, STEP = "full", "solver", "step"


class PycaffeHooks:
    """The hooks of one watched solver (or lone net) and the mode they allow: ``mode``
    'full' (every hook: as the watch always was), 'solver' (no layer hooks) or 'step'
    (no ``Solver.add_callback``); ``probed``: the per-layer probes run (mode 'full');
    ``solver_lr`` / ``base_lr``: ``solver.lr`` and ``solver.param.base_lr`` exist."""

    def __init__(self, solver, net):
        self.missing_layer_hooks = [name for name in LAYER_HOOKS if not hasattr(net, name)]
        self.missing_structure = [name for name in NET_STRUCTURE if not hasattr(net, name)]
        self.lone_net = solver is None
        self.callbacks = solver is None or hasattr(solver, "add_callback")
        if not self.callbacks:
            self.mode = STEP
        elif self.missing_layer_hooks:
            self.mode = SOLVER
        else:
            self.mode = FULL
        self.probed = self.mode == FULL
        self.solver_lr = solver is not None and hasattr(solver, "lr")
        self.base_lr = solver is not None and hasattr(getattr(solver, "param", None), "base_lr")
        self.checkpoints = solver is not None and all(hasattr(solver, name)
                                                      for name in ("snapshot", "restore"))

    def missing(self):
        """The pycaffe names the watch looked for and did not find."""
        names = ["Net.%s" % name for name in self.missing_layer_hooks]
        if not self.callbacks:
            names.append("Solver.add_callback")
        if not self.lone_net and not self.solver_lr:
            names.append("Solver.lr")
        return names

    def refusal(self, options):
        """Why a watch with ``options`` cannot work on this pycaffe (the ValueError's
        text), or None."""
        if self.missing_structure:
            return ("watch: this pycaffe's Net has no %s (pycaffe before August 2015): the watch "
                    "reads the net's layers, blobs and loss weights through them"
                    % ", ".join(self.missing_structure))
        if self.lone_net:
            if self.missing_layer_hooks:
                return ("watch: this pycaffe has no Net.%s (pycaffe before 2017): a lone net has "
                        "nothing to watch it through; a solver can be watched, reduced"
                        % "/".join(self.missing_layer_hooks))
            return None
        if self.mode == STEP and options.clip_gradients:
            return ("watch: clip_gradients needs Solver.add_callback, which this pycaffe lacks: "
                    "the clip acts between the backward and the update")
        if "lr_factor" in options.given and options.lr_factor != 1 and not self.base_lr:
            return ("watch: lr_factor lowers base_lr through solver.param.base_lr, which this "
                    "pycaffe lacks (pycaffe before December 2017): leave lr_factor unset")
        if options.rollback_after and not self.checkpoints:
            return ("watch: rollback_after restores the solver's snapshots through Solver.snapshot "
                    "and Solver.restore, which this pycaffe lacks")
        return None

    def notice(self, options, solver_param):
        """The one line that says what this pycaffe lacks and what that costs the watch,
        or None when it lacks nothing the watch uses."""
        parts = []
        if self.mode == SOLVER:
            parts.append("this pycaffe has no Net.%s: no producer localisation (a fault names no "
                         "layer) and the test nets go unchecked; the rate, the loss and every "
                         "param diff are checked before each update, every weight after it, "
                         "and skip works" % "/".join(self.missing_layer_hooks))
        elif self.mode == STEP:
            parts.append("this pycaffe has no Solver.add_callback%s: no producer localisation and "
                         "no skip: the watch runs solver.step(1) at a time and checks the loss, "
                         "the param diffs and the weights after each step, once Caffe has "
                         "applied its update; %s"
                         % (" (nor Net.%s)" % "/".join(self.missing_layer_hooks)
                            if self.missing_layer_hooks else "", self._bad_step(options)))
        if options.rollback_after and not self.base_lr:
            parts.append("this pycaffe has no solver.param.base_lr: a rollback keeps base_lr "
                         "(lr_factor %g not applied)" % options.lr_factor)
        if not self.lone_net and not self.solver_lr and solver_param is None:
            parts.append("this pycaffe has no Solver.lr: the learning rate is not checked "
                         "(give the watch solver_file= to compute it from lr_policy)")
        return "; ".join(parts) or None

    @staticmethod
    def _bad_step(options):
        """What a bad step does in mode 'step', under ``options``."""
        if options.on_nonfinite == "skip":
            if options.rollback_after:
                return ("on_nonfinite skip becomes rollback: a bad step is undone by restoring the "
                        "last checkpoint")
            return ("on_nonfinite skip becomes stop: a bad step stops after its update, since "
                    "rollback_after is not set (with it, the last checkpoint undoes the step)")
        if options.on_nonfinite == "stop":
            return "on_nonfinite stop stops after the bad step, its update applied"
        return "on_nonfinite warn reports the bad step after its update"

    def unnamed(self):
        """Why a fault of this watch names no layer, or None where the probes can name one."""
        if self.probed:
            return None
        if self.missing_layer_hooks:
            return "no producer named: this pycaffe has no Net.%s" % "/".join(
                self.missing_layer_hooks)
        return "no producer named: without Solver.add_callback the watch runs no layer probes"
