"""`safe-layers diagnose --csv PREFIX`: Caffe's tools/extra/parse_log.py tables, compared
byte for byte with parse_log.py's own steps (ported below, line by line, as the reference)
on a real `caffe train` log; and the logs parse_log.py cannot read (glog 0.6's 8-digit
dates, -nan outputs, no glog prefix), seconds and test outputs in --format json."""

import csv
import datetime
import json
import os
import re
from collections import OrderedDict

import pytest

from support.diagnose_runs import run_diagnose, train_log

# A classifier with a TEST phase: every test pass prints accuracy and loss, as LeNet's.
CLASSIFIER = """
name: "csvnet"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 8 dim: 6 } shape { dim: 8 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy"
  include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


# ---------------------------------------------------------------------------------------
# The reference: BVLC Caffe's tools/extra/parse_log.py and extract_seconds.py, their steps
# ported to Python 3 as they are (the line numbers are parse_log.py's unless said).

def _reference_datetime(line, year):
    # extract_seconds.py:6-19
    line = line.strip().split()
    month = int(line[0][1:3])
    day = int(line[0][3:])
    timestamp = line[1]
    pos = timestamp.rfind('.')
    ts = [int(x) for x in timestamp[:pos].split(':')]
    return datetime.datetime(year, month, day, ts[0], ts[1], ts[2], int(timestamp[pos + 1:]))


def _reference_output(regex_obj, row, row_dict_list, line, iteration, seconds, learning_rate):
    # parse_log.py:86-125 (parse_line_for_net_output)
    output_match = regex_obj.search(line)
    if output_match:
        if not row or row['NumIters'] != iteration:
            if row:
                row_dict_list.append(row)
            row = OrderedDict([('NumIters', iteration), ('Seconds', seconds),
                               ('LearningRate', learning_rate)])
        row[output_match.group(2)] = float(output_match.group(3))
    if row and len(row_dict_list) >= 1 and len(row) == len(row_dict_list[0]):
        row_dict_list.append(row)
        row = None
    return row_dict_list, row


def reference_parse_log(path):
    """parse_log.py:17-83 (parse_log), with extract_seconds.py's year and start time."""
    regex_iteration = re.compile(r'Iteration (\d+)')
    regex_train_output = re.compile(r'Train net output #(\d+): (\S+) = ([\.\deE+-]+)')
    regex_test_output = re.compile(r'Test net output #(\d+): (\S+) = ([\.\deE+-]+)')
    regex_learning_rate = re.compile(r'lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)')
    iteration = -1
    learning_rate = float('NaN')
    train_dict_list, test_dict_list = [], []
    train_row = test_row = None
    # extract_seconds.py:22-28 (get_log_created_year)
    logfile_year = datetime.datetime.fromtimestamp(os.path.getctime(path)).year
    with open(path) as f:
        start_time = None
        for line in f:  # extract_seconds.py:31-41 (get_start_time): consumes up to 'Solving'
            if line.strip().find('Solving') != -1:
                start_time = _reference_datetime(line.strip(), logfile_year)
                break
        last_time = start_time
        for line in f:  # parse_log.py:43-78
            iteration_match = regex_iteration.search(line)
            if iteration_match:
                iteration = float(iteration_match.group(1))
            if iteration == -1:
                continue
            try:
                time = _reference_datetime(line, logfile_year)
            except ValueError:
                continue
            if time.month < last_time.month:
                logfile_year += 1
                time = _reference_datetime(line, logfile_year)
            last_time = time
            seconds = (time - start_time).total_seconds()
            learning_rate_match = regex_learning_rate.search(line)
            if learning_rate_match:
                learning_rate = float(learning_rate_match.group(1))
            train_dict_list, train_row = _reference_output(
                regex_train_output, train_row, train_dict_list, line, iteration, seconds, learning_rate)
            test_dict_list, test_row = _reference_output(
                regex_test_output, test_row, test_dict_list, line, iteration, seconds, learning_rate)
    for dict_list in (train_dict_list, test_dict_list):  # parse_log.py:128-138
        if len(dict_list) > 1:
            dict_list[0]['LearningRate'] = dict_list[1]['LearningRate']
    return train_dict_list, test_dict_list


def reference_csv(dict_list):
    """parse_log.py:157-173 (write_csv) into a string."""
    import io
    out = io.StringIO()
    dialect = csv.excel
    dict_writer = csv.DictWriter(out, fieldnames=dict_list[0].keys(), dialect=dialect)
    dict_writer.writeheader()
    dict_writer.writerows(dict_list)
    return out.getvalue()


