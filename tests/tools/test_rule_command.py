"""`safe-layers rule ID` explains a rule of any command; `--list` lists them all."""

import io
from contextlib import redirect_stderr, redirect_stdout

from safe_layers.tools import cli, rule_table


def rule(*argv):
    """(exit status, stdout, stderr) of `safe-layers rule ...`, run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = cli.main(["rule", *argv])
    return status, out.getvalue(), err.getvalue()


def test_explains_a_lint_rule():
    status, out, err = rule("SL201")
    assert status == 0 and err == ""
    assert out == rule_table.explain("SL201")
    head, doc = out.split("\n\n", 1)
    assert head.startswith("SL201 (lint, error): pooling windows lie outside the input")
    assert "pooling_layer.cpp:" in doc and out.endswith("\n")


def test_explains_a_scan_rule_whatever_the_case_of_its_id():
    status, out, err = rule("sl901")
    assert status == 0 and err == ""
    assert out.startswith("SL901 (scan, error): non-finite float_data\n\n")
    assert "data_transformer.cpp:" in out


def test_explains_a_diagnose_rule_once_diagnose_registers_them():
    rules = rule_table.rules_of("diagnose")
    if not rules:
        return  # diagnose's rules are not in the registry (yet)
    status, out, _ = rule(rules[0].id)
    assert status == 0 and out.startswith("%s (diagnose, " % rules[0].id)


def test_an_unknown_id_exits_2():
    status, out, err = rule("SL999")
    assert status == 2 and out == ""
    assert err == "safe-layers rule: error: SL999: no such rule (safe-layers rule --list lists them)\n"


def test_no_id_exits_2():
    status, out, err = rule()
    assert status == 2 and out == "" and err.startswith("safe-layers rule: error: give a rule id")


def test_list_groups_every_command_s_rules():
    status, out, err = rule("--list")
    assert status == 0 and err == ""
    lines = out.splitlines()
    ids = [line.split()[0] for line in lines if line.startswith("  SL")]
    assert {"SL001", "SL201", "SL901"} <= set(ids)
    for command in ("lint", "scan"):
        assert "safe-layers %s:" % command in lines
        at = lines.index("safe-layers %s:" % command)
        listed = ["  " + line for line in rule_table.list_lines(command)]
        assert lines[at + 1:at + 1 + len(listed)] == listed
    assert lines.index("safe-layers lint:") < lines.index("safe-layers scan:")
    assert ids == sorted(ids) and len(ids) == len(set(ids))


def test_every_lint_and_scan_rule_has_a_doc_citing_caffe():
    for command in ("lint", "scan"):
        for found in rule_table.rules_of(command):
            assert found.doc, found.id
            assert ".cpp:" in found.doc or ".hpp:" in found.doc or ".proto:" in found.doc, found.id
            assert "shared/docs" not in found.doc, found.id
