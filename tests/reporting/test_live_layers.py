"""Several nets in one process: logs keyed by net and phase, freed with the net, phases told
apart in every line and file name, unnamed layers given distinct names."""

import gc
import weakref

import numpy as np
import pytest

from safe_layers import reporting
from support import nets


def guard(bottom, param_str, name=None):
    return ('layer { name: "%s" type: "Python" bottom: "%s" top: "%s" python_param { '
            'module: "safe_layers" layer: "NaNGuard" param_str: "%s" } }\n'
            % (name or "guard_" + bottom, bottom, bottom, param_str))


def log_net(*guards):
    """x -> Log -> y -> guards -> loss: x <= 0 gives NaN/-Inf in y."""
    return nets.log_net("".join(guard("y", g, name="g%d" % i) for i, g in enumerate(guards)))


def run(net, x):
    net.blobs["x"].data[...] = x
    net.forward()


def test_two_nets_with_the_same_guard_name_keep_their_own_logs_and_records(make_net, tmp_path):
    dump = tmp_path / "dumps"
    param = "{name: g, follows: log, dump_dir: '%s'}" % dump
    first, second = make_net(log_net(param)), make_net(log_net(param))
    run(first, -1.0)  # six NaN
    run(second, 0.0)  # six -Inf
    run(second, 0.0)
    (log1,), (log2,) = reporting.fault_logs("g", net=first), reporting.fault_logs("g", net=second)
    assert log1 is not log2
    assert (log1.count, log1.last.nan) == (1, 6) and (log2.count, log2.last.neginf) == (2, 6)
    assert reporting.fault_logs("g") == [log1, log2]  # oldest first
    records = sorted(p.name for p in dump.glob("*.npz"))
    assert records == ["TRAIN-g-forward-data-iter0-call1-2.npz", "TRAIN-g-forward-data-iter0-call1.npz"]
    saved = [np.load(dump / name)["bottom0"] for name in records]
    assert np.isneginf(saved[0]).all() and np.isnan(saved[1]).all()  # nothing overwritten


def test_a_solver_keys_its_train_and_test_logs_apart(make_solver):
    solver = make_solver(log_net("{name: g, follows: log}"), test_iter=1, test_interval=100)
    train, test = solver.net, solver.test_nets[0]
    train.blobs["x"].data[...] = -1.0
    train.forward()
    test.blobs["x"].data[...] = 0.0
    test.forward()
    (train_log,) = reporting.fault_logs("g", "TRAIN", net=solver)
    (test_log,) = reporting.fault_logs("g", "TEST", net=solver)
    assert train_log.last.nan == 6 and test_log.last.neginf == 6
    assert reporting.fault_logs(net=train) == [train_log] and reporting.fault_logs(net=test) == [test_log]
    assert "NaNGuard g (after log) in TEST: non-finite" in test_log.last.line()


def test_clear_fault_logs_of_one_net_leaves_the_other(make_net):
    first, second = make_net(log_net("{name: g}")), make_net(log_net("{name: g}"))
    run(first, -1.0)
    run(second, -1.0)
    reporting.clear_fault_logs(net=first)
    (log1,), (log2,) = reporting.fault_logs(net=first), reporting.fault_logs(net=second)
    assert (log1.count, log1.first, log2.count) == (0, None, 1)
    run(first, -1.0)
    assert log1.count == 1 and log1.first.call == 2  # it keeps reporting afresh


def test_unnamed_layers_get_distinct_names_per_net(make_net, capfd):
    net = make_net(log_net("{}", "{follows: log}"))
    run(net, -1.0)
    names = [log.layer for log in reporting.fault_logs(net=net)]
    assert names == ["#1", "#2"]
    err = capfd.readouterr().err
    assert "NaNGuard #1 in TRAIN: non-finite forward data" in err
    assert "NaNGuard #2 (after log) in TRAIN: non-finite forward data" in err
    other = make_net(log_net("{}"))  # built after the first net ran: numbering starts again
    assert [log.layer for log in reporting.fault_logs(net=other)] == ["#1"]
    both = make_net(log_net("{}")), make_net(log_net("{}"))  # built back to back: numbering goes on
    assert [reporting.fault_logs(net=n)[0].layer for n in both] == ["#2", "#3"]


def test_dropped_nets_leave_no_logs_behind_and_say_their_final_summary(make_net, capfd):
    for i in range(50):
        net = make_net(log_net("{name: loop%d}" % i))
        if i == 3:
            run(net, -1.0)
        del net
    live = reporting.fault_logs()
    assert len(live) <= 1, [log.layer for log in live]
    assert len(reporting.LIVE._entries) <= 1
    err = capfd.readouterr().err
    assert err.count("final summary: NaNGuard loop3 in TRAIN: 1 fault so far") == 1
    assert "loop4" not in err


def test_a_released_net_frees_the_layer_buffers(make_net):
    net = make_net('name: "bn" force_backward: true\n'
                   'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }\n'
                   'layer { name: "bn" type: "Python" bottom: "x" top: "y" '
                   'param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 } '
                   'python_param { module: "safe_layers" layer: "StableBatchNorm" } }\n')
    net.blobs["x"].data[...] = np.random.default_rng(0).standard_normal((4, 3))
    net.forward()
    layer = weakref.ref(net.layers[1])
    assert layer()._saved is not None
    del net
    gc.collect()
    reporting.fault_logs()  # any look at the logs notices the released net
    # This Caffe never frees a Python layer object (its C++ PythonLayer holds a reference
    # to it); what the layer holds is dropped.
    assert layer() is not None, "Caffe freed the layer: the leak this test works around is fixed"
    assert layer()._saved is None
    assert reporting.fault_logs() == []


def test_final_summaries_under_caffe_train_name_each_phase(caffe_train, tmp_path):
    net = nets.log_net(guard("y", "{name: g, follows: log, action: clamp, dump_dir: dumps}"),
                       name="phases", force_backward=False, data="constant")
    result = caffe_train(net, max_iter=2, test_iter=1, test_interval=1)
    assert result.returncode == 0, result.stderr[-3000:]
    finals = [l for l in result.stderr.splitlines() if "final summary: NaNGuard g" in l]
    phases = sorted(reporting.parse_line(l).subject.phase for l in finals)
    assert phases == ["TEST", "TRAIN"]
    records = sorted(p.name for p in (tmp_path / "dumps").glob("*.json"))
    assert records == ["TEST-g-forward-data-call1.json", "TRAIN-g-forward-data-iter0-call1.json"]
