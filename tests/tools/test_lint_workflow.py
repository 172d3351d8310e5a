"""`safe-layers lint` in a ruff/pre-commit/CI workflow: [tool.safe-layers] in pyproject.toml,
inline `# safe-layers: ignore[...]`, folders and standard input, one line per finding with
its phase where the phases differ, --exit-zero, GitHub annotations, SARIF 2.1.0 (checked
against the published schema), the pre-commit hook, the fix on its own line on a terminal,
and the shipped examples. Every net is built by real Caffe."""

import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap

import jsonschema
import pytest
import yaml

from safe_layers.tools import cli
from support.paths import DATA, ROOT

PROJECT = DATA / "lint_project"
# The AVE pooling whose last window lies outside a 10x10 input (NaN there), on a data
# layer whose LMDB does not exist: its shape comes from --input-shape or nowhere.
POOL_ON_LMDB = (PROJECT / "models" / "pool.prototxt").read_text()


@pytest.fixture
def lint(caffe, tmp_path, monkeypatch, capsys):
    """lint(*argv, fmt="json", cwd=tmp_path, stdin=None) -> (exit status, JSON document or
    the text printed, stdout then stderr), run in this process."""

    def run(*argv, fmt="json", cwd=tmp_path, stdin=None):
        monkeypatch.chdir(cwd)
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
        capsys.readouterr()
        status = cli.main(["lint", "--format", fmt] + [str(a) for a in argv])
        out, err = capsys.readouterr()
        return status, (json.loads(out) if fmt in ("json", "sarif") and out else out + err)

    return run


def write(folder, name, text):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def found(document):
    return [(f["path"], f["rule"]) for f in document["findings"]]


# --- [tool.safe-layers] ------------------------------------------------------------------

def test_project_settings_found_above_each_file(lint, tmp_path):
    """tests/data/lint_project/pyproject.toml gives the data shape (so SL201 is found with
    Caffe's shapes), ignores SL002 and, in legacy/, SL201; lint run from elsewhere finds it
    above each file."""
    status, doc = lint(PROJECT / "models" / "pool.prototxt", PROJECT / "legacy" / "pool.prototxt")
    assert status == 1
    assert found(doc) == [(str(PROJECT / "models" / "pool.prototxt"), "SL201")]
    assert "8x1x10x10" in doc["findings"][0]["message"]
    # The same nets in a folder without the settings: no shape, so no SL201 (SL202 says
    # it could not check) and SL002 says why, for both files.
    copy = tmp_path / "bare"
    shutil.copytree(PROJECT / "models", copy / "models")
    shutil.copytree(PROJECT / "legacy", copy / "legacy")
    status, doc = lint(copy / "models" / "pool.prototxt", copy / "legacy" / "pool.prototxt")
    assert status == 0
    assert sorted(rule for _, rule in found(doc)) == ["SL002", "SL002", "SL202", "SL202"]


def test_settings_from_the_working_directory_and_from_config(lint, tmp_path):
    net = write(tmp_path / "nets", "pool.prototxt", POOL_ON_LMDB)
    # No pyproject.toml above the net: the one above the working directory counts; one
    # without a [tool.safe-layers] table is passed over on the way up.
    project = tmp_path / "project"
    write(project, "pyproject.toml", '[tool.safe-layers]\ninput-shapes = ["data=8,1,10,10"]\n')
    write(project / "sub", "pyproject.toml", '[project]\nname = "x"\n')
    status, doc = lint(net, cwd=project / "sub")
    assert status == 1 and [r for _, r in found(doc)] == ["SL201"]
    # --config names one for every file; --select on the command line replaces its select,
    # --ignore adds to its ignore.
    other = write(tmp_path, "other.toml", '[tool.safe-layers]\nselect = ["SL002"]\n')
    status, doc = lint(net, "--config", other, cwd=project / "sub")
    assert status == 0 and [r for _, r in found(doc)] == ["SL002"]
    status, doc = lint(net, "--config", other, "--select", "SL2", cwd=project / "sub")
    assert [r for _, r in found(doc)] == ["SL202"]
    status, doc = lint(net, "--ignore", "SL201", cwd=project / "sub")
    assert status == 0 and found(doc) == []
    # The command line's --input-shape wins over the file's shape of the same name.
    status, doc = lint(net, "--input-shape", "data=8,1,12,12", cwd=project / "sub")
    assert status == 0 and found(doc) == []


