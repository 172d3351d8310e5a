"""Byte-preserving edits of a prototxt's text: each edit is ``(start, end, new text)`` on
the original text, placed so that every byte around it stays as it was (comments,
formatting, line ends), and applied all at once by :func:`apply_edits`.

A swap keeps what it takes out of a layer in comments that ``harden --strip`` reads back
(:func:`kept_edit`, :func:`swap_insertion`): the original bytes, JSON-escaped on one line."""

import json

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def prototxt_string(text):
    """``text`` as a double-quoted prototxt string literal (Caffe's text_format reads
    back exactly ``text``): C escapes for the quote, the backslash and every control
    character (a raw line end inside a literal does not parse)."""
    return '"%s"' % "".join(_ESCAPES.get(ch) or ("\\%03o" % ord(ch) if ord(ch) < 32 or ord(ch) == 127
                                                 else ch) for ch in str(text))


def line_end_at(text, position):
    """The length of the line end (LF or CRLF) at ``position``, 0 if none: an empty line
    starts there."""
    if text.startswith("\r\n", position):
        return 2
    return 1 if text.startswith("\n", position) else 0


def blank_line_before(text, start):
    """The length of the empty line (its line end) just before ``start``, a line start;
    0 when the line before is not empty."""
    for end in ("\r\n", "\n"):
        before = start - len(end)
        if before >= 0 and text.startswith(end, before) and (
                before == 0 or text[before - 1] == "\n"):
            return len(end)
    return 0


def indent_unit(text, pairs):
    """The file's indentation unit, read from the first multi-line layer block."""
    for _, node in pairs:
        if node.children and node.children[0].line > node.line:
            child = node.children[0]
            start = text.rfind("\n", 0, child.start) + 1
            return text[start:child.start] or "  "
    return "  "


def layer_block(name, blobs, rules, kind, param_str, ind):
    """A ``layer { ... }`` block of a safe_layers Python layer ``kind`` in place on
    ``blobs``, with the include/exclude ``rules`` of the layer it follows."""
    lines = ["layer {", '%sname: %s' % (ind, prototxt_string(name)), '%stype: "Python"' % ind]
    lines += ['%sbottom: %s' % (ind, prototxt_string(b)) for b in blobs]
    lines += ['%stop: %s' % (ind, prototxt_string(b)) for b in blobs]
    lines += ["%s%s" % (ind, r) for r in rules]
    lines += ["%spython_param {" % ind, '%s%smodule: "safe_layers"' % (ind, ind),
              '%s%slayer: "%s"' % (ind, ind, kind),
              '%s%sparam_str: %s' % (ind, ind, prototxt_string(param_str)), "%s}" % ind, "}"]
    return "\n".join(lines) + "\n"


def python_param_lines(kind, param_str, ind):
    return ["python_param {", '%smodule: "safe_layers"' % ind, '%slayer: "%s"' % (ind, kind),
            '%sparam_str: %s' % (ind, prototxt_string(param_str)), "}"]


def rules_text(layer):
    """The layer's include/exclude rules, one ``include { ... }`` line each."""
    from google.protobuf import text_format
    out = []
    for field in ("include", "exclude"):
        for rule_message in getattr(layer, field):
            out.append("%s { %s }" % (field, text_format.MessageToString(rule_message, as_one_line=True)))
    return out


def insert_after(text, node, blocks):
    """An edit that puts ``blocks`` on the lines after ``node``.

    Where the file separates its blocks by a blank line, each inserted block is
    preceded by one: inserting blocks one run at a time gives the text inserting them
    at once gives (a guard now, its clip on a later run), and :func:`removal` undoes
    exactly one block's insertion."""
    newline = text.find("\n", node.end)
    rest = text[node.end:newline if newline >= 0 else len(text)]
    if rest.strip() and not rest.strip().startswith("#"):  # more fields on its line
        return (node.end, node.end, "\n" + "".join(blocks))
    if newline < 0:  # the last line, without a line end
        return (len(text), len(text), "\n" + "".join(blocks))
    position = newline + 1
    separator = "\n" if line_end_at(text, position) else ""
    return (position, position, "".join(separator + block for block in blocks))


