"""What a subcommand found, how it is printed, and what the process exits with.

Every subcommand reports :class:`Finding` objects. Text output is one line each, in the
shape compilers and flake8 use, so editors jump to the spot::

    path:line:col: SL101 error pooling layer 'pool1': ... — fix: ...

``--format json`` prints one JSON document: ``{"findings": [...], ...extra}``. Exit status
(:func:`exit_status`): 0 when nothing of severity ``error`` was found (warnings and info
only), 1 when something was, 2 when the input could not be read (:class:`InputError`,
raised anywhere below a subcommand's ``run`` and turned into exit 2 by the CLI).
"""

import argparse
import io
import json
import os
import sys

from safe_layers.core import atomic
from safe_layers.core.errors import InputError
from safe_layers.core.float_text import jsonable
from safe_layers.tools import rule_table

SEVERITIES = ("error", "warning", "info")

EXIT_CLEAN, EXIT_FOUND, EXIT_INPUT = 0, 1, 2


class Finding:
    """One thing a tool found.

    Args:
        path (str): the file it is in (or about).
        line, col (int): 1-based position; 0 when the finding is about the whole file.
        rule (str): a stable id, e.g. ``SL101``.
        severity (str): ``error``, ``warning`` or ``info``.
        message (str): what is wrong, naming the layer or field.
        fix (str): the concrete change that cures it ("" when there is none to give).
        layer (str, optional): the layer it concerns.
        data (dict, optional): machine-readable details for ``--format json`` (evidence
            lines, iteration, rows, keys ...); JSON-safe values.
    """

    __slots__ = ("path", "line", "col", "rule", "severity", "message", "fix", "layer", "data")

    def __init__(self, path, line, col, rule, severity, message, fix="", layer=None, data=None):
        if severity not in SEVERITIES:
            raise ValueError("severity %r; allowed: %s" % (severity, ", ".join(SEVERITIES)))
        self.path = str(path)
        self.line = int(line or 0)
        self.col = int(col or 0)
        self.rule = rule
        self.severity = severity
        self.message = message
        self.fix = fix
        self.layer = layer
        self.data = dict(data or {})

    def text(self):
        """``path:line:col: RULE severity message — fix: ...``"""
        fix = " — fix: %s" % self.fix if self.fix else ""
        return "%s:%d:%d: %s %s %s%s" % (self.path, self.line, self.col, self.rule, self.severity,
                                         self.message, fix)

    def as_dict(self):
        out = {name: getattr(self, name) for name in self.__slots__ if name != "data"}
        out.update(jsonable(self.data))
        return out

    def __repr__(self):
        return "Finding(%s)" % self.text()




def check_output_path(path, what):
    """Raise :class:`InputError` unless ``path`` can be written as a new or replaced file
    (:func:`safe_layers.core.atomic.check_output`: its folder exists and is writable; not
    a folder, not a link to a file; a device such as /dev/null is written into). Called on
    the command line's output paths before any work, so a typo in ``-o`` / ``--plot``
    costs nothing and no "wrote ..." is printed for a file that never came to be."""
    path = os.fspath(path)
    try:
        atomic.check_output(path)
    except OSError as exc:
        raise InputError("cannot write %s %s: %s" % (what, path, exc.strerror or exc)) from None
    return path


def save_png(figure, path):
    """Write a matplotlib figure as PNG whatever ``path``'s suffix says (a name ending in
    .prototxt would make matplotlib refuse the format); an error writing it is an
    :class:`InputError` naming the path."""
    # Drawn in memory, then written the one way every output is (core/atomic.py): whole or
    # not at all, never through a link or over what is not a plain file.
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    try:
        atomic.replace_file(path, image.getvalue())
    except OSError as exc:
        raise InputError("could not write the plot %s: %s" % (path, exc.strerror or exc))


def select(findings, select_rules=None, ignore_rules=None):
    """The findings whose rule id starts with one of ``select_rules`` (all when None) and
    with none of ``ignore_rules`` (prefixes, like flake8's ``--select`` / ``--ignore``)."""
    chosen = []
    for finding in findings:
        if select_rules and not any(finding.rule.startswith(p) for p in select_rules):
            continue
        if ignore_rules and any(finding.rule.startswith(p) for p in ignore_rules):
            continue
        chosen.append(finding)
    return chosen


def rule_list(text, known=None, option="--select"):
    """``--select SL1,SL203`` -> ['SL1', 'SL203']. With ``known`` (the subcommand's rule
    ids), an entry that is the prefix of none of them is an :class:`InputError` (a typo in
    ``--select`` would otherwise select nothing and report a clean run)."""
    rules = [part.strip() for part in (text or "").split(",") if part.strip()]
    if known is not None:
        unknown = [r for r in rules if not any(k.startswith(r) for k in known)]
        if unknown:
            raise InputError("%s %s: no such rule (this command's rules: %s)"
                             % (option, ", ".join(unknown), ", ".join(sorted(known))))
    return rules


def exit_status(findings):
    """1 when any finding is an error, else 0."""
    return EXIT_FOUND if any(f.severity == "error" for f in findings) else EXIT_CLEAN


def emit(findings, fmt="text", stream=None, extra=None, summary=None):
    """Print ``findings`` as text lines (then ``summary``, a line or None) or as one JSON
    document ``{"findings": [...], **extra}``. Returns :func:`exit_status`."""
    stream = stream or sys.stdout
    if fmt == "json":
        document = {"findings": [f.as_dict() for f in findings]}
        document.update(jsonable(extra or {}))
        stream.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    else:
        for finding in findings:
            stream.write(finding.text() + "\n")
        if summary:
            stream.write(summary + "\n")
    stream.flush()
    return exit_status(findings)


class _ListRules(argparse.Action):
    """``--list-rules``: print the command's rules and exit 0 while the arguments are
    parsed (as ``--version`` does), so that it needs none of the command's inputs."""

    def __init__(self, option_strings, dest, command, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)
        self.command = command

    def __call__(self, parser, namespace, values, option_string=None):
        print("\n".join(rule_table.list_lines(self.command)))
        parser.exit(0)


def add_list_rules_argument(parser, command):
    """``--list-rules``, the same for every subcommand that has rules."""
    parser.add_argument("--list-rules", action=_ListRules, command=command,
                        help="print the rules and exit")


def add_format_argument(parser):
    """``--format text|json``, the same for every subcommand."""
    parser.add_argument("--format", choices=("text", "json"), default="text",
                        help="text: one finding per line (path:line:col: RULE severity message); "
                             "json: one JSON document for machines")