@pytest.mark.parametrize("table, message", [
    ('select = ["SL999"]', "[tool.safe-layers] select SL999: no such rule"),
    ('selekt = ["SL2"]', "[tool.safe-layers] selekt: no such setting (lint reads select, ignore, "
                         "input-shapes, per-file-ignores)"),
    ('ignore = "SL2"', "[tool.safe-layers] ignore: expected a list of strings"),
    ('input-shapes = ["data=8,x"]', "[tool.safe-layers] input-shapes: 'data=8,x': expected NAME=N,C,H,W"),
    ('[tool.safe-layers.per-file-ignores]\n"*.prototxt" = ["SL2O1"]',
     "[tool.safe-layers] per-file-ignores *.prototxt SL2O1: no such rule"),
    ("select = [", "pyproject.toml: not valid TOML"),
])
def test_bad_settings_exit_2_naming_the_file_and_key(lint, tmp_path, table, message):
    write(tmp_path, "pyproject.toml", "[tool.safe-layers]\n" + table + "\n")
    net = write(tmp_path, "pool.prototxt", POOL_ON_LMDB)
    status, text = lint(net, fmt="text")
    assert status == 2 and message in text, text
    assert str(tmp_path / "pyproject.toml") in text


# --- # safe-layers: ignore[...] ----------------------------------------------------------

SUPPRESSED = """\
layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 10 dim: 10 } } }
# safe-layers: ignore[SL201]
layer { name: "before" type: "Pooling" bottom: "x" top: "a"
  pooling_param { pool: AVE kernel_size: 3 stride: 5 } }
layer {  # safe-layers: ignore[SL3, SL201]
  name: "opening" type: "Pooling" bottom: "x" top: "b"
  pooling_param { pool: AVE kernel_size: 3 stride: 5 } }
layer { name: "other_rule" type: "Pooling" bottom: "x" top: "c"  # safe-layers: ignore[SL202]
  pooling_param { pool: AVE kernel_size: 3 stride: 5 } }
layer { name: "in#safe-layers: ignore[SL201]" type: "Pooling" bottom: "x" top: "d"
  pooling_param { pool: AVE kernel_size: 3 stride: 5 } }
# safe-layers: ignore[SL201]

layer { name: "after_a_blank" type: "Pooling" bottom: "x" top: "e"
  pooling_param { pool: AVE kernel_size: 3 stride: 5 } }
"""


def test_inline_ignore_on_the_layer_line_or_the_line_before(lint, tmp_path):
    write(tmp_path, "net.prototxt", SUPPRESSED)
    status, doc = lint("net.prototxt")
    layers = sorted(f["layer"] for f in doc["findings"] if f["rule"] == "SL201")
    # Silenced: 'before' (the line before), 'opening' (its opening line, several ids).
    # Not: a directive for another rule, a '#' inside a string, one a blank line away.
    assert layers == ["after_a_blank", "in#safe-layers: ignore[SL201]", "other_rule"], doc["findings"]
    assert status == 1 and doc["suppressed"] == 2


def test_inline_ignore_on_the_findings_line_and_for_the_whole_file(lint, tmp_path):
    net = write(tmp_path, "net.prototxt", SUPPRESSED)
    # A Python layer's param_str error (SL601) sits on the param_str line, inside the layer.
    guard = ('layer { name: "g" type: "Python" bottom: "x" top: "x"\n'
             '  python_param { module: "safe_layers" layer: "NaNGuard"\n'
             '    param_str: "{action: nonsense}" }  # safe-layers: ignore[SL601]\n}\n')
    net.write_text(SUPPRESSED + guard)
    status, doc = lint("net.prototxt")
    assert "SL601" not in [f["rule"] for f in doc["findings"]]
    net.write_text(SUPPRESSED + guard.replace("  # safe-layers: ignore[SL601]", ""))
    status, doc = lint("net.prototxt")
    assert "SL601" in [f["rule"] for f in doc["findings"]]
    net.write_text("# safe-layers: ignore-file[SL2]\n" + SUPPRESSED)
    status, doc = lint("net.prototxt")
    assert status == 0 and doc["findings"] == [] and doc["suppressed"] == 5
    status, text = lint("net.prototxt", fmt="text")
    assert text.endswith("lint: 0 errors, 0 warnings, 0 notes in net.prototxt; "
                         "5 silenced by safe-layers: ignore comments\n")


# --- folders, standard input, --exit-zero ------------------------------------------------

def test_folders_are_walked_in_sorted_order(lint, tmp_path):
    for name in ("b/net.prototxt", "a/z.prototxt", "a/c/net.prototxt", ".hidden/net.prototxt"):
        write(tmp_path / "models", name, POOL_ON_LMDB)
    write(tmp_path / "models", "a/notes.txt", "not a net")
    status, doc = lint("models", "--input-shape", "data=8,1,10,10")
    assert doc["checked"] == ["models/a/c/net.prototxt", "models/a/z.prototxt", "models/b/net.prototxt"]
    assert status == 1 and found(doc) == [(path, "SL201") for path in doc["checked"]]
    (tmp_path / "empty").mkdir()
    status, text = lint("empty", fmt="text")
    assert status == 2 and "empty: a folder with no *.prototxt under it" in text