def removal(text, node):
    """The edit that removes a block :func:`insert_after` inserted: its lines, and
    the blank line before it where one is after it too."""
    start, end = line_span(text, node)
    if (start, end) == (node.start, node.end):  # not alone on its lines: the block itself
        return (start, end, "")
    blank = blank_line_before(text, start)
    if line_end_at(text, end) and blank:
        start -= blank
    return (start, end, "")


def line_span(text, node):
    """The span that removes ``node``: its whole line(s) when nothing else is on them."""
    line_start = text.rfind("\n", 0, node.start) + 1
    newline = text.find("\n", node.end)
    line_end = newline + 1 if newline >= 0 else len(text)
    before = text[line_start:node.start]
    after = text[node.end:line_end]
    if not before.strip() and (not after.strip() or after.strip().startswith("#")):
        return line_start, line_end
    return node.start, node.end


# The comments a swap writes into the layer it swaps: what it took out (whole lines, or a
# field that shared its line with others), and where its own lines start (the original
# type's literal after it). Caffe's parser skips comments (google/protobuf/io/tokenizer.cc).
KEPT_LINES = "# kept for harden --strip: "
KEPT_INLINE = "# kept inline for harden --strip: "
SWAP_HEADER = "# harden --swap %s (harden --strip undoes it): type: "


def kept_edit(text, node):
    """The edit that replaces the field ``node`` by a comment holding its exact text:
    its whole lines by one line (``KEPT_LINES``, at the field's indentation); a field that
    shares its line by ``KEPT_INLINE`` and a line end (a comment runs to the line end)."""
    start, end = line_span(text, node)
    kept = json.dumps(text[start:end])
    if (start, end) == (node.start, node.end):
        return (start, end, "%s%s\n" % (KEPT_INLINE, kept))
    first = text[start:end]
    indent = first[:len(first) - len(first.lstrip(" \t"))]
    return (start, end, "%s%s%s\n" % (indent, KEPT_LINES, kept))


def swap_insertion(text, node, kind, lines, ind):
    """The edit that adds a swap's ``lines`` at the end of the layer block ``node``,
    after its header (``SWAP_HEADER`` and the type's literal as written): on lines of
    their own before a closing brace alone on its line, else the header ends the line of
    the closing brace and the fields follow on the next, the brace after them."""
    type_node = node.find("type")
    header = SWAP_HEADER % kind + text[type_node.value_start:type_node.value_end]
    position, own_line = _closing(text, node)
    if own_line:
        return (position, position, "".join("%s%s\n" % (ind, l) for l in [header] + lines))
    return (position, position, " %s\n%s " % (header, " ".join(lines)))


def _closing(text, node):
    """(position, own_line): where a field goes at the end of a layer block."""
    close = node.end - 1  # the '}'
    line_start = text.rfind("\n", 0, close) + 1
    if not text[line_start:close].strip():
        return line_start, True
    return close, False


def type_edit(node):
    """The edit that makes the layer block ``node`` a ``type: "Python"`` layer."""
    type_node = node.find("type")
    return (type_node.value_start, type_node.value_end, '"Python"')


def is_crlf(text):
    """Whether ``text`` has Windows line ends (most of its lines end in CRLF)."""
    return text.count("\r\n") * 2 > text.count("\n")


def apply_edits(text, edits, raw=False):
    """``text`` with every edit made, in LF or CRLF as the file is (``raw``: each edit's
    text as it is, its line ends included)."""
    # A file with Windows line ends gets them in what is inserted too.
    crlf = is_crlf(text) and not raw
    # Apply from the end so earlier offsets stay valid; at one offset, in plan order.
    order = sorted(range(len(edits)), key=lambda k: (edits[k][0], k), reverse=True)
    for k in order:
        start, end, new = edits[k]
        if crlf:
            new = new.replace("\r\n", "\n").replace("\n", "\r\n")
        text = text[:start] + new + text[end:]
    return text
