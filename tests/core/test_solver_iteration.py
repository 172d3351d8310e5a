"""safe_layers.core.solver_iteration: the true iteration in every report, under a watch
and in the caffe binary after -snapshot."""

import os
import re

from safe_layers.core import solver_iteration, caffe_process
from safe_layers import reporting
from support.nets import regression_net
from support.paths import TESTS

# A NaN placed at a chosen forward call of the train net; a NaNGuard that aborts names it.
POISONED_NET = regression_net("poisoned", fc_bottom="xp", before_fc=(
    'layer { name: "poison" type: "Python" bottom: "x" top: "xp"\n'
    '  python_param { module: "support.poison" layer: "PoisonAtCall"\n'
    '                 param_str: "{calls: CALLS, sample: 2}" } }\n'
    'layer { name: "guard" type: "Python" bottom: "xp" top: "xp"\n'
    '  python_param { module: "safe_layers" layer: "NaNGuard"\n'
    '                 param_str: "{name: guard, follows: poison, action: abort}" } }\n'))


def test_active_watch_iteration_wins_over_the_call_count():
    class Source:
        def iteration(self):
            return 41

    source = Source()
    assert reporting.iteration(0, call=3) == 2
    solver_iteration.activate(source)
    try:
        assert reporting.iteration(0, call=3) == 41
        assert reporting.iteration(1, call=3) is None  # TEST has no iteration
    finally:
        solver_iteration.deactivate(source)
    assert reporting.iteration(0, call=3) == 2


def test_caffe_binary_resume_reports_the_true_iteration(caffe_bin, write_solver, tmp_path,
                                                        monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(TESTS)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    prefix = tmp_path / "snap"
    first = write_solver(POISONED_NET.replace("CALLS", "[]"), max_iter=20, snapshot=20,
                         snapshot_prefix='"%s"' % prefix)
    run = caffe_bin("train", "-solver", first, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    state = tmp_path / "snap_iter_20.solverstate"
    assert caffe_process.solverstate_iteration(str(state)) == 20

    # Resumed at 20, the 18th forward call of this process is iteration 37.
    second = write_solver(POISONED_NET.replace("CALLS", "[18]"), max_iter=40,
                          snapshot_prefix='"%s"' % prefix)
    run = caffe_bin("train", "-solver", second, "-snapshot", state, cwd=tmp_path)
    assert run.returncode != 0
    abort = [line for line in run.stderr.splitlines() if "ABORT NaNGuard guard" in line]
    assert abort, run.stderr[-3000:]
    assert re.search(r"iteration 37 \(call 18\)", abort[0]), abort[0]
