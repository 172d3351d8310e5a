"""safe_layers.watch and `safe-layers train` on an older pycaffe (issue "Caffe forks",
item 7): without the Net layer hooks (pycaffe before 2017), without Solver.add_callback
(before September 2015), without Solver.lr (before December 2017). Real caffe.SGDSolvers,
seen through proxies that hide those names from the watch and delegate the rest."""

import argparse
import io
import json
import signal

import pytest

from safe_layers.anomaly import NonFiniteError, parse_line, watch
from safe_layers.tools.train import child
from safe_layers.tools.train import command as train_command
from support.nets import regression_net
from support.weights import all_finite, bit_equal, weights

LAYER_HOOKS = ("before_forward", "after_forward", "before_backward", "after_backward")
NO_LAYER_HOOKS = "no producer named: this pycaffe has no Net." + "/".join(LAYER_HOOKS)


class Older:
    """A pycaffe object as an older pycaffe shows it: the names in ``hidden`` raise
    AttributeError, the rest is the real object's; what is set on it stays on it (as on
    a Boost.Python instance: the watch puts its step and solve there)."""

    def __init__(self, real, hidden):
        self._real = real
        self._hidden = frozenset(hidden)

    def __getattr__(self, name):
        if name in ("_real", "_hidden") or name in self._hidden:
            raise AttributeError("%r object has no attribute %r (an older pycaffe)"
                                 % (type(self._real).__name__, name))
        return getattr(self._real, name)


def older_solver(real, layer_hooks=False, callbacks=True, hidden=("lr", "param", "share_weights")):
    """``real`` (a caffe solver) as a pycaffe of 2016 shows it: no Solver.lr, no
    solver.param, no share_weights; its nets without the layer hooks unless
    ``layer_hooks``; without add_callback unless ``callbacks`` (before 2015-09)."""
    solver = Older(real, tuple(hidden) + (() if callbacks else ("add_callback",)))
    net_hidden = () if layer_hooks else LAYER_HOOKS
    solver.net = Older(real.net, net_hidden)
    solver.test_nets = [Older(net, net_hidden) for net in real.test_nets]
    return solver


def poisoned(calls):
    """The regression net with a NaN in sample 1 at the TRAIN forward calls ``calls``
    (call k is iteration k - 1 of a fresh solver); its TEST net is clean."""
    return regression_net("old", before_fc=(
        'layer { name: "poison" type: "Python" bottom: "x" top: "x" include { phase: TRAIN }\n'
        '  python_param { module: "support.poison" layer: "PoisonAtCall"\n'
        '                 param_str: "{calls: %s, sample: 1}" } }\n' % json.dumps(list(calls))))


def reduced_lines(text):
    return [line for line in text.splitlines() if "WATCH reduced" in line]


# -- without the layer hooks: the solver-level checks, skip as ever --------------------

def test_without_layer_hooks_skip_is_the_full_watchs_and_names_no_producer(caffe, write_solver):
    """The same poisoned run under the full watch and under one without the layer hooks:
    the same iteration skipped, the same losses, bit-equal weights; only the producer is
    missing, and the report says why; one notice, when the watch attaches."""
    path = write_solver(poisoned([4]))
    runs = {}
    for mode in ("full", "solver"):
        real = caffe.get_solver(str(path))
        solver = real if mode == "full" else older_solver(real)
        stream = io.StringIO()
        w = watch(solver, solver_file=path, on_nonfinite="skip", stream=stream, log_first=0)
        losses = []
        for _ in range(6):
            solver.step(1)
            losses.append(w.loss)
        assert w.hooks.mode == mode and real.iter == 6 and w.skipped == [3]
        assert w.lr == real.lr  # computed from lr_policy where Solver.lr is hidden
        runs[mode] = (w, losses, weights(real.net), stream.getvalue())
        w.close()
    full, reduced = runs["full"], runs["solver"]
    assert reduced[1] == full[1] and bit_equal(reduced[2], full[2])
    assert [f.layer for f in full[0].faults if f.kind == "producer"] == ["poison"]
    assert not [f for f in reduced[0].faults if f.kind == "producer"]
    [fault] = [f for f in reduced[0].faults if f.action == "skip"]
    assert fault.iteration == 3 and "non-finite loss" in fault.message
    assert fault.message.endswith(NO_LAYER_HOOKS)
    assert reduced_lines(full[3]) == []
    [notice] = reduced_lines(reduced[3])
    assert notice.startswith("W") and "no producer localisation" in notice and "skip works" in notice
    assert parse_line(notice)["kind"] == "reduced"
    assert [e.kind for e in reduced[0].events].count("reduced") == 1


