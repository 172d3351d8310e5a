"""lint's settings in a project's ``pyproject.toml``, found as ruff finds its own.

    [tool.safe-layers]
    select = ["SL1", "SL2"]            # only these rule ids or prefixes (default: all)
    ignore = ["SL402"]                 # leave these out
    input-shapes = ["data=64,3,224,224"]

    [tool.safe-layers.per-file-ignores]
    "models/legacy/*.prototxt" = ["SL201"]

Each linted file takes the nearest ``pyproject.toml`` with a ``[tool.safe-layers]`` table
in its own folder or a folder above it; a file with none above it takes the one found from
the working directory up (standard input, too); ``--config PATH`` names one for every
file. A ``pyproject.toml`` without the table is passed over, as ruff passes over one
without ``[tool.ruff]``. On the command line, ``--select`` replaces the file's ``select``,
``--ignore`` adds to its ``ignore`` and ``--input-shape`` wins over its shape of the same
name. A per-file-ignores pattern is a shell glob (``*`` crosses folders) matched against
the file's path relative to the ``pyproject.toml``'s folder and against its name alone.
"""

import fnmatch
import os
import re

from safe_layers.core.errors import InputError
from safe_layers.readers import netshapes
from safe_layers.tools import findings

FILE_NAME = "pyproject.toml"
KEYS = ("select", "ignore", "input-shapes", "per-file-ignores")
_TABLE = re.compile(r"^\s*\[\s*tool\s*\.\s*(\"safe-layers\"|'safe-layers'|safe-layers)\s*[.\]]", re.M)


class LintConfig:
    """The settings of one ``pyproject.toml`` (``path`` None: the defaults): ``select``
    and ``ignore`` (rule ids or prefixes; select None for all), ``input_shapes``
    ({name: shape}) and ``per_file_ignores`` ([(glob, [ids])])."""

    def __init__(self, path=None, select=None, ignore=(), input_shapes=None, per_file_ignores=()):
        self.path = path
        self.root = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
        self.select = select
        self.ignore = list(ignore)
        self.input_shapes = dict(input_shapes or {})
        self.per_file_ignores = list(per_file_ignores)

    def ignored_in(self, path):
        """The rule ids or prefixes per-file-ignores leaves out of ``path``'s findings."""
        absolute = os.path.abspath(path)
        relative = os.path.relpath(absolute, self.root).replace(os.sep, "/")
        name = os.path.basename(absolute)
        ignored = []
        for pattern, rules in self.per_file_ignores:
            if fnmatch.fnmatchcase(relative, pattern) or fnmatch.fnmatchcase(name, pattern):
                ignored.extend(rules)
        return ignored


def has_table(path):
    """Whether the ``pyproject.toml`` at ``path`` has a ``[tool.safe-layers]`` table (read
    as text first, so that a Python without a TOML reader passes over the others)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return False
    return bool(_TABLE.search(text)) and _table(_parse(path, text), path) is not None


def find(start):
    """The nearest ``pyproject.toml`` with a ``[tool.safe-layers]`` table in folder
    ``start`` or above it, or None."""
    folder = os.path.abspath(start)
    while True:
        candidate = os.path.join(folder, FILE_NAME)
        if os.path.isfile(candidate) and has_table(candidate):
            return candidate
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def load(path, known):
    """The :class:`LintConfig` of the ``pyproject.toml`` at ``path``; InputError (exit 2)
    naming the file and the key for what lint cannot use (``known``: lint's rule ids)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise InputError("--config %s: no such file" % path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError("%s: cannot read: %s" % (path, getattr(exc, "strerror", None) or exc)) from None
    table = _table(_parse(path, text), path)
    if table is None:
        raise InputError("%s: no [tool.safe-layers] table in it" % path)
    unknown = [key for key in table if key not in KEYS]
    if unknown:
        raise InputError("%s: [tool.safe-layers] %s: no such setting (lint reads %s)"
                         % (path, ", ".join(unknown), ", ".join(KEYS)))
    select = _rules(table, "select", path, known) if "select" in table else None
    ignore = _rules(table, "ignore", path, known) if "ignore" in table else []
    shapes = _strings(table, "input-shapes", path)
    try:
        input_shapes = netshapes.parse_input_shapes(shapes)
    except ValueError as exc:
        raise InputError("%s: [tool.safe-layers] input-shapes: %s"
                         % (path, str(exc).replace("--input-shape ", ""))) from None
    per_file = table.get("per-file-ignores", {})
    if not isinstance(per_file, dict):
        raise InputError("%s: [tool.safe-layers] per-file-ignores: expected a table of "
                         "\"GLOB\" = [\"SL201\", ...]" % path)
    per_file_ignores = [(pattern, _rules(per_file, pattern, path, known, "per-file-ignores "))
                        for pattern in per_file]
    return LintConfig(path, select, ignore, input_shapes, per_file_ignores)


def _parse(path, text):
    try:
        import tomllib
    except ImportError:  # Python < 3.11: tomli is the same parser
        try:
            import tomli as tomllib
        except ImportError:
            raise InputError("%s: reading its [tool.safe-layers] table on Python < 3.11 needs "
                             "tomli: pip install tomli" % path) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError("%s: not valid TOML: %s" % (path, exc)) from None


def _table(document, path):
    tool = document.get("tool")
    table = tool.get("safe-layers") if isinstance(tool, dict) else None
    if table is not None and not isinstance(table, dict):
        raise InputError("%s: tool.safe-layers is not a table" % path)
    return table


def _strings(table, key, path, prefix=""):
    value = table.get(key, [])
    if isinstance(value, str) or not isinstance(value, list) or \
            not all(isinstance(item, str) for item in value):
        raise InputError("%s: [tool.safe-layers] %s%s: expected a list of strings, as [\"%s\"]"
                         % (path, prefix, key, "SL201" if key != "input-shapes" else "data=64,3,224,224"))
    return value


def _rules(table, key, path, known, prefix=""):
    rules = _strings(table, key, path, prefix)
    try:
        return findings.rule_list(",".join(rules), known=known, option="%s%s" % (prefix, key))
    except InputError as exc:
        raise InputError("%s: [tool.safe-layers] %s" % (path, exc)) from None
