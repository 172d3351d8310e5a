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
