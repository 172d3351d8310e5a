"""safe_layers.readers.caffe_log: every line format of a Caffe log it reads, one line
each, under both of glog's date prefixes."""

import textwrap

import numpy as np

from safe_layers.readers.caffe_log import LogReader

LINES = textwrap.dedent("""\
    I1125 03:18:18.830953  5236 solver.cpp:239] Iteration 120 (12.5 iter/s, 0.8s/10 iters), loss = -nan
    I20261125 03:18:18.830953  5236 solver.cpp:327] Iteration 50, loss = inf
    I20261125 03:18:18.830953  5236 solver.cpp:258]     Train net output #1: loss_b = -inf (* 0.5 = -inf loss)
    I20261125 03:18:18.830953  5236 solver.cpp:258]     Train net output #0: accuracy = 0.25
    I20261125 03:18:18.830953  5236 solver.cpp:414]     Test net output #2: prob = nan
    I20261125 03:18:18.830953  5236 sgd_solver.cpp:112] Iteration 7, lr = -nan
    I20261125 03:18:18.830953  5236 solver.cpp:347] Iteration 500, Testing net (#1)
    I20261125 03:18:18.830953  5236 solver.cpp:401]     Test loss: 2.5e-05
    I20261125 03:18:18.830953  5236 sgd_solver.cpp:95] Gradient clipping: scaling down gradients (L2 norm 1.5e+03 > 35) by scale factor 0.0233333
    I20261125 03:18:18.830953  5236 net.cpp:593]     [Forward] Layer conv1, top blob conv1 data: inf
    I20261125 03:18:18.830953  5236 net.cpp:605]     [Forward] Layer conv1, param blob conv1_w data: 0.0125
    I20261125 03:18:18.830953  5236 net.cpp:621]     [Backward] Layer pool1, bottom blob conv1 diff: -nan
    I20261125 03:18:18.830953  5236 net.cpp:632]     [Backward] Layer conv1, param blob 1 diff: 3.5e-07
    E20261125 03:18:18.830953  5236 net.cpp:721]     [Backward] All net params (data, diff): L1 norm = (12.5, inf); L2 norm = (1.25, nan)
    I20261125 03:18:18.830953  5236 net.cpp:660]     [Update] Layer ip1, param 0 data: 0.5; diff: 0.25
    I20261125 03:18:18.830953  5236 net.cpp:655]     [Update] Layer ip2, param blob 3 (owned by layer ip1, param 0) diff: 1
    I20261125 03:18:18.830953  5236 sgd_solver.cpp:50] MultiStep Status: Iteration 3000, step = 2
    I20261125 03:18:18.830953  5236 solver.cpp:290] Learning Rate Policy: multistep
    F20261125 03:18:18.830953  5236 db_lmdb.hpp:15] Check failed: mdb_status == 0 (2 vs. 0) No such file or directory
    I20261125 03:18:18.830953  5236 solver.cpp:332] Optimization Done.
    """)


def test_parser_reads_every_format(tmp_path):
    log = tmp_path / "lines.log"
    log.write_text(LINES)
    events = list(LogReader(str(log)))
    assert [e.kind for e in events] == [
        "loss", "loss", "output", "output", "output", "lr", "testing", "test_loss", "clip", "forward",
        "forward", "backward", "backward", "norms", "update", "update", "multistep", "policy", "fatal",
        "done"]
    by_line = {e.line: e for e in events}
    loss = by_line[1]
    assert loss.iteration == 120 and np.isnan(loss.value)
    assert by_line[2].iteration == 50 and by_line[2].value == float("inf")
    out = by_line[3]
    assert (out.phase, out.index, out.name, out.weight) == ("TRAIN", 1, "loss_b", 0.5)
    assert out.value == float("-inf") and out.weighted == float("-inf")
    assert by_line[4].weight is None and by_line[4].value == 0.25
    assert by_line[5].phase == "TEST" and np.isnan(by_line[5].value)
    assert by_line[6].kind == "lr" and by_line[6].iteration == 7 and np.isnan(by_line[6].value)
    assert (by_line[7].iteration, by_line[7].net) == (500, 1)
    assert by_line[8].value == 2.5e-05
    assert (by_line[9].norm, by_line[9].limit, by_line[9].scale) == (1500.0, 35.0, 0.0233333)
    assert (by_line[10].layer, by_line[10].blob_kind, by_line[10].blob) == ("conv1", "top", "conv1")
    assert by_line[10].value == float("inf")
    assert (by_line[11].blob_kind, by_line[11].blob, by_line[11].value) == ("param", "conv1_w", 0.0125)
    assert (by_line[12].layer, by_line[12].blob_kind) == ("pool1", "bottom") and np.isnan(by_line[12].value)
    assert (by_line[13].blob_kind, by_line[13].blob, by_line[13].value) == ("param", "1", 3.5e-07)
    norms = by_line[14]
    assert (norms.l1_data, norms.l1_diff, norms.l2_data) == (12.5, float("inf"), 1.25)
    assert np.isnan(norms.l2_diff)
    assert (by_line[15].layer, by_line[15].param, by_line[15].data, by_line[15].diff) == ("ip1", "0", 0.5, 0.25)
    assert by_line[16].kind == "update" and by_line[16].diff == 1.0
    assert (by_line[17].iteration, by_line[17].step) == (3000, 2)
    assert by_line[18].policy == "multistep"
    assert by_line[19].kind == "fatal" and by_line[19].source == "db_lmdb.hpp"
    assert by_line[20].kind == "done"
    assert len(events) == 20


