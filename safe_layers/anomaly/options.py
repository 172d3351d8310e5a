"""The watch's options: one list (OPTIONS) for the library, `safe-layers train`'s flags and
the README's table, and :class:`WatchOptions`, the validated set of one watch."""

from safe_layers.core.params import Field

ON_NONFINITE = ("stop", "skip", "warn")
ON_DEAD = ("warn", "stop", "rollback")
CHECK_LAYERS = ("replay", "always", "off")
# The booleans check_layers once was: true checked every layer on every iteration.
_CHECK_LAYERS_BOOLEANS = {True: "always", False: "off"}

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
    Field("lr_factor", float, 0.1, "rollback: multiply base_lr by this at each rollback (1: "
          "keep it)", low=0.0, high=1.0, low_open=True),
    Field("max_rollbacks", int, 5, "rollback: stop after this many", low=1),
    Field("max_skips", int, 100, "skip: stop after this many bad iterations in a row", low=1),
    Field("on_dead", str, None, "a net that stopped learning (a dead layer, vanished gradients, "
          "the loss flat at chance): warn, stop (raise NonFiniteError), or rollback to a "
          "checkpoint from before it died, lr_factor applied; default: rollback with "
          "rollback_after, else warn", choices=ON_DEAD),
    Field("dead_after", int, 20, "dead: iterations in a row a layer's top must be all zeros, or "
          "the update negligible, before the net is called dead", low=1),
    Field("dead_update_ratio", float, 1e-9, "dead: an update (lr times the param diffs' norm) "
          "below this times the weights' norm is negligible (vanished gradients, while the loss "
          "is above half the chance level, or of the first loss)", low=0.0),
    Field("chance_band", float, 0.05, "dead: a training loss (mean of the last growth_window "
          "iterations) within this fraction of the chance level of its softmax losses "
          "(ln C each) is at chance", low=0.0, high=1.0, low_open=True, high_open=True),
    Field("chance_after", int, 100, "dead: iterations in a row at chance, after having been "
          "below it, before the net is called dead; 5 times as many when it never left it",
          low=1),
    Field("warn_growth", float, None, "early warning: the gradient L2 norm above this many times "
          "its median over the last growth_window iterations, or the weight norm above this many "
          "times its value growth_window iterations ago", low=1.0, low_open=True),
    Field("growth_window", int, 20, "early warning: iterations the growth is measured over", low=2),
    Field("clip_gradients", float, None, "clip the global L2 norm of the param diffs to this, "
          "NaN/Inf elements zeroed first (Caffe's clip_gradients lets a NaN norm through)",
          low=0.0, low_open=True),
    Field("record_dir", str, None, "on the first fault, write the batch, the weights and the "
          "report here (replay with safe_layers.anomaly.replay)"),
    Field("check_layers", str, "replay", "replay: per iteration only the solver-level checks "
          "(the loss, the param diffs, the weights, the rate); on a fault, the iteration is "
          "replayed before its update with every layer checked, to name its producer; always: "
          "every layer's outputs checked on every iteration (for nets whose faults do not "
          "replay: Dropout, random or stateful data layers); off: solver-level checks only "
          "(true and false mean always and off)", choices=CHECK_LAYERS),
    Field("check_test_nets", bool, True, "check the test nets' forward passes too (reported, "
          "never stopped or skipped)"),
    Field("log_first", int, 5, "reports of each kind printed in full before the log switches "
          "to summaries", low=0),
    Field("log_every", int, 100, "after log_first, one summary line every this many", low=1),
]

_OPTION_FIELDS = {f.name: f for f in OPTIONS}

# Options that act only beside another: {option: (whether the others let it act, what it
# needs)}. Given where the others do not let it act, it would change nothing in the run.
_ROLLBACK = (lambda o: o.rollback_after, "rollback_after (it tunes the rollback, and its "
             "checkpoints are taken only with it)")
REQUIRES = {
    "checkpoint_every": _ROLLBACK,
    "checkpoint_loss_ratio": _ROLLBACK,
    "keep_checkpoints": _ROLLBACK,
    "lr_factor": _ROLLBACK,
    "max_rollbacks": _ROLLBACK,
    "max_skips": (lambda o: o.on_nonfinite == "skip",
                  "on_nonfinite: skip (it bounds the skips, and only skip skips)"),
}
# growth_window is not there: the loss-at-chance check (always on) measures over it too.


class WatchOptions:
    """Validated watch options (see OPTIONS); a bad one raises ValueError naming the
    option, the value and what is allowed."""

    def __init__(self, **values):
        unknown = sorted(set(values) - set(_OPTION_FIELDS))
        if unknown:
            raise ValueError("watch: unknown option %s; allowed: %s"
                             % (", ".join(repr(k) for k in unknown), ", ".join(_OPTION_FIELDS)))
        # The options the caller set (not None): a default that a pycaffe cannot honour is
        # dropped with a notice, an option set by hand is refused.
        self.given = {name for name, value in values.items() if value is not None}
        for name, field in _OPTION_FIELDS.items():
            value = values.get(name)
            if name == "check_layers" and isinstance(value, bool):
                value = _CHECK_LAYERS_BOOLEANS[value]
            if value is None:
                setattr(self, name, field.default)
                continue
            converted = field.convert(value)
            if converted is None:
                raise ValueError("watch: option %r has value %r; allowed: %s"
                                 % (name, value, field.allowed()))
            setattr(self, name, converted)
        _check_pairs({name: value for name, value in values.items() if value is not None}, self)

    def as_dict(self):
        return {name: getattr(self, name) for name in _OPTION_FIELDS}


def _check_pairs(given, options):
    """ValueError for an option that would silently do nothing beside the others
    (``given``: the options the caller set; ``options``: all of them, defaults filled)."""
    if options.rollback_after and options.on_nonfinite == "stop" and options.on_dead != "rollback":
        raise ValueError(
            "watch: rollback_after %d never rolls back with on_nonfinite: stop (the default): the "
            "first non-finite loss or gradient stops the run before %d bad iterations in a row "
            "can come; set on_nonfinite: skip (skip bad iterations, roll back after %d in a row; "
            "safe-layers train: --on-nonfinite skip) or on_nonfinite: warn (report, let Caffe "
            "update, roll back after %d in a row); on_dead: rollback to roll back dead nets only"
            % ((options.rollback_after,) * 4))
    for name, (acts, needed) in REQUIRES.items():
        if name in given and not acts(options):
            raise ValueError("watch: %s %s does nothing without %s: set that too, or leave %s "
                             "out" % (name, given[name], needed, name))
