"""Explain a rule: why it exists, what Caffe does there, where in Caffe's source.

    safe-layers rule SL201        # one rule of any command (lint, diagnose, scan)
    safe-layers rule --list       # every rule, by command

The ids are those the findings of `safe-layers lint`, `diagnose` and `scan` carry
(SL0xx-SL7xx lint, SL8xx diagnose, SL9xx scan); a rule id never changes meaning.
Exit status: 0, or 2 for an id no command has.
"""

import sys

from safe_layers.core.errors import InputError
from safe_layers.tools import rule_table

HELP = "explain a rule id (SL201): why it matters and what Caffe does; --list lists them all"


def add_arguments(parser):
    parser.add_argument("rule_id", nargs="?", metavar="ID", help="a rule id, such as SL201")
    parser.add_argument("--list", action="store_true", help="list every command's rules, grouped")


def list_lines():
    """Every command's rules, under a line naming the command; commands with none left out."""
    groups = []
    for command in rule_table.COMMANDS:
        lines = rule_table.list_lines(command)
        if lines:
            groups.append(["safe-layers %s:" % command] + ["  " + line for line in lines])
    return [line for i, group in enumerate(groups) for line in ([""] if i else []) + group]


def run(args):
    if args.list:
        if args.rule_id:
            raise InputError("give a rule id or --list, not both")
        sys.stdout.write("\n".join(list_lines()) + "\n")
        return 0
    if not args.rule_id:
        raise InputError("give a rule id (such as SL201), or --list for them all")
    text = rule_table.explain(args.rule_id)
    if text is None:
        raise InputError("%s: no such rule (safe-layers rule --list lists them)" % args.rule_id)
    sys.stdout.write(text)
    return 0