# The display lines of the Caffe forks, each as the fork's source writes it (the file:line
# of the LOG statement, which glog prints): (line, kind, iteration or output name, value,
# extra fields of an lr line).
FORK_LINES = [
    # NVCaffe 0.16.3 (NVIDIA/caffe v0.16.3 src/caffe/solvers/sgd_solver.cpp:136)
    ("I0315 10:12:03.651340 30211 sgd_solver.cpp:136] Iteration 50, lr = 0.01, m = 0.9",
     "lr", 50, 0.01, {"m": 0.9}),
    # NVCaffe 0.16.6 / 0.17.0 (sgd_solver.cpp:170), the line of the issue
    ("I0315 10:12:03.651340 30211 sgd_solver.cpp:170] Iteration 50, lr = 0.0001, m = 0.9, wd = 0.0004, gs = 1",
     "lr", 50, 0.0001, {"m": 0.9, "wd": 0.0004, "gs": 1.0}),
    ("I0315 10:12:03.651340 30211 sgd_solver.cpp:170] Iteration 150, lr = -nan, m = 0.9, wd = 0.0004, gs = 1",
     "lr", 150, float("nan"), {"m": 0.9, "wd": 0.0004, "gs": 1.0}),
    # NVCaffe 0.17.4: the device first (Net::print_current_device, net.cpp:1479), lrm added
    # (sgd_solver.cpp:180)
    ("I0108 22:50:49.000001  7001 sgd_solver.cpp:180] [0] Iteration 200, lr = 0.02, m = 0.9, lrm = 0.2, wd = 1e-05, gs = 0.5",
     "lr", 200, 0.02, {"m": 0.9, "lrm": 0.2, "wd": 1e-05, "gs": 0.5}),
    # NVCaffe 0.16.6 solver.cpp:353 (its first three iterations) and :347 with the epochs
    ("I0315 10:12:03.912345 30211 solver.cpp:353] Iteration 1 (0.261067 s), loss = 6.90911",
     "loss", 1, 6.90911, None),
    ("I0315 10:12:16.377788 30211 solver.cpp:347] Iteration 50 (3.93217 iter/s, 12.2072s/48 iter), 0.1/90ep, loss = -nan",
     "loss", 50, float("nan"), None),
    # NVCaffe 0.17.4 solver.cpp:337 and :358, after the device
    ("I0108 22:50:49.000001  7001 solver.cpp:337]     [0] Iteration 200 (12.3 iter/s, 8.1s/100 iter), loss = 4.5",
     "loss", 200, 4.5, None),
    ("I0108 22:50:49.000001  7001 solver.cpp:358]     [0]     Train net output #0: loss = inf (* 1 = inf loss)",
     "output", "loss", float("inf"), None),
    # Intel Caffe (intel/caffe src/caffe/solvers/sgd_solver.cpp:225, solver.cpp:312)
    ("I0601 08:00:00.000001  4242 sgd_solver.cpp:225] Iteration 300, lr = 0.1", "lr", 300, 0.1, {}),
    ("I0601 08:00:00.000001  4242 solver.cpp:312] Iteration 300, loss = 2.5", "loss", 300, 2.5, None),
    # py-faster-rcnn's caffe-fast-rcnn (faster-rcnn branch: sgd_solver.cpp:106, solver.cpp:229, :245)
    ("I0612 09:41:07.120426  2817 sgd_solver.cpp:106] Iteration 0, lr = 0.001", "lr", 0, 0.001, {}),
    ("I0612 09:41:07.120381  2817 solver.cpp:245]     Train net output #0: loss_bbox = nan (* 1 = nan loss)",
     "output", "loss_bbox", float("nan"), None),
    # SSD, weiliu89/caffe (sgd_solver.cpp:105, solver.cpp:218)
    ("I1009 11:00:00.000001  1001 sgd_solver.cpp:105] Iteration 10, lr = 0.0005", "lr", 10, 0.0005, {}),
    ("I1009 11:00:00.000001  1001 solver.cpp:218] Iteration 10 (1.2 iter/s, 8.3s/10 iters), loss = 7.3",
     "loss", 10, 7.3, None),
    # SegNet, alexgkendall/caffe-segnet (solver.cpp:486, :214)
    ("I0203 12:00:00.000001  5005 solver.cpp:486] Iteration 20, lr = 0.001", "lr", 20, 0.001, {}),
    ("I0203 12:00:00.000001  5005 solver.cpp:214] Iteration 20, loss = 1.2", "loss", 20, 1.2, None),
]


def test_the_forks_display_lines(tmp_path):
    log = tmp_path / "forks.log"
    log.write_text("".join(line + "\n" for line, *_ in FORK_LINES))
    events = list(LogReader(str(log)))
    assert len(events) == len(FORK_LINES)
    for event, (line, kind, key, value, extra) in zip(events, FORK_LINES):
        assert event.kind == kind, line
        if kind == "output":
            assert event.name == key and event.weight == 1.0, line
        else:
            assert event.iteration == key, line
        assert np.isnan(event.value) if np.isnan(value) else event.value == value, line
        if kind == "lr":
            assert event.extra == extra, line


def test_a_policy_on_the_solving_line():
    """NVCaffe 0.17.4 (solver.cpp:411) writes the policy on its Solving line."""
    import io
    line = b"I0108 22:50:49.000001  7001 solver.cpp:411] [0] Solving AlexNet Learning Rate Policy: poly\n"
    [event] = list(LogReader(io.BytesIO(line)))
    assert event.kind == "policy" and event.policy == "poly"
