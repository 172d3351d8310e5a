"""Typed ``param_str`` schemas for the Python layers.

Every layer reads its ``python_param { param_str: "..." }`` as YAML into a
:class:`Params` object described by a :class:`Schema`. Anything a schema does not
allow (an unknown key, a wrong type, a value out of range) raises
:class:`ParamError` from the layer's ``setup``, i.e. while Caffe builds the net,
with the layer type, the key, the bad value and what is allowed.
"""

import math
import reprlib
import struct
from types import SimpleNamespace

import yaml

from safe_layers.core.float_text import shortest

# Every number a layer reads ends up in float32 blobs or in Caffe's int32 fields, so every
# numeric key is bounded: floats within +-FLT_MAX (and not so small that float32 rounds them
# to 0), integers within int32, unless a field sets tighter bounds.
# 3.4028235e+38 is the shortest decimal that float32 reads as its largest finite value.
FLOAT32_MAX = 3.4028235e+38
INT32_MIN, INT32_MAX = -2 ** 31, 2 ** 31 - 1


class ParamError(ValueError):
    """A ``param_str`` that the layer cannot accept."""


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               list: "a list"}


class Field:
    """One ``param_str`` key.

    Args:
        name (str): the key.
        kind (type): bool, int, float, str or list. YAML integers are accepted for float
            fields; booleans are never accepted as numbers.
        default: the value when the key is absent (``None`` means "not set").
        doc (str): one line for the schema's documentation.
        choices (tuple, optional): the only allowed values.
        low, high (number, optional): inclusive bounds; ``low_open``/``high_open`` make
            them exclusive. Numbers are always bounded: floats default to +-FLOAT32_MAX,
            integers to the int32 range.
        item_kind (type, optional): for lists, the type of each item.
    """

    def __init__(self, name, kind, default, doc, choices=None, low=None, high=None,
                 low_open=False, high_open=False, item_kind=None):
        self.name = name
        self.kind = kind
        self.default = default
        self.doc = doc
        self.choices = tuple(choices) if choices is not None else None
        if kind is float:
            low = -FLOAT32_MAX if low is None else low
            high = FLOAT32_MAX if high is None else high
        elif kind is int:
            low = INT32_MIN if low is None else low
            high = INT32_MAX if high is None else high
        self.low, self.high = low, high
        self.low_open, self.high_open = low_open, high_open
        self.item_kind = item_kind

    def allowed(self):
        """What this key accepts, in words, for error messages and docs."""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        text = _TYPE_NAMES[self.kind]
        if self.kind is list and self.item_kind is not None:
            text += " of " + _TYPE_NAMES[self.item_kind].split(" ", 1)[1] + "s"
        bounds = []
        if self.low is not None:
            bounds.append("%s %s" % (">" if self.low_open else ">=", _number_text(self.low)))
        if self.high is not None:
            bounds.append("%s %s" % ("<" if self.high_open else "<=", _number_text(self.high)))
        if bounds:
            text += " " + " and ".join(bounds)
        return text

    def convert(self, value):
        """Return ``value`` as this field's type, or ``None`` where it is not allowed."""
        return self.check(value)[0]

    def check(self, value):
        """(converted value, None), or (None, why it is not allowed beyond :meth:`allowed`)."""
        if value is None:
            return None, ""
        if self.kind is list:
            if not isinstance(value, list):
                return None, ""
            if self.item_kind is None:
                return value, None
            items = [_scalar(self.item_kind, v) for v in value]
            return (None, "") if any(v is None for v in items) else (items, None)
        value = _scalar(self.kind, value)
        if value is None:
            return None, ""
        if self.choices is not None and value not in self.choices:
            return None, ""
        if self.kind in (int, float):
            if self.kind is float and math.isnan(value):
                return None, ""
            if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
                return None, ""
            if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
                return None, ""
            if self.kind is float and value != 0 and _float32(value) == 0:
                return None, " (float32 rounds it to 0)"
        return value, None


def _float32(value):
    return struct.unpack("f", struct.pack("f", value))[0]


def _number_text(value):
    return shortest(value) if isinstance(value, float) else str(value)


def _scalar(kind, value):
    if isinstance(value, bool):
        return value if kind is bool else None
    if kind is float and isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float
            return float("inf") if value > 0 else float("-inf")
    if kind is float and isinstance(value, str):
        # PyYAML reads 1e4 (no '+' or '.') as a string; Caffe users write it anyway.
        try:
            return float(value)
        except ValueError:
            return None
    if kind is int and isinstance(value, int):
        return value
    if kind is str and isinstance(value, str):
        return value
    return None


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, noting keys given twice (YAML itself keeps the last silently)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates = []


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in seen and key not in loader.duplicates:
                loader.duplicates.append(key)
            seen.add(key)
        except TypeError:
            pass  # an unhashable key: construct_mapping says so itself
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# A param_str holds a few keys; past these bounds it is a mistake or an attack (a
# 420-byte document of nested aliases expands to gigabytes when printed).
MAX_PARAM_STR = 65536
MAX_YAML_DEPTH = 32

