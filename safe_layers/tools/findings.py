"""What a subcommand found, how it is printed, and what the process exits with.

Every subcommand reports :class:`Finding` objects. Text output is one line each, in the
shape compilers and flake8 use, so editors jump to the spot::

    path:line:col: SL101 error pooling layer 'pool1': ... — fix: ...

(on a terminal the fix goes on a second, indented line; the first keeps that shape).
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

    def text(self, fix_below=False):
        """``path:line:col: RULE severity message — fix: ...``; with ``fix_below`` the fix
        goes on a second line, indented (the first line keeps the shape editors read)."""
        if not self.fix:
            fix = ""
        elif fix_below:
            fix = "\n    fix: %s" % self.fix
        else:
            fix = " — fix: %s" % self.fix
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


def emit(findings, fmt="text", stream=None, extra=None, summary=None, command=None, errors=()):
    """Print ``findings`` as text lines (then ``summary``, a line or None; on a terminal
    each fix on a line of its own), as one JSON document ``{"findings": [...], **extra}``,
    as GitHub Actions annotations (:func:`github_lines`) or as a SARIF log
    (:func:`sarif_log`: ``command``'s rules); ``errors``, the inputs that could not be read
    (``{"path", "line", "col", "error"}``), go into those two. Returns :func:`exit_status`."""
    stream = stream or sys.stdout
    if fmt == "json":
        document = {"findings": [f.as_dict() for f in findings]}
        document.update(jsonable(extra or {}))
        stream.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    elif fmt == "github":
        stream.writelines(line + "\n" for line in github_lines(findings, errors))
    elif fmt == "sarif":
        document = sarif_log(findings, command, errors)
        stream.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    else:
        fix_below = _is_terminal(stream)
        for finding in findings:
            stream.write(finding.text(fix_below) + "\n")
        if summary:
            stream.write(summary + "\n")
    stream.flush()
    return exit_status(findings)


# GitHub Actions workflow commands: the level of each severity, and the escapes of the
# runner's own toolkit (@actions/core, command.ts: escapeData / escapeProperty).
GITHUB_LEVELS = {"error": "error", "warning": "warning", "info": "notice"}
SARIF_LEVELS = {"error": "error", "warning": "warning", "info": "note"}
SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"


def _github_data(text):
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _github_property(text):
    return _github_data(text).replace(":", "%3A").replace(",", "%2C")


def _with_fix(finding):
    return finding.message + (" — fix: %s" % finding.fix if finding.fix else "")


def github_lines(findings, errors=()):
    """One ``::error file=P,line=L,col=C,title=SL201::message — fix: ...`` line per finding
    (``::warning``, ``::notice`` by severity; an unreadable input is an ``::error`` titled
    ``unreadable``): GitHub Actions shows each on the file and line in the pull request."""
    lines = []
    items = [(GITHUB_LEVELS[f.severity], f.path, f.line, f.col, f.rule, _with_fix(f)) for f in findings]
    items += [("error", e["path"], e.get("line", 0), e.get("col", 0), "unreadable", e["error"])
              for e in errors]
    for level, path, line, col, title, message in items:
        where = ["file=%s" % _github_property(str(path))]
        if line:
            where.append("line=%d" % line)
            if col:
                where.append("col=%d" % col)
        where.append("title=%s" % _github_property(title))
        lines.append("::%s %s::%s" % (level, ",".join(where), _github_data(message)))
    return lines


def _artifact(path, line, col):
    """A SARIF location: the path as a URI reference (relative paths stay relative, as
    code scanning reads them against the checkout), the region where there is one."""
    from urllib.parse import quote
    from urllib.request import pathname2url
    path = str(path)
    uri = ("file://" + pathname2url(path)) if os.path.isabs(path) else quote(path.replace(os.sep, "/"))
    physical = {"artifactLocation": {"uri": uri}}
    if line:
        physical["region"] = {"startLine": line}
        if col:
            physical["region"]["startColumn"] = col
    return {"physicalLocation": physical}


def sarif_log(findings, command, errors=()):
    """The SARIF 2.1.0 log of ``findings``: one run of the tool ``safe-layers COMMAND``
    with its rules (id, summary, why, default level), one result per finding (its fix
    in the message, its data in the properties) and the unreadable inputs as the
    invocation's error notifications."""
    from safe_layers import __version__
    rules = rule_table.rules_of(command) if command else []
    index = {r.id: i for i, r in enumerate(rules)}
    results = []
    for f in findings:
        result = {"ruleId": f.rule, "level": SARIF_LEVELS[f.severity],
                  "message": {"text": _with_fix(f)}, "locations": [_artifact(f.path, f.line, f.col)]}
        if f.rule in index:
            result["ruleIndex"] = index[f.rule]
        properties = {k: v for k, v in f.as_dict().items()
                      if k not in ("path", "line", "col", "rule", "severity", "message") and v is not None}
        if properties:
            result["properties"] = properties
        results.append(result)
    notifications = [{"level": "error", "message": {"text": e["error"]},
                      "locations": [_artifact(e["path"], e.get("line", 0), e.get("col", 0))]}
                     for e in errors]
    driver = {"name": "safe-layers", "version": __version__,
              "rules": [{"id": r.id, "shortDescription": {"text": r.summary},
                         "fullDescription": {"text": r.doc or r.summary},
                         "defaultConfiguration": {"level": SARIF_LEVELS[r.severity]}}
                        for r in rules]}
    if command:
        driver["fullName"] = "safe-layers %s" % command
    return {"$schema": SARIF_SCHEMA, "version": "2.1.0",
            "runs": [{"tool": {"driver": driver}, "columnKind": "unicodeCodePoints",
                      "results": results,
                      "invocations": [{"executionSuccessful": not errors,
                                       "toolExecutionNotifications": notifications}]}]}


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or a file-like stream
        return False


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


def add_format_argument(parser, machine_formats=False):
    """``--format text|json``, the same for every subcommand; with ``machine_formats``
    also ``github`` and ``sarif`` (the command passes ``command=`` to :func:`emit`)."""
    choices = ("text", "json") + (("github", "sarif") if machine_formats else ())
    parser.add_argument("--format", choices=choices, default="text",
                        help="text: one finding per line (path:line:col: RULE severity message); "
                             "json: one JSON document for machines" +
                             ("; github: GitHub Actions annotations (::error file=...); sarif: a "
                              "SARIF 2.1.0 log (GitHub code scanning)" if machine_formats else ""))
