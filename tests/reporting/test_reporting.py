"""The report format: every line kind our layers print reads back through reporting.parse_line,
every FaultReport field included; the flight recorder's files are atomic and never clobbered."""

import io
import json
import os

import numpy as np
import pytest

from safe_layers import reporting
from safe_layers.reporting import FaultReport, parse_line
from support.nets import log_net

BASE = dict(layer_type="NaNGuard", layer="conv1_guard", follows="conv1", phase="TRAIN",
            pass_="forward data", call=38, iteration=37, blob="bottom", blob_index=0,
            shape=(8, 4, 3, 3), nan=160, posinf=0, neginf=2, over=0, max_abs=None,
            first_index=(0, 0, 0, 2), first_value=float("nan"), finite_min=-0.644148,
            finite_max=0.785893, finite_mean_abs=0.15921, detail=None, action="clamp",
            escalated_from=None, escalated_after=None)

# Each case differs from BASE in a few fields; together they give every field at least two
# values, so a parser that dropped or garbled any field fails somewhere.
CASES = [
    {},
    dict(phase="TEST", iteration=None, call=1, follows=None, layer="#2", action="warn"),
    dict(layer_type="GradientClip", layer="fc8 clip (v2)", follows="fc8/inner", pass_="backward diff",
         blob_index=3, shape=(2, 5), nan=0, posinf=7, neginf=0, first_index=(1, 4),
         first_value=float("inf"), action="zero"),
    dict(max_abs=1e4, over=12, nan=0, posinf=0, neginf=0, first_value=-12345.678,
         finite_min=-12345.678, finite_max=3.4e38, finite_mean_abs=1e-30, action="abort",
         escalated_from="clamp", escalated_after=10),
    dict(layer_type="SafeInfogainLoss", blob="top", shape=(), first_index=(), nan=0, posinf=1,
         neginf=0, first_value=float("inf"), finite_min=None, finite_max=None,
         finite_mean_abs=None, detail="the loss 6.805646932770577e+38 overflows float32",
         iteration=0, call=1, max_abs=0.1, over=0),
    dict(first_index=None, first_value=None, nan=0, posinf=0, neginf=0, max_abs=3.4028235e38,
         over=0, layer_type="StableBatchNorm", action="warn", iteration=12345, call=24691,
         detail="the running variance would overflow float32 (channel 2: 1e+40); the batch is "
                "kept out of the statistics"),
    dict(first_value=-float("inf"), neginf=5, nan=0, finite_min=-0.0, finite_max=0.0,
         finite_mean_abs=0.0, shape=(1,), first_index=(0,), phase="7", iteration=None),
]


def make_report(case):
    values = dict(BASE, **case)
    for key in ("first_value", "finite_min", "finite_max", "finite_mean_abs"):
        values[key] = reporting.as_float32(values[key])  # data values are float32
    return FaultReport(**values)


def test_the_cases_give_every_field_two_values():
    for field in FaultReport.FIELDS:
        values = {repr(getattr(make_report(case), field)) for case in CASES}
        assert len(values) >= 2, field


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
def test_every_fault_report_field_round_trips_through_its_line(case):
    report = make_report(case)
    for text in (report.line(),
                 reporting.glog_prefix("W") + report.line(),
                 "I1125 03:10:23.123456  4242 safe_layers] " + report.line(),  # old glog: 4-digit date
                 reporting.glog_prefix("W") + report.line() + " (further faults summarised every 100)"):
        parsed = parse_line(text)
        assert parsed.kind == "fault"
        assert parsed.report == report, (text, vars(parsed.report))
        for field in FaultReport.FIELDS:  # equality above, field by field for the message
            assert reporting._same(getattr(parsed.report, field), getattr(report, field)), field
    assert FaultReport.from_line(report.line()) == report
    assert parse_line(reporting.glog_prefix("W") + report.line() + " (further faults summarised every 100)"
                      ).summarised_every == 100
    abort = parse_line(reporting.glog_prefix("E") + "ABORT " + report.line())
    assert abort.kind == "abort" and abort.report == report and abort.severity == "E"
    as_json = parse_line(reporting.glog_prefix("E") + "ABORT report: " + report.to_json())
    assert as_json.kind == "abort_report" and as_json.report == report
    assert FaultReport.from_json(report.to_json()) == report