def test_without_layer_hooks_stop_is_before_the_update(caffe, write_solver):
    path = write_solver(poisoned([4]))
    real = caffe.get_solver(str(path))
    solver = older_solver(real)
    w = watch(solver, solver_file=path, stream=io.StringIO(), log_first=0)
    solver.step(3)
    before = weights(real.net)
    with pytest.raises(NonFiniteError) as caught:
        solver.step(2)
    report = caught.value.report
    assert (report.kind, report.iteration, report.action) == ("gradients", 3, "stop")
    assert report.message.endswith(NO_LAYER_HOOKS)
    assert real.iter == 3 and bit_equal(weights(real.net), before)
    w.close()


def test_without_solver_lr_and_no_solver_file_the_rate_goes_unchecked_and_is_said(
        caffe, write_solver, tmp_path):
    """Caffe 1.0's pycaffe has the layer hooks but no Solver.lr (nor solver.param.base_lr):
    the full watch, the rate unchecked without the solver's prototxt (said once), and
    lr_factor refused, not an AttributeError at the first rollback."""
    path = write_solver(poisoned([]), snapshot_prefix='"%s"' % (tmp_path / "ck"))
    real = caffe.get_solver(str(path))
    solver = older_solver(real, layer_hooks=True)
    stream = io.StringIO()
    w = watch(solver, stream=stream, log_first=0)
    solver.step(2)
    assert w.hooks.mode == "full" and w.lr is None and real.iter == 2
    [notice] = reduced_lines(stream.getvalue())
    assert "no Solver.lr: the learning rate is not checked" in notice
    assert "no producer localisation" not in notice
    w.close()
    with pytest.raises(ValueError, match="lr_factor lowers base_lr through solver.param.base_lr"):
        watch(older_solver(caffe.get_solver(str(path)), layer_hooks=True), solver_file=path,
              on_nonfinite="skip", rollback_after=1, lr_factor=0.1)


# -- without Solver.add_callback: solver.step(1) at a time, checked after it ------------

def test_without_add_callback_skip_becomes_a_rollback_of_the_applied_step(caffe, write_solver,
                                                                        tmp_path):
    path = write_solver(poisoned([6]), snapshot_prefix='"%s"' % (tmp_path / "ck"))
    real = caffe.get_solver(str(path))
    solver = older_solver(real, callbacks=False)
    stream = io.StringIO()
    w = watch(solver, solver_file=path, on_nonfinite="skip", rollback_after=3, checkpoint_every=2,
              checkpoint_loss_ratio=1e9, stream=stream, log_first=0)
    at_rollback = {}
    w.listener = lambda item: item.kind == "rollback" and at_rollback.update(
        to=item.details["to"], iter=real.iter, weights=weights(real.net))
    solver.step(4)
    assert real.iter == 4 and w.hooks.mode == "step"
    saved = weights(real.net)
    solver.step(4)  # iteration 5's step goes bad: back to checkpoint 4, then on to 8
    assert at_rollback["to"] == 4 and at_rollback["iter"] == 4
    assert bit_equal(at_rollback["weights"], saved)
    assert w.rollbacks == 1 and w.skipped == [] and real.iter == 8 and all_finite(real.net)
    [fault] = [f for f in w.faults if f.action == "rollback"]
    assert fault.iteration == 5 and "the update of iteration 5 is applied" in fault.message
    assert NO_LAYER_HOOKS in fault.message
    [notice] = reduced_lines(stream.getvalue())
    assert "no Solver.add_callback" in notice and "no producer localisation and no skip" in notice
    assert "on_nonfinite skip becomes rollback" in notice
    w.close()


@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_without_add_callback_stop_comes_after_the_update_and_says_so(caffe, write_solver,
                                                                      on_nonfinite):
    """'stop' (and 'skip' without rollback_after: nothing can undo the step) stops after
    the bad step, whose update Caffe has applied: the report says so."""
    path = write_solver(poisoned([4]))
    real = caffe.get_solver(str(path))
    solver = older_solver(real, callbacks=False)
    stream = io.StringIO()
    w = watch(solver, solver_file=path, on_nonfinite=on_nonfinite, stream=stream, log_first=0)
    solver.step(3)
    with pytest.raises(NonFiniteError) as caught:
        solver.step(2)
    report = caught.value.report
    assert (report.kind, report.iteration, report.action) == ("gradients", 3, "stop")
    assert "the update of iteration 3 is applied" in report.message
    assert real.iter == 4 and not all_finite(real.net)
    [notice] = reduced_lines(stream.getvalue())
    if on_nonfinite == "skip":
        assert "skip cannot undo it, and rollback_after is not set" in report.message
        assert "on_nonfinite skip becomes stop" in notice
    else:
        assert "on_nonfinite stop stops after the bad step" in notice
    w.close()