def test_standard_input(lint, tmp_path):
    status, doc = lint("-", stdin=SUPPRESSED)
    assert status == 1 and {f["path"] for f in doc["findings"]} == {"-"}
    assert len(doc["findings"]) == 3
    # --stdin-filename names it, and its per-file-ignores apply.
    write(tmp_path, "pyproject.toml", '[tool.safe-layers.per-file-ignores]\n"legacy/*" = ["SL201"]\n')
    status, doc = lint("-", "--stdin-filename", "legacy/net.prototxt", stdin=SUPPRESSED)
    assert status == 0 and doc["findings"] == [] and doc["checked"] == ["legacy/net.prototxt"]
    status, text = lint("-", "-", stdin=SUPPRESSED, fmt="text")
    assert status == 2 and "- (standard input) given 2 times" in text


def test_exit_zero(lint, tmp_path):
    write(tmp_path, "net.prototxt", SUPPRESSED)
    assert lint("net.prototxt")[0] == 1
    status, doc = lint("net.prototxt", "--exit-zero")
    assert status == 0 and doc["counts"]["error"] == 3
    # Unreadable input is still exit 2.
    assert lint("net.prototxt", "absent.prototxt", "--exit-zero")[0] == 2


# --- phases ---------------------------------------------------------------------------------

PHASES = """\
layer { name: "data" type: "Input" top: "x" include { phase: TRAIN }
  input_param { shape { dim: 8 dim: 1 dim: 10 dim: 10 } } }
layer { name: "data" type: "Input" top: "x" include { phase: TEST }
  input_param { shape { dim: 100 dim: 1 dim: 10 dim: 10 } } }
layer { name: "both" type: "Pooling" bottom: "x" top: "a"
  pooling_param { pool: AVE kernel_size: 3 stride: 5 } }
layer { name: "test_only" type: "Pooling" bottom: "x" top: "b" include { phase: TEST }
  pooling_param { pool: AVE kernel_size: 3 stride: 5 } }
layer { name: "train_only" type: "Pooling" bottom: "x" top: "c" include { phase: TRAIN }
  pooling_param { pool: AVE kernel_size: 3 stride: 3 } }
layer { name: "log" type: "Log" bottom: "x" top: "l" }
"""


def test_a_finding_prints_once_naming_its_phase_where_phases_differ(lint, tmp_path):
    write(tmp_path, "net.prototxt", PHASES)
    status, text = lint("net.prototxt", fmt="text")
    lines = text.splitlines()[:-1]
    # 'log' reads x the same way in both phases: one line, no phase. 'both' is found in
    # both phases but on another batch size (8 and 100, Caffe's shapes): one line each,
    # named. 'test_only' exists only in TEST (and 'train_only' is sound).
    assert [line.split(" ", 4)[1:4] for line in lines] == [
        ["SL201", "error", "[TRAIN]"], ["SL201", "error", "[TEST]"], ["SL201", "error", "[TEST]"],
        ["SL701", "warning", "Log"]]
    assert "'both'" in lines[0] and "8x1x10x10" in lines[0]
    assert "'both'" in lines[1] and "100x1x10x10" in lines[1] and "'test_only'" in lines[2]
    status, doc = lint("net.prototxt")
    assert [f["phase"] for f in doc["findings"]] == ["TRAIN", "TEST", "TEST", "TRAIN,TEST"]


# --- --format github, --format sarif ---------------------------------------------------------

def test_github_annotations(lint, tmp_path):
    write(tmp_path, "a,b:c%.prototxt", POOL_ON_LMDB)
    status, text = lint("a,b:c%.prototxt", "absent.prototxt", "--input-shape", "data=8,1,10,10",
                        "--select", "SL201", fmt="github")
    lines = text.splitlines()
    assert status == 2
    # A property's ',' and ':' and '%' are escaped as the Actions runner reads them back
    # (@actions/core's escapeProperty); the message keeps its text and carries the fix.
    assert lines[0].startswith("::error file=a%2Cb%3Ac%25.prototxt,line=8,col=3,title=SL201::"
                               "pooling layer 'pool1' (AVE, kernel 3x3, stride 5x5, pad 0x0)")
    assert lines[0].endswith(" — fix: round_mode: FLOOR (output 2x2); or pad: 1 (output 3x3); "
                             "or kernel_size: 5 (output 2x2)")
    assert lines[1] == "::error file=absent.prototxt,title=unreadable::absent.prototxt: no such file"
    # A warning is a ::warning, a note a ::notice.
    status, text = lint("a,b:c%.prototxt", "--select", "SL002,SL202", fmt="github")
    assert status == 0
    assert [line.split(" ", 1)[0] for line in text.splitlines()] == ["::notice", "::warning"]
    assert "::notice file=a%2Cb%3Ac%25.prototxt,line=1,col=1,title=SL002::" in text


