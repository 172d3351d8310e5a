"""Watch options that would silently do nothing are refused, naming the fix; the watch as
a context manager leaves the solver unwatched after its block, an exception's too."""

import pytest

from safe_layers.anomaly import NonFiniteError, watch
from support.nets import DIVERGING_NET

# Each option given without the one it acts beside: (options, what the error must name).
ALONE = [
    ({"rollback_after": 3}, "set on_nonfinite: skip"),
    ({"rollback_after": 3, "on_nonfinite": "stop"}, "set on_nonfinite: skip"),
    ({"checkpoint_every": 10}, "without rollback_after"),
    ({"checkpoint_loss_ratio": 2.0, "on_nonfinite": "skip"}, "without rollback_after"),
    ({"keep_checkpoints": 2}, "without rollback_after"),
    ({"lr_factor": 0.1, "on_nonfinite": "skip"}, "without rollback_after"),
    ({"max_rollbacks": 2}, "without rollback_after"),
    ({"max_skips": 5}, "without on_nonfinite: skip"),
    ({"max_skips": 5, "on_nonfinite": "warn", "rollback_after": 2}, "without on_nonfinite: skip"),
]

# The same options beside what they act with: accepted.
TOGETHER = [
    {"on_nonfinite": "skip", "rollback_after": 3, "checkpoint_every": 10, "checkpoint_loss_ratio": 2.0,
     "keep_checkpoints": 2, "lr_factor": 0.1, "max_rollbacks": 2, "max_skips": 5},
    {"on_nonfinite": "warn", "rollback_after": 2},
    {"rollback_after": 2, "on_dead": "rollback"},  # under stop: rolls back dead nets only
    {"growth_window": 5},  # the loss-at-chance check measures over it
    {"warn_growth": 10.0, "growth_window": 5},
    {"on_nonfinite": "skip", "rollback_after": 2, "growth_window": 5},
]


@pytest.fixture
def overflowing(write_solver, tmp_path):
    """A solver whose first update overflows the weights (finite gradients, base_lr 3e38)."""
    return write_solver(DIVERGING_NET.replace("LAYER", ""), base_lr=3e38,
                        snapshot_prefix='"%s"' % (tmp_path / "ck"))


@pytest.mark.parametrize("options,fix", ALONE)
def test_an_option_that_would_do_nothing_is_refused_naming_the_fix(caffe, overflowing, options,
                                                                    fix):
    solver = caffe.get_solver(str(overflowing))
    with pytest.raises(ValueError, match=fix):
        watch(solver, solver_file=overflowing, **options)
    assert getattr(solver, "_safe_layers_watch", None) is None  # nothing attached


@pytest.mark.parametrize("options", TOGETHER)
def test_the_same_options_beside_what_they_act_with_are_accepted(caffe, overflowing, options):
    with watch(caffe.get_solver(str(overflowing)), solver_file=overflowing, **options):
        pass


def _unwatched(solver, w):
    """The solver after its watch ``w`` closed: Caffe's step, nothing of ``w`` runs."""
    assert getattr(solver.step, "__self__", None) is not w
    assert solver._safe_layers_watch is None and w.closed
    faults = len(w.faults)
    solver.step(2)  # the hooks stay registered (pycaffe cannot remove them) and do nothing
    assert len(w.faults) == faults
    watch(solver).close()  # a second watch is no longer refused as "watched already"


def test_watch_is_a_context_manager_that_unwatches_the_solver(caffe, overflowing, tmp_path):
    solver = caffe.get_solver(str(overflowing))
    with watch(solver, solver_file=overflowing, on_nonfinite="warn", rollback_after=1,
               checkpoint_every=1, max_rollbacks=1, lr_factor=1e-38, log_first=0) as w:
        assert solver._safe_layers_watch is w
        solver.step(2)
        assert w.rollbacks == 1
        assert list(tmp_path.glob("ck_iter_*.solverstate"))  # the watch's checkpoint
    assert not list(tmp_path.glob("ck_iter_*"))  # its checkpoint files are deleted
    _unwatched(solver, w)


def test_an_exception_inside_the_block_still_unwatches_the_solver(caffe, overflowing):
    solver = caffe.get_solver(str(overflowing))
    with pytest.raises(NonFiniteError):
        with watch(solver, log_first=0) as w:
            solver.step(3)
    assert w.faults and w.faults[-1].kind == "weights"
    _unwatched(solver, w)
