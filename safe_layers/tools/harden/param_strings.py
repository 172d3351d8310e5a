"""The param_str of the guards and clips harden writes, exactly as it writes them, and
:class:`HardenedLayer`, which tells such a layer from one written by hand (left alone)."""

import json
import re

from safe_layers.core.float_text import exact_short

LEVELS = ("observe", "repair", "strict")
GUARD_PARAMS = {
    "observe": "action: warn",
    "repair": "action: clamp, backward_action: zero",
    "strict": "action: abort",
}
# How the summary names a level's guard actions: "5 NaNGuard warn -> clamp/zero".
LEVEL_WORDS = {"observe": "warn", "repair": "clamp/zero", "strict": "abort"}
DEFAULT_MAX_NORM = 1000.0

_SCALAR = r"'(?:[^']|'')*'|\"(?:[^\"\\\\]|\\\\.)*\"|[^,{}'\"]+"  # what yaml_text writes

# The param_str harden writes, and nothing else: a guard or clip whose param_str is not
# exactly one of these (a key added, a value edited by hand) is the user's, left alone.
_OWN_PARAM_STR = {
    "NaNGuard": re.compile(r"\{name: (?P<name>%s), follows: (?P<follows>%s), " % (_SCALAR, _SCALAR) +
                           r"(?P<action>action: \w+(?:, backward_action: \w+)?)"
                           r"(?:, iter_size: (?P<iter_size>\d+))?\}\Z"),
    "GradientClip": re.compile(r"\{name: (?P<name>%s), follows: (?P<follows>%s), " % (_SCALAR, _SCALAR) +
                               r"mode: norm, max_norm: (?P<max_norm>[^,{}]+)"
                               r"(?:, iter_size: (?P<iter_size>\d+))?\}\Z"),
}
_LEVEL_OF_ACTION = {action: level for level, action in GUARD_PARAMS.items()}
_SUFFIX = {"NaNGuard": "guard", "GradientClip": "clip"}


# Values harden copies from the net (names, paths): plain in the YAML flow mapping when
# YAML reads them back as that very string, else single-quoted.
_TEXT_KEYS = ("name", "follows", "source")
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./\-]*\Z")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def yaml_text(value):
    """``value`` as a YAML scalar that reads back as this string: plain when safe
    (``conv1``, ``inception_3a/1x1``), single-quoted when it has no control character
    (``'fc, 1'``, ``'2'``), else double-quoted with escapes (a line end inside single
    quotes would be folded into a space; JSON's escapes are YAML's)."""
    value = str(value)
    if _PLAIN.match(value) and value.lower() not in _YAML_WORDS:
        return value
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return json.dumps(value)
    return "'%s'" % value.replace("'", "''")


def yaml_text_back(scalar):
    """The string :func:`yaml_text` wrote."""
    if len(scalar) >= 2 and scalar[0] == scalar[-1] == "'":
        return scalar[1:-1].replace("''", "'")
    if len(scalar) >= 2 and scalar[0] == scalar[-1] == '"':
        return json.loads(scalar)
    return scalar


def param_str(pairs, iter_size=None):
    """``{key: value, ...}`` as harden writes it (``iter_size`` last, when known)."""
    parts = ["%s: %s" % (k, yaml_text(v) if k in _TEXT_KEYS else v) for k, v in pairs]
    if iter_size is not None:
        parts.append("iter_size: %d" % iter_size)
    return "{%s}" % ", ".join(parts)


def guard_param_str(name, follows, level, iter_size=None):
    pairs = [("name", name), ("follows", follows)] + \
        [tuple(p.split(": ")) for p in GUARD_PARAMS[level].split(", ")]
    return param_str(pairs, iter_size)


def clip_param_str(name, follows, max_norm, iter_size=None):
    return param_str([("name", name), ("follows", follows), ("mode", "norm"),
                      ("max_norm", exact_short(max_norm))], iter_size)


def is_safe_guard(layer):
    """A NaNGuard or GradientClip of safe_layers, whoever wrote it."""
    return layer.type == "Python" and layer.python_param.module.split(".")[0] == "safe_layers" \
        and layer.python_param.layer in ("NaNGuard", "GradientClip")


class HardenedLayer:
    """A guard or clip harden wrote: its param_str is exactly one harden writes, naming the
    layer itself and the layer it follows (``<follows>_guard``, ``<follows>_clip_2``, ...)."""

    def __init__(self, kind, name, follows, level=None, max_norm=None, iter_size=None):
        self.kind, self.name, self.follows = kind, name, follows
        self.level, self.max_norm, self.iter_size = level, max_norm, iter_size

    @classmethod
    def of(cls, layer):
        """The HardenedLayer for ``layer``, or None when harden did not write it."""
        if not is_safe_guard(layer) or layer.python_param.module != "safe_layers" \
                or list(layer.bottom) != list(layer.top) or not layer.bottom:
            return None
        kind, text = layer.python_param.layer, layer.python_param.param_str
        match = _OWN_PARAM_STR[kind].match(text)
        if match is None:
            return None
        name, follows = yaml_text_back(match.group("name")), yaml_text_back(match.group("follows"))
        if name != layer.name or not re.match(re.escape(follows) + r"_%s(_\d+)?\Z" % _SUFFIX[kind],
                                              layer.name):
            return None
        iter_size = int(match.group("iter_size")) if match.group("iter_size") else None
        if kind == "NaNGuard":
            level = _LEVEL_OF_ACTION.get(match.group("action"))
            if level is None:
                return None
            own = cls(kind, layer.name, follows, level=level, iter_size=iter_size)
        else:
            try:
                max_norm = float(match.group("max_norm"))
            except ValueError:
                return None
            own = cls(kind, layer.name, follows, max_norm=max_norm, iter_size=iter_size)
        return own if own.param_str() == text else None

    def param_str(self):
        if self.kind == "NaNGuard":
            return guard_param_str(self.name, self.follows, self.level, self.iter_size)
        return clip_param_str(self.name, self.follows, self.max_norm, self.iter_size)
