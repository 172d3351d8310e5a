"""`safe-layers diagnose` run in-process on a log, its JSON read, its evidence checked
against the log's own lines; a `caffe train` run kept as a log."""

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from safe_layers.tools import cli


def run_diagnose(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = cli.main(["diagnose", *map(str, argv)])
    return status, out.getvalue(), err.getvalue()


def diagnose_json(log):
    status, out, err = run_diagnose(log, "--format", "json")
    assert err == "", err
    return status, json.loads(out)


def rules(document):
    return {f["rule"]: f for f in document["findings"]}


def assert_evidence_is_the_log(document, log):
    """Every evidence line quoted is the log's own line at that number."""
    lines = Path(log).read_text(errors="replace").splitlines()
    for finding in document["findings"]:
        for item in finding["evidence"]:
            assert lines[item["line"] - 1].strip() == item["text"].strip(), (finding["rule"], item)


def train_log(caffe_train, tmp_path, name, net_text, **solver):
    """Run `caffe train` and keep its glog output (stderr) as a log file."""
    result = caffe_train(net_text, **solver)
    log = tmp_path / name
    log.write_text(result.stderr)
    return log, result