def test_glog_fields_of_a_line_are_read():
    line = reporting.glog_prefix("W") + make_report({}).line()
    parsed = parse_line(line)
    assert parsed.severity == "W" and parsed.pid == os.getpid()
    assert parsed.time == line[1:25]
    assert parsed.subject == reporting.Subject("NaNGuard", "conv1_guard", "conv1", "TRAIN")


def test_out_of_range_faults_say_so():
    report = make_report(CASES[3])
    assert report.kind == "out-of-range"
    assert report.line().startswith("NaNGuard conv1_guard (after conv1) in TRAIN: out-of-range forward data,")
    assert "nan=0 +inf=0 -inf=0 over|10000|=12" in report.line()
    assert make_report({}).line().startswith("NaNGuard conv1_guard (after conv1) in TRAIN: non-finite forward")


def log_with(stream, **kwargs):
    return reporting.FaultLog("NaNGuard", "g", follows="conv1", phase=0, stream=stream, **kwargs)


def parsed_lines(stream):
    return [parse_line(line) for line in stream.getvalue().splitlines()]


def test_summaries_round_trip():
    stream = io.StringIO()
    log = log_with(stream, full=1, every=2)
    for call, action in ((1, "clamp"), (2, "warn"), (3, "clamp")):
        log.record(make_report(dict(call=call, iteration=call - 1, action=action)))
    log.final_summary()
    kinds = [p.kind for p in parsed_lines(stream)]
    assert kinds == ["fault", "summary", "final_summary"]
    summary, final = parsed_lines(stream)[1:]
    assert final.summary == log.fault_summary()
    assert (final.summary.count, final.summary.repaired, final.summary.nan, final.summary.neginf) == (3, 2, 480, 6)
    assert (final.summary.first_when, final.summary.latest_when) == ("iteration 0 (call 1)", "iteration 2 (call 3)")
    assert summary.summary.count == 3 - 0 and summary.subject == log.subject
    assert parsed_lines(stream)[0].summarised_every == 2


def test_clip_statistics_and_record_failures_and_notices_round_trip():
    subject = reporting.Subject("GradientClip", "#1", None, "TEST")
    stats = reporting.ClipStatistics(subject=subject, calls=40, recent_clipped=3, window=10,
                                     total_clipped=17, norm_window=10, norm_min=0.125,
                                     norm_median=2.5e-07, norm_max=1.2345678901234567e30)
    for prefix, kind in (("", "statistics"), ("final summary: ", "final_statistics")):
        parsed = parse_line(reporting.glog_prefix("I") + prefix + stats.text())
        assert parsed.kind == kind and parsed.statistics == stats
    failure = reporting.RecordFailure(subject=subject, directory="dumps/it's \"here\"", action="abort",
                                      error="PermissionError: [Errno 13] Permission denied: 'x'")
    parsed = parse_line(reporting.glog_prefix("W") + failure.text())
    assert parsed.kind == "record_failure" and parsed.failure == failure
    notice = parse_line(reporting.glog_prefix("W") + "StableBatchNorm bn1 in TEST: stored statistics unusable")
    assert notice.kind == "notice" and notice.message == "stored statistics unusable"
    assert notice.subject == reporting.Subject("StableBatchNorm", "bn1", None, "TEST")


