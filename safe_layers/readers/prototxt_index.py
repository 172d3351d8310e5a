"""Where each field of a prototxt's text starts and ends: a lexer-level index (line,
column, byte offsets) of the structure protobuf's parse accepts, which protobuf's Python
parser does not keep. :mod:`safe_layers.readers.prototxt` pairs it with the parsed message;
harden edits the text through it without touching the bytes around an edit."""

import bisect
import re

from safe_layers.core.errors import InputError

# Blocks nested deeper than this are refused before protobuf sees them (a real net nests
# 4 deep; protobuf's C++ text parser stops at 100, its Python one at the interpreter's
# recursion limit, with a traceback).
MAX_DEPTH = 100


# ---------------------------------------------------------------------------------------
# Positions: a lexer-level index of the text's fields.

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<word>[A-Za-z0-9_.+\-]+)
  | (?P<symbol>[{}<>:\[\],;/])
""", re.VERBOSE)

_CLOSE = {"{": "}", "<": ">"}


class Node:
    """One field occurrence in a prototxt: ``name: value`` or ``name { ... }``.

    Attributes:
        name (str): the field name as written.
        start, end (int): offsets into the text of the field's first character (its name)
            and one past its last (the value, or the closing brace).
        line, col (int): 1-based position of the name.
        value (str or None): a scalar's value as written (a string literal unquoted and
            unescaped, adjacent literals joined); None for a message.
        value_start, value_end (int): offsets of the value token(s) (for a message: of the
            braces, closing brace included).
        children (list of Node): a message's fields, in order.
        depth (int): 0 for a top-level field.
    """

    __slots__ = ("name", "start", "end", "line", "col", "value", "value_start", "value_end",
                 "children", "depth")

    def __init__(self, name, start, line, col, depth):
        self.name, self.start, self.line, self.col, self.depth = name, start, line, col, depth
        self.end = self.value_start = self.value_end = start
        self.value = None
        self.children = []

    @property
    def is_message(self):
        return self.value is None

    def all(self, name):
        """The direct children named ``name``, in order."""
        return [child for child in self.children if child.name == name]

    def find(self, dotted):
        """The first node at ``a.b.c`` below this one (first occurrence at each step), or None."""
        node = self
        for part in dotted.split("."):
            matches = node.all(part)
            if not matches:
                return None
            node = matches[0]
        return node

    def __repr__(self):
        return "Node(%s @%d:%d)" % (self.name, self.line, self.col)


class LineIndex:
    """1-based (line, column) of any offset in one text, each in O(log lines): the line
    starts are found once (counting newlines from the start for every field made reading
    a 32k-layer net quadratic)."""

    def __init__(self, text):
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def line_col(self, offset):
        line = bisect.bisect_right(self.starts, offset)
        return line, offset - self.starts[line - 1] + 1


class _Lexer:
    def __init__(self, text, path):
        self.tokens = []  # (kind, text, start, end)
        self.lines = LineIndex(text)
        pos = 0
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if match is None:
                line, col = self.lines.line_col(pos)
                raise InputError("%s:%d:%d: unexpected character %r" % (path, line, col, text[pos]))
            kind = match.lastgroup
            if kind not in ("space", "comment"):
                self.tokens.append((kind, match.group(), match.start(), match.end()))
            pos = match.end()
        self.i = 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else (None, None, None, None)

    def take(self):
        token = self.peek()
        self.i += 1
        return token


def line_col(text, offset):
    """1-based (line, column) of ``offset`` in ``text``."""
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _unquote(literal):
    body = literal[1:-1]
    # Protobuf text escapes are C escapes; Python's unicode_escape reads the same ones
    # for the ASCII text prototxts hold.
    try:
        return body.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError:
        return body


def index_text(text, path="<text>"):
    """The root Node (name '', depth -1) of ``text``'s fields. Raises InputError where
    the text is not structurally a prototxt (unbalanced braces, a value missing)."""
    lexer = _Lexer(text, path)
    root = Node("", 0, 1, 1, -1)
    _read_fields(lexer, root, None, text, path)
    root.end = len(text)
    return root


def _fail(text, path, offset, message):
    line, col = line_col(text, offset if offset is not None else len(text))  # once: it raises
    raise InputError("%s:%d:%d: %s" % (path, line, col, message))


def _read_fields(lexer, parent, closer, text, path):
    while True:
        kind, token, start, end = lexer.peek()
        if kind is None:
            if closer is not None:
                _fail(text, path, None, "end of file inside '%s { ... }': missing '%s'"
                      % (parent.name, closer))
            return
        if token == closer:
            return
        if kind == "symbol" and token == "[":  # an extension name: [pkg.ext]
            lexer.take()
            name_parts = []
            while lexer.peek()[1] not in ("]", None):
                name_parts.append(lexer.take()[1])
            if lexer.take()[1] != "]":
                _fail(text, path, start, "unclosed extension name")
            name = "[%s]" % "".join(name_parts)
        elif kind == "word":
            lexer.take()
            name = token
        else:
            _fail(text, path, start, "expected a field name, found %r" % token)
        line, col = lexer.lines.line_col(start)
        node = Node(name, start, line, col, parent.depth + 1)
        if node.depth >= MAX_DEPTH:
            raise InputError("%s:%d:%d: '%s' is nested deeper than %d blocks (no Caffe message "
                             "is; protobuf would give up with a recursion error)"
                             % (path, line, col, name, MAX_DEPTH))
        parent.children.append(node)
        if lexer.peek()[1] == ":":
            lexer.take()
        _read_value(lexer, node, text, path)
        if lexer.peek()[1] in (",", ";"):
            lexer.take()


def _read_value(lexer, node, text, path):
    kind, token, start, end = lexer.peek()
    if token in _CLOSE:
        lexer.take()
        node.value_start = start
        _read_fields(lexer, node, _CLOSE[token], text, path)
        _, _, _, close_end = lexer.take()
        node.end = node.value_end = close_end
        return
    if token == "[":  # a list of values (or of messages): name: [1, 2] / name [{..}, {..}]
        lexer.take()
        node.value_start = start
        values = []
        while lexer.peek()[1] != "]":
            if lexer.peek()[0] is None:
                _fail(text, path, start, "unclosed list for field '%s'" % node.name)
            if lexer.peek()[1] == ",":
                lexer.take()
                continue
            item = Node(node.name, lexer.peek()[2], *lexer.lines.line_col(lexer.peek()[2]),
                        node.depth)
            _read_value(lexer, item, text, path)
            values.append(item)
        _, _, _, close_end = lexer.take()
        node.children = values
        node.value = "[list]"
        node.end = node.value_end = close_end
        return
    if kind == "string":
        parts = []
        node.value_start = start
        while lexer.peek()[0] == "string":  # adjacent literals concatenate
            _, literal, _, end = lexer.take()
            parts.append(_unquote(literal))
        node.value = "".join(parts)
        node.end = node.value_end = end
        return
    if kind == "word":
        lexer.take()
        if token.startswith("-") and token == "-" and lexer.peek()[0] == "word":
            token += lexer.take()[1]  # "- 1"
        node.value = token
        node.value_start, node.end = start, lexer.tokens[lexer.i - 1][3]
        node.value_end = node.end
        return
    _fail(text, path, start, "field '%s' has no value" % node.name)
