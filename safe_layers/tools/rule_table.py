"""Every rule of every command in one table: id, command, default severity, summary, why.

    SL0xx-SL7xx  lint      the net and solver before training
    SL8xx        diagnose  a training log after the fact
    SL9xx        scan      the data a net reads

A rule registers itself where its check lives (:func:`rule`, at import of its module); the
fix of one finding is written with the finding (``Finding.fix``), the rule's ``doc`` says
why the rule exists, and ``safe-layers rule SL201`` prints it. A rule id never changes
meaning; a retired id is never reused.
"""

import importlib
import textwrap

COMMANDS = ("lint", "diagnose", "scan")

# The modules whose import registers each command's rules.
RULE_MODULES = {
    "lint": ("safe_layers.tools.lint.rules", "safe_layers.tools.lint.rules.solver",
             "safe_layers.tools.lint.rules.pooling", "safe_layers.tools.lint.rules.loss",
             "safe_layers.tools.lint.rules.batch_norm",
             "safe_layers.tools.lint.rules.python_layers", "safe_layers.tools.lint.rules.domain"),
    "diagnose": ("safe_layers.tools.diagnose.rules.lr", "safe_layers.tools.diagnose.rules.loss",
                 "safe_layers.tools.diagnose.rules.debug_info",
                 "safe_layers.tools.diagnose.rules.reports",
                 "safe_layers.tools.diagnose.rules.aborts",
                 "safe_layers.tools.diagnose.rules.testnet",
                 "safe_layers.tools.diagnose.rules.clipping",
                 "safe_layers.tools.diagnose.rules.no_training"),
    "scan": ("safe_layers.tools.scan.datum_records", "safe_layers.tools.scan.label_stats",
             "safe_layers.tools.scan.hdf5_sources", "safe_layers.tools.scan.net_targets"),
}


class Rule:
    """One rule: ``id`` (``SL201``), ``command`` (lint, diagnose or scan), default
    ``severity``, one-line ``summary`` (what it finds) and ``doc`` (why it matters, what
    Caffe does; may be several paragraphs)."""

    __slots__ = ("id", "command", "severity", "summary", "doc")

    def __init__(self, rule_id, command, severity, summary, doc=""):
        self.id, self.command, self.severity = rule_id, command, severity
        self.summary, self.doc = summary, textwrap.dedent(doc).strip()

    def __repr__(self):
        return "Rule(%s %s %s: %s)" % (self.id, self.command, self.severity, self.summary)


RULES = {}


def rule(command, rule_id, severity, summary, doc=""):
    """Register a rule and return its id (so that a module can say
    ``POOL_OUTSIDE = rule(...)`` and use the name where it reports)."""
    if command not in COMMANDS:
        raise ValueError("command %r; allowed: %s" % (command, ", ".join(COMMANDS)))
    if rule_id in RULES:
        raise ValueError("rule %s registered twice" % rule_id)
    RULES[rule_id] = Rule(rule_id, command, severity, summary, doc)
    return rule_id


def rules_of(command):
    """The rules of ``command``, by id (its rule modules are imported first)."""
    for module in RULE_MODULES[command]:
        importlib.import_module(module)
    return [RULES[k] for k in sorted(RULES) if RULES[k].command == command]


def ids_of(command):
    return [r.id for r in rules_of(command)]


def list_lines(command):
    """``--list-rules``: one line per rule, ``SL201  error    summary``."""
    return ["%s  %-7s  %s" % (r.id, r.severity, r.summary) for r in rules_of(command)]


def explain(rule_id):
    """The text ``safe-layers rule ID`` prints, or None for an id no command has."""
    for command in COMMANDS:
        rules_of(command)
    found = RULES.get(rule_id.upper())
    if found is None:
        return None
    head = "%s (%s, %s): %s" % (found.id, found.command, found.severity, found.summary)
    return head + ("\n\n" + found.doc if found.doc else "") + "\n"