def test_sarif_is_valid_sarif_2_1_0(lint, tmp_path):
    schema = json.loads((DATA / "sarif-schema-2.1.0.json").read_text())
    validator = jsonschema.Draft4Validator(schema)
    write(tmp_path, "nets dir/pool.prototxt", POOL_ON_LMDB)
    status, log = lint("nets dir", str(tmp_path / "nets dir" / "pool.prototxt"), "absent.prototxt",
                       fmt="sarif")
    assert status == 2
    assert [e.message for e in validator.iter_errors(log)] == []
    run = log["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    assert run["tool"]["driver"]["name"] == "safe-layers"
    assert {r["id"] for r in rules} >= {"SL001", "SL201", "SL701"}
    results = {(r["ruleId"], r["level"]) for r in run["results"]}
    assert results == {("SL002", "note"), ("SL202", "warning")}
    for result in run["results"]:
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"]
    uris = sorted({r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] for r in run["results"]})
    assert uris == ["file://%s/nets%%20dir/pool.prototxt" % tmp_path, "nets%20dir/pool.prototxt"]
    region = run["results"][0]["locations"][0]["physicalLocation"]["region"]
    assert region["startLine"] >= 1 and region["startColumn"] >= 1
    invocation = run["invocations"][0]
    assert invocation["executionSuccessful"] is False
    assert invocation["toolExecutionNotifications"][0]["message"]["text"] == "absent.prototxt: no such file"
    # The schema is strict where it matters: a level SARIF does not have is refused.
    run["results"][0]["level"] = "info"
    assert [e.message for e in validator.iter_errors(log)] != []


# --- text on a terminal --------------------------------------------------------------------

def test_on_a_terminal_the_fix_goes_on_its_own_line(caffe, tmp_path):
    write(tmp_path, "pool.prototxt", POOL_ON_LMDB)
    command = [sys.executable, "-m", "safe_layers.tools.cli", "lint", "pool.prototxt", "--no-shapes",
               "--select", "SL202"]
    piped = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    first = piped.stdout.splitlines()[0]
    assert first.startswith("pool.prototxt:8:3: SL202 warning pooling layer 'pool1'") and " — fix: " in first
    main, child = os.openpty()
    with subprocess.Popen(command, cwd=tmp_path, stdout=child, stderr=subprocess.PIPE) as process:
        os.close(child)
        output = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    os.close(main)
    lines = output.decode().replace("\r\n", "\n").splitlines()
    assert process.returncode == 0
    assert lines[0] == first.split(" — fix: ")[0]
    assert lines[1] == "    fix: " + first.split(" — fix: ")[1]
    assert lines[2].startswith("lint: 0 errors, 1 warning")


# --- pre-commit ------------------------------------------------------------------------------

def test_pre_commit_hook_runs_lint_on_the_prototxts_it_is_given(caffe, tmp_path):
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    hook = next(h for h in hooks if h["id"] == "safe-layers-lint")
    assert hook["entry"] == "safe-layers lint" and hook["language"] == "system"
    import re
    assert re.search(hook["files"], "models/train_val.prototxt")
    assert not re.search(hook["files"], "models/train_val.py")
    # As pre-commit runs it: the entry's words, then the staged files that match.
    write(tmp_path, "pyproject.toml", '[tool.safe-layers]\ninput-shapes = ["data=8,1,10,10"]\n')
    write(tmp_path, "models/pool.prototxt", POOL_ON_LMDB)
    words = shlex.split(hook["entry"])
    command = [str(os.path.join(os.path.dirname(sys.executable), words[0]))] + words[1:]
    result = subprocess.run(command + ["models/pool.prototxt"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("models/pool.prototxt:8:3: SL201 error")


# --- the shipped examples ------------------------------------------------------------------

# examples/lint/ holds the traps README's lint section shows lint finding (exit 1).
TRAPS = ROOT / "examples" / "lint"


def test_every_example_lints_clean_from_the_checkout(lint):
    examples = sorted(p for p in (ROOT / "examples").rglob("*.prototxt") if TRAPS not in p.parents)
    assert len(examples) >= 4
    for path in examples:
        relative = path.relative_to(ROOT)
        status, doc = lint(relative, cwd=ROOT)
        assert status == 0, (relative, doc)
        assert [f for f in doc["findings"] if f["severity"] == "error"] == [], relative
    status, doc = lint(*sorted(TRAPS.glob("*.prototxt")), cwd=ROOT)
    assert status == 1 and rules_found(doc) == ["SL101", "SL102", "SL104", "SL201"]


def rules_found(document):
    return sorted({f["rule"] for f in document["findings"]})