def test_without_add_callback_solve_steps_to_max_iter(caffe, write_solver, tmp_path):
    path = write_solver(poisoned([3]), max_iter=6, snapshot_prefix='"%s"' % (tmp_path / "ck"))
    real = caffe.get_solver(str(path))
    solver = older_solver(real, callbacks=False)
    w = watch(solver, solver_file=path, on_nonfinite="skip", rollback_after=1, checkpoint_every=1,
              checkpoint_loss_ratio=1e9, stream=io.StringIO(), log_first=0)
    solver.solve()
    assert real.iter == 6 and w.rollbacks == 1 and all_finite(real.net)
    w.close()
    bare = older_solver(caffe.get_solver(str(path)), callbacks=False)
    w = watch(bare, stream=io.StringIO())
    with pytest.raises(ValueError, match="give the watch solver_file="):
        bare.solve()
    w.close()


@pytest.mark.parametrize("what, options, message", [
    ("net", {}, "a lone net has nothing to watch it through"),
    ("step", {"clip_gradients": 1.0}, "clip_gradients needs Solver.add_callback"),
    ("step", {"on_nonfinite": "skip", "rollback_after": 1, "lr_factor": 0.5},
     "lr_factor lowers base_lr through solver.param.base_lr"),
])
def test_what_cannot_work_is_refused_with_a_reason(caffe, write_solver, tmp_path, what, options,
                                                   message):
    path = write_solver(poisoned([]), snapshot_prefix='"%s"' % (tmp_path / "ck"))
    real = caffe.get_solver(str(path))
    target = Older(real.net, LAYER_HOOKS) if what == "net" else older_solver(real, callbacks=False)
    with pytest.raises(ValueError, match=message):
        watch(target, solver_file=path if what != "net" else None, **options)


# -- safe-layers train's training process on such a pycaffe -------------------------------

@pytest.fixture
def trainer(caffe, monkeypatch, tmp_path):
    """trainer(solver_path, flags, **older) -> (exit status, the solver, events): the
    training process of `safe-layers train` run in this process, on solvers that
    caffe.get_solver gives as older_solver(**older) gives them."""
    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGHUP)}

    def run(solver_path, flags, **older):
        parser = argparse.ArgumentParser()
        train_command.add_arguments(parser)
        config = train_command.prepare(parser.parse_args(["-solver", str(solver_path)] + flags),
                                       str(tmp_path))
        made, get_solver = [], caffe.get_solver
        monkeypatch.setattr(caffe, "get_solver", lambda path: made.append(
            older_solver(get_solver(path), **older)) or made[-1])
        status = child.Trainer(config).run()
        with open(config["events"]) as f:
            events = [json.loads(line) for line in f]
        return status, made[0], events

    yield run
    for number, handler in saved.items():
        signal.signal(number, handler)


@pytest.mark.parametrize("callbacks, flags", [
    (True, ["--on-nonfinite", "skip"]),
    (False, ["--on-nonfinite", "skip", "--rollback-after", "1", "--checkpoint-every", "2",
             "--checkpoint-loss-ratio", "1e9"])])
def test_safe_layers_train_on_an_older_pycaffe(trainer, write_solver, tmp_path, capsys, callbacks,
                                               flags):
    """Caffe's Solve in Python under a reduced watch: the bad iteration skipped (or rolled
    back), every iteration accounted for, the test net tested with the trained weights
    (no Solver.share_weights before 2017-03: copied), the final loss read without the
    layer hooks, and the notice once, in the log and in the event log."""
    path = write_solver(poisoned([4]), max_iter=8, display=2, test_iter=1, test_interval=4,
                        snapshot_prefix='"%s"' % (tmp_path / "run"))
    status, solver, events = trainer(path, flags, callbacks=callbacks)
    err = capsys.readouterr().err
    assert status == child.EXIT_DONE, err[-3000:]
    assert solver.iter == 8 and all_finite(solver.net)
    assert len(reduced_lines(err)) == 1
    assert [e["kind"] for e in events if e["event"] == "watch"].count("reduced") == 1
    kind = "skip" if callbacks else "rollback"
    assert [e for e in events if e["event"] == "watch" and e["kind"] == kind]
    iterations = [e["iteration"] for e in events if e["event"] == "iteration"]
    assert iterations[-1] == 7 and sorted(set(iterations)) == list(range(8))
    assert "Iteration 8, Testing net (#0)" in err and "Optimization Done." in err
    [final] = [line for line in err.splitlines() if "] Iteration 8, loss = " in line]
    # The last forward's loss (average_loss 1), read from its loss top without the hooks.
    assert float(final.rsplit(" ", 1)[1]) == pytest.approx(float(solver.net.blobs["loss"].data),
                                                           rel=1e-4)
    test_net = solver.test_nets[0]
    assert bit_equal(weights(test_net), weights(solver.net))