def test_lines_that_are_not_ours():
    assert parse_line("I20261125 03:10:23.123456  4242 solver.cpp:239] Iteration 0, loss = nan") is None
    assert parse_line("I1125 03:10:23.123456  4242 net.cpp:84] Creating Layer conv1") is None
    assert parse_line("random text") is None
    assert parse_line("") is None
    other = parse_line(reporting.glog_prefix("W") + "something without a subject")
    assert other.kind == "other" and other.message == "something without a subject"
    truncated = parse_line(reporting.glog_prefix("W") + make_report({}).line()[:60])
    assert truncated.kind == "notice" and truncated.report is None  # never mistaken for a report
    with pytest.raises(ValueError, match="not a safe_layers fault line"):
        FaultReport.from_line("NaNGuard g in TRAIN: hello")


# ---- the flight recorder's files ----------------------------------------------------------

def small_report(**case):
    return make_report(dict(dict(shape=(4,), first_index=(1,)), **case))


def test_write_flight_record_respects_its_size_cap(tmp_path):
    big = np.zeros(1000, np.float32)
    npz, jsn = reporting.write_flight_record(str(tmp_path), "cap", {"a": big, "b": big}, small_report(),
                                             max_bytes=6000)
    record = json.loads((tmp_path / "cap.json").read_text())
    assert record["arrays"] == ["a"] and list(np.load(npz)) == ["a"]
    assert record["skipped_over_size_cap"] == [{"name": "b", "shape": [1000], "bytes": 4000}]
    assert sorted(os.listdir(tmp_path)) == ["cap.json", "cap.npz"]  # no temporary left


def test_flight_records_are_readable_as_the_umask_says(tmp_path):
    """Records are for the team reading the run: the process umask decides, not mkstemp's
    private 0600."""
    import os
    old = os.umask(0o022)
    try:
        paths = reporting.write_flight_record(str(tmp_path), "perm", {"a": np.ones(2)}, small_report(), 100)
        os.umask(0o077)
        private = reporting.write_flight_record(str(tmp_path), "private", {"a": np.ones(2)},
                                                small_report(), 100)
    finally:
        os.umask(old)
    assert [os.stat(p).st_mode & 0o777 for p in paths] == [0o644, 0o644]
    assert [os.stat(p).st_mode & 0o777 for p in private] == [0o600, 0o600]


def test_write_flight_record_never_overwrites(tmp_path):
    first = reporting.write_flight_record(str(tmp_path), "same", {"a": np.ones(2)}, small_report(), 100)
    second = reporting.write_flight_record(str(tmp_path), "same", {"a": np.zeros(2)}, small_report(), 100)
    assert [os.path.basename(p) for p in second] == ["same-2.npz", "same-2.json"]
    assert np.load(first[0])["a"].tolist() == [1, 1] and np.load(second[0])["a"].tolist() == [0, 0]


def test_without_hard_links_a_record_is_still_never_overwritten(tmp_path, monkeypatch):
    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")  # a file system without hard links
    monkeypatch.setattr(os, "link", no_links)
    first = reporting.write_flight_record(str(tmp_path), "fs", {"a": np.ones(2)}, small_report(), 100)
    second = reporting.write_flight_record(str(tmp_path), "fs", {"a": np.zeros(2)}, small_report(), 100)
    assert [os.path.basename(p) for p in first + second] == ["fs.npz", "fs.json", "fs-2.npz", "fs-2.json"]
    assert np.load(first[0])["a"].tolist() == [1, 1] and np.load(second[0])["a"].tolist() == [0, 0]
    assert sorted(os.listdir(tmp_path)) == ["fs-2.json", "fs-2.npz", "fs.json", "fs.npz"]


@pytest.mark.parametrize("name, expected", [
    ("conv1_guard", "conv1_guard"),
    ("ip/guard", "ip_guard-%08x"),
    ("../../etc/passwd", "etc_passwd-%08x"),
    ("a" * 300, "a" * 71 + "-%08x"),
    ("", "layer-%08x"),
])
def test_safe_file_names(name, expected):
    import zlib
    got = reporting.safe_file_name(name)
    assert got == (expected % zlib.crc32(name.encode()) if "%" in expected else expected)
    assert len(got) <= 80 and "/" not in got


