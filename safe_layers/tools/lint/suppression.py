"""Findings silenced in the prototxt itself, by a comment, as ruff's ``# noqa`` does.

    # safe-layers: ignore[SL201]          (on its own line: the next line)
    layer {                                # safe-layers: ignore[SL201, SL3]
      name: "pool1" ...

    # safe-layers: ignore-file[SL002]      (anywhere: the whole file)

A directive written at the end of a line covers the findings on that line; one on a line
of its own covers the line after it. Either way, when the line covered is a layer's
opening line, every finding inside that layer is covered. Ids are rule ids or prefixes
(``SL2``); without brackets every rule is meant.
"""

import re

from safe_layers.readers.prototxt_index import line_col

DIRECTIVE = re.compile(r"safe-layers:\s*(ignore-file|ignore)\b(?:\[([^\]]*)\])?")


def comment_of(line):
    """(column where ``line``'s ``#`` comment starts, its text), or None: a ``#`` inside a
    quoted string is not a comment."""
    quote = None
    escaped = False
    for index, char in enumerate(line):
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "#":
            return index, line[index + 1:]
    return None


class Suppressions:
    """The directives of one file's text and the layers in it, asked with :meth:`covers`."""

    def __init__(self, text):
        self.by_line = {}  # line -> [ids] (an empty list: every rule)
        self.whole_file = []
        self.every_rule_in_file = False
        self.layer_lines = {}  # a line inside a layer -> the layer's opening line
        for number, line in enumerate(text.split("\n"), 1):
            comment = comment_of(line)
            if comment is None:
                continue
            column, body = comment
            for match in DIRECTIVE.finditer(body):
                ids = [i for i in re.split(r"[\s,]+", match.group(2) or "") if i]
                if match.group(1) == "ignore-file":
                    self.every_rule_in_file |= not ids
                    self.whole_file.extend(ids)
                    continue
                # Alone on its line: it speaks of the next one.
                target = number + 1 if not line[:column].strip() else number
                self.by_line.setdefault(target, []).extend(ids or [""])

    def add_layers(self, text, nodes):
        """Index the layers (position Nodes) of a net in this file, so that a directive on
        a layer's opening line covers what is found anywhere inside it."""
        for node in nodes:
            last, _ = line_col(text, max(node.end - 1, node.start))
            for line in range(node.line, last + 1):
                self.layer_lines.setdefault(line, node.line)

    def covers(self, finding):
        """Whether a directive silences ``finding``."""
        if self.every_rule_in_file or _matches(finding.rule, self.whole_file):
            return True
        lines = {finding.line, self.layer_lines.get(finding.line)}
        return any(_matches(finding.rule, self.by_line.get(line, ())) for line in lines if line)


def _matches(rule, ids):
    return any(rule.startswith(i) for i in ids)  # "" (every rule) is every rule's prefix