def four_digit(text):
    """The log as glog < 0.6 writes it (`I1207`), the only date parse_log.py reads."""
    return re.sub(r"^([IWEF])\d{4}(\d{4}) ", r"\1\2 ", text, flags=re.M)


def eight_digit(text, year=2026):
    """The log as glog 0.6 writes it (`I20261207`)."""
    return re.sub(r"^([IWEF])(\d{4}) ", r"\g<1>%d\2 " % year, text, flags=re.M)


@pytest.fixture(scope="module")
def caffe_log(tmp_path_factory):
    """A real `caffe train` log: 60 iterations, display 10, a test every 20 (accuracy, loss),
    lr `step` so the LearningRate column changes."""
    import subprocess
    import sys
    from pathlib import Path
    from support.nets import solver_text
    work = tmp_path_factory.mktemp("csvlog")
    (work / "net.prototxt").write_text(CLASSIFIER)
    solver = work / "solver.prototxt"
    solver.write_text(solver_text(work / "net.prototxt", max_iter=60, display=10, test_iter=2,
                                  test_interval=20, lr_policy='"step"', gamma=0.5, stepsize=25,
                                  base_lr=0.05))
    binary = Path(sys.executable).parent / "caffe"
    if not binary.exists():
        pytest.skip("no caffe binary at %s; run `make setup`" % binary)
    env = dict(os.environ, GLOG_minloglevel="0")  # conftest quiets Caffe's INFO lines
    result = subprocess.run([str(binary), "train", "-solver", str(solver)], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return four_digit(result.stderr)


def test_the_tables_are_parse_logs_byte_for_byte(caffe_log, tmp_path):
    log = tmp_path / "caffe.INFO"
    log.write_text(caffe_log)
    train, test = reference_parse_log(log)
    assert len(train) == 6 and len(test) == 4      # iterations 0, 10 ... 50; tests at 0, 20, 40, 60
    assert list(train[0]) == ["NumIters", "Seconds", "LearningRate", "loss"]
    assert list(test[0]) == ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"]
    assert len({row["LearningRate"] for row in train}) > 1
    status, out, err = run_diagnose(log, "--csv", tmp_path / "out")
    assert status == 0, out + err
    assert (tmp_path / "out.train").read_bytes() == reference_csv(train).encode()
    assert (tmp_path / "out.test").read_bytes() == reference_csv(test).encode()
    assert "csv: %s (6 rows)" % (tmp_path / "out.train") in out
    # A folder: parse_log.py's own names, DIR/<log file name>.train (parse_log.py:149-154).
    folder = tmp_path / "tables"
    folder.mkdir()
    assert run_diagnose(log, "--csv", str(folder) + os.sep)[0] == 0
    assert (folder / "caffe.INFO.train").read_bytes() == reference_csv(train).encode()


def test_logs_parse_log_cannot_read(caffe_log, tmp_path):
    """glog 0.6's 8-digit dates (parse_log.py: `month must be in 1..12`), and `-nan` /
    `nan` / `inf` values (parse_log.py's [\\.\\deE+-]+ reads '-' of '-nan': ValueError).
    The expected tables are the reference's on the 4-digit, finite log, with the values
    changed where the log was."""
    four = tmp_path / "four.log"
    four.write_text(caffe_log)
    train, test = reference_parse_log(four)
    eight = tmp_path / "eight.log"
    eight.write_text(eight_digit(caffe_log))
    with pytest.raises(ValueError, match="month must be in 1..12"):
        reference_parse_log(eight)
    assert run_diagnose(eight, "--csv", tmp_path / "e")[0] == 0
    assert (tmp_path / "e.test").read_bytes() == reference_csv(test).encode()
    assert (tmp_path / "e.train").read_bytes() == reference_csv(train).encode()

    lines = caffe_log.splitlines(keepends=True)
    test_losses = [i for i, l in enumerate(lines) if "Test net output #1: loss = " in l]
    train_losses = [i for i, l in enumerate(lines) if "Train net output #0: loss = " in l]
    for i, value in ((test_losses[-1], "-nan"), (train_losses[-1], "inf")):
        lines[i] = re.sub(r"loss = \S+", "loss = %s" % value, lines[i])
    bad = tmp_path / "bad.log"
    bad.write_text("".join(lines))
    with pytest.raises(ValueError, match="could not convert string to float: '-'"):
        reference_parse_log(bad)
    run_diagnose(bad, "--csv", tmp_path / "b")
    test[-1]["loss"], train[-1]["loss"] = float("nan"), float("inf")
    assert (tmp_path / "b.test").read_bytes() == reference_csv(test).encode()
    assert (tmp_path / "b.train").read_bytes() == reference_csv(train).encode()
    assert (tmp_path / "b.test").read_text().splitlines()[-1].endswith(",nan")


def test_a_single_test_pass_and_a_log_without_prefixes(caffe_log, tmp_path):
    """parse_log.py writes a row when the next one starts (parse_log.py:98-105): a run
    tested once gets no .test at all; here it gets its row. A log without glog's prefix
    (--log_prefix=false): parse_log.py skips every line (parse_log.py:52-57) and fails on the
    `Solving` line; here the rows are there, Seconds nan."""
    lines = caffe_log.splitlines(keepends=True)
    first_test = next(i for i, l in enumerate(lines) if "Testing net" in l and "Iteration 20," in l)
    once = tmp_path / "once.log"
    once.write_text("".join(l for i, l in enumerate(lines)
                            if not ("Test net output" in l and i > first_test)))
    train, test = reference_parse_log(once)
    assert test == []
    assert run_diagnose(once, "--csv", tmp_path / "o")[0] == 0
    rows = list(csv.reader((tmp_path / "o.test").read_text().splitlines()))
    assert rows[0] == ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"] and len(rows) == 2
    assert rows[1][0] == "0.0" and rows[1][2] == "nan"   # before the first `lr = ` line

    bare = tmp_path / "bare.log"
    bare.write_text(re.sub(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [^\]]+\] ", "", caffe_log, flags=re.M))
    with pytest.raises(ValueError):
        reference_parse_log(bare)      # its `Solving` line has no date (extract_seconds.py:39)
    assert run_diagnose(bare, "--csv", tmp_path / "n")[0] == 0
    four = tmp_path / "four.log"
    four.write_text(caffe_log)
    train, _ = reference_parse_log(four)
    rows = list(csv.DictReader((tmp_path / "n.train").read_text().splitlines()))
    assert [(float(r["NumIters"]), r["Seconds"], float(r["LearningRate"]), float(r["loss"]))
            for r in rows] == [(r["NumIters"], "nan", r["LearningRate"], r["loss"]) for r in train]


def test_seconds_and_test_outputs_in_json(caffe_log, tmp_path):
    log = tmp_path / "run.log"
    log.write_text(caffe_log)
    train, test = reference_parse_log(log)
    status, out, _ = run_diagnose(log, "--format", "json")
    doc = json.loads(out)
    assert status == 0
    assert doc["test_outputs"]["accuracy"] == [[r["NumIters"], r["accuracy"]] for r in test]
    assert doc["test_outputs"]["loss"] == [[r["NumIters"], r["loss"]] for r in test]
    # Seconds at each `Iteration N (...), loss = L` line (and the final `Iteration 60, loss`),
    # from the `Solving` line.
    lines = caffe_log.splitlines()
    start = _reference_datetime(next(l for l in lines if "Solving" in l), 2000)
    expected = [[int(m.group(2)), (_reference_datetime(l, 2000) - start).total_seconds()]
                for l in lines for m in [re.search(r"(Iteration (\d+)( \(.*\))?, loss = )", l)] if m]
    assert len(expected) == 7 and doc["seconds"] == expected
    assert doc["start_time"].endswith(next(l for l in lines if "Solving" in l).split()[1])


def test_csv_refuses_to_overwrite_a_log_and_bad_paths(caffe_log, tmp_path):
    log = tmp_path / "x.train"
    log.write_text(caffe_log)
    other = tmp_path / "y.log"
    other.write_text(caffe_log)
    before = log.read_bytes()
    status, out, err = run_diagnose(other, log, "--csv", tmp_path / "x")
    assert status == 2 and "folder" in err          # several logs need a folder
    status, out, err = run_diagnose(log, "--csv", tmp_path / "x")
    assert status == 2 and "would overwrite the log" in err and out == ""
    assert log.read_bytes() == before
    status, out, err = run_diagnose(log, "--csv", tmp_path / "missing" / "t")
    assert status == 2 and "does not exist" in err
    plain = tmp_path / "x"
    plain.write_text(caffe_log)
    status, out, err = run_diagnose(plain, log, "--csv", str(tmp_path) + os.sep)
    assert status == 2 and "would overwrite the log" in err   # DIR/x.train: the second log