# Values echoed in error messages are cut to a few elements and characters: the message
# names the value, it does not reprint it.
_ECHO = reprlib.Repr()
_ECHO.maxstring = _ECHO.maxother = 80
_ECHO.maxlist = _ECHO.maxtuple = _ECHO.maxdict = _ECHO.maxset = 8
_ECHO.maxlevel = 3


def echo(value):
    """``repr(value)``, bounded in length and depth whatever ``value`` holds."""
    return _ECHO.repr(value)


class YamlRefused(ValueError):
    """A YAML document refused before it is built: aliases, nesting too deep."""


def _check_events(text):
    """Walk the document's events (PyYAML's parser is iterative; building the value is
    recursive and expands every alias) and refuse what no param_str needs."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise YamlRefused("uses a YAML alias (*%s); write the value itself" % event.anchor)
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise YamlRefused("nests mappings or lists deeper than %d" % MAX_YAML_DEPTH)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def load_yaml(text):
    """(value, keys given more than once) of a YAML document, with the safe loader.
    Raises :class:`YamlRefused` for aliases and deep nesting, YAMLError when it is not
    YAML."""
    _check_events(text)
    loader = _Loader(text)
    try:
        return loader.get_single_data(), loader.duplicates
    finally:
        loader.dispose()


class Params(SimpleNamespace):
    """The parsed parameters of one layer, as attributes."""

    def as_dict(self):
        return dict(vars(self))


class Schema:
    """The ``param_str`` keys one layer type accepts.

    Args:
        layer_type (str): the layer's class name, used in every error message.
        fields (list of Field): the keys.
        check (callable, optional): ``check(params)`` for rules that relate several keys;
            returns an error message or ``None``.
    """

    def __init__(self, layer_type, fields, check=None):
        self.layer_type = layer_type
        self.fields = {f.name: f for f in fields}
        self.check = check

    def error(self, message, name=None):
        """ParamError "<type> '<name>' param_str: <message>"; the name is left out when it
        is missing or the default (the type itself)."""
        default = self.fields["name"].default if "name" in self.fields else None
        named = name is not None and name != default
        where = "%s %r" % (self.layer_type, name) if named else self.layer_type
        return ParamError("%s param_str: %s" % (where, message))

    def parse(self, param_str):
        """Parse a ``param_str`` (YAML mapping; empty means all defaults) into Params."""
        text = param_str or ""
        if len(text) > MAX_PARAM_STR:
            raise self.error("is %d characters long; at most %d (a param_str holds a few keys): "
                             "%s" % (len(text), MAX_PARAM_STR, echo(text)))
        try:
            raw, duplicates = load_yaml(text) if text.strip() else ({}, [])
        except YamlRefused as exc:
            raise self.error("%s: %s" % (exc, echo(text))) from None
        except yaml.YAMLError as exc:
            raise self.error("is not valid YAML (%s): %s" % (str(exc).replace("\n", " "), echo(text))) from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise self.error("must be a YAML mapping such as \"key: value\", got %s" % echo(text))
        # pycaffe does not tell a layer its own name; name the layer by its `name` key.
        name = raw.get("name") if isinstance(raw.get("name"), str) else None
        if duplicates:
            raise self.error("key %s given more than once (YAML would silently keep the last "
                             "value); give each key once" % ", ".join(echo(k) for k in duplicates),
                             name)
        unknown = sorted(str(k) for k in raw if k not in self.fields)
        if unknown:
            raise self.error("unknown key %s; allowed keys: %s"
                             % (", ".join(echo(k) for k in unknown), ", ".join(sorted(self.fields))),
                             name)
        values = {}
        for key, field in self.fields.items():
            if key not in raw:
                values[key] = field.default
                continue
            converted, why = field.check(raw[key])
            if converted is None:
                raise self.error("key %r has value %s%s; allowed: %s"
                                 % (key, echo(raw[key]), why or "", field.allowed()), name)
            values[key] = converted
        params = Params(**values)
        if self.check is not None:
            problem = self.check(params)
            if problem:
                raise self.error(problem, name)
        return params

    def describe(self):
        """Markdown table of the keys, their defaults and what they allow (for the README)."""
        rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
        for f in self.fields.values():
            rows.append("| `%s` | `%s` | %s | %s |" % (f.name, f.default, f.allowed(), f.doc))
        return "\n".join(rows)


def reporting_fields():
    """The keys every reporting layer shares (see reporting.FaultLog.for_layer)."""
    return [
        Field("log_first", int, 5, "faults printed in full before the log switches to summaries", low=0),
        Field("iter_size", int, 1, "the solver's iter_size, to turn call counts into iterations", low=1),
    ]
