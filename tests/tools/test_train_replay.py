"""`safe-layers train` in its default check_layers (replay) against --check-layers always:
the same fault records, field for field, in the event log."""

import json

import pytest

from support.nets import POOLING_NET
from test_train import safe_layers_train


def fault_records(path):
    return [json.dumps(dict(e, **{"time": None}) if "time" in e else e, sort_keys=True)
            for e in map(json.loads, path.read_text().splitlines()) if e["event"] == "fault"]


@pytest.mark.parametrize("policy", [[], ["--on-nonfinite", "skip", "--max-skips", "2"]],
                         ids=["stop", "skip"])
def test_train_reports_the_same_in_both_modes(tmp_path, policy):
    net = tmp_path / "pooling.prototxt"
    net.write_text(POOLING_NET)
    found = {}
    for mode in ("always", "replay"):
        solver = tmp_path / ("solver_%s.prototxt" % mode)
        solver.write_text('net: "%s"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 5\n'
                          'display: 1\nrandom_seed: 1\nsolver_mode: CPU\nsnapshot_prefix: "%s"\n'
                          % (net, tmp_path / mode))
        run = safe_layers_train("-solver", solver, "--check-layers", mode, "--no-lint", *policy,
                                cwd=tmp_path)
        assert run.returncode == 1, run.stderr[-3000:]
        found[mode] = fault_records(tmp_path / (mode + "_events.jsonl"))
    assert found["always"] and found["replay"] == found["always"]
    assert any('"kind": "producer"' in r and '"layer": "pool1"' in r for r in found["replay"])