def test_flight_record_stems_tell_phases_and_passes_apart():
    assert reporting.flight_record_stem(small_report(layer="ip/guard", call=38, iteration=37)).startswith(
        "TRAIN-ip_guard-")
    assert reporting.flight_record_stem(small_report(layer="g")) == "TRAIN-g-forward-data-iter37-call38"
    assert reporting.flight_record_stem(small_report(layer="g", phase="TEST", iteration=None, call=5,
                                                     pass_="backward diff")) == "TEST-g-backward-diff-call5"


def test_a_failed_write_leaves_no_file_and_the_recorder_reports_once(tmp_path):
    blocker = tmp_path / "dumps"
    blocker.write_text("a file where the folder should be")
    stream = io.StringIO()
    log = log_with(stream)
    recorder = reporting.FlightRecorder(log, str(blocker), 1000)
    assert recorder.record(small_report(action="abort"), {"a": np.ones(3)}) is None
    assert recorder.record(small_report(), {"a": np.ones(3)}) is None  # attempted once only
    (line,) = parsed_lines(stream)
    assert line.kind == "record_failure" and line.failure.directory == str(blocker)
    assert line.failure.action == "abort" and line.failure.error.startswith("FileExistsError")
    assert blocker.read_text() == "a file where the folder should be"


# ---- the real thing: every line of a `caffe train` run reads back -----------------------------

def python_layer(name, bottom, layer, param_str):
    return ('layer { name: "%s" type: "Python" bottom: "%s" top: "%s" python_param { '
            'module: "safe_layers" layer: "%s" param_str: "%s" } }\n' % (name, bottom, bottom, layer, param_str))


CAFFE_TRAIN_NET = log_net(python_layer("g", "y", "NaNGuard",
                                       "{name: g, follows: log, action: %s, log_first: 1, log_every: 2, "
                                       "dump_dir: blocked}")
                          + python_layer("c", "y", "GradientClip", "{follows: log, max_norm: 1, log_every: 2}"),
                          name="every_kind", data="constant")


@pytest.mark.parametrize("action, expected, phases", [
    ("clamp", {"fault", "summary", "final_summary", "statistics", "final_statistics", "record_failure"},
     {"TRAIN", "TEST"}),
    # The test pass before the first iteration meets the fault first.
    ("abort", {"abort", "abort_report", "record_failure", "final_summary"}, {"TEST"}),
])
def test_every_line_of_a_caffe_train_run_parses(caffe_train, tmp_path, action, expected, phases):
    (tmp_path / "blocked").write_text("a file where the dump folder should be")
    result = caffe_train(CAFFE_TRAIN_NET % action, max_iter=6, test_iter=1, test_interval=3)
    assert result.returncode == (0 if action == "clamp" else 1), result.stderr[-3000:]
    ours = [line for line in result.stderr.splitlines() if "safe_layers] " in line]
    parsed = [parse_line(line) for line in ours]
    assert all(p is not None and p.kind != "other" for p in parsed), ours
    assert {p.kind for p in parsed} == expected
    assert all(p.severity in "IWE" and p.pid > 0 and p.subject.layer in ("g", "#1") for p in parsed)
    assert {p.subject.phase for p in parsed} == phases
    # Caffe's own lines are not ours.
    assert all(parse_line(line) is None for line in result.stderr.splitlines()
               if "safe_layers] " not in line and line[:1] in "IWEF" and "] " in line)


def test_watch_lines_are_read_by_their_own_parser():
    line = ('W20261125 14:27:17.943661 26363 safe_layers] WATCH skip iteration 3: weights, momentum '
            'and iter left as they were; 1 skipped in all')
    parsed = parse_line(line)
    assert parsed.kind == "watch" and parsed.severity == "W"
    assert parsed.watch["kind"] == "skip" and parsed.watch["iteration"] == 3
