"""``harden --strip``: the stock net back from a hardened one. The guards and clips harden
wrote (recognised as re-hardening recognises them) are taken out, and each swap is undone
from the comments it kept in the layer, so that a file that was only hardened comes back
byte for byte; what harden did not write is named, or with ``hand_written`` removed (a
guard, a clip) or rebuilt from its param_str (a StableBatchNorm, a SafeInfogainLoss)."""

import json
import re

import yaml

from safe_layers.core.errors import InputError
from safe_layers.core.float_text import exact_short
from safe_layers.readers import prototxt
from safe_layers.tools.harden.hardener import shortened
from safe_layers.tools.harden.param_strings import HardenedLayer, is_safe_guard, param_str
from safe_layers.tools.harden.swaps import batch_norm_keys, infogain_keys
from safe_layers.tools.harden.text_edits import (KEPT_INLINE, KEPT_LINES, SWAP_HEADER, apply_edits,
                                                 indent_unit, is_crlf, line_span, prototxt_string,
                                                 removal)

# Each drop-in harden swaps in: (its --swap word, the stock type, the line the swap adds
# besides python_param, the stock fields its param_str keys come from).
SWAPPED = {
    "StableBatchNorm": ("batchnorm", "BatchNorm", r"param \{ lr_mult: 0 \}"),
    "SafeInfogainLoss": ("infogain", "InfogainLoss", r"loss_weight: 1"),
}
_HEADER = re.compile(re.escape(SWAP_HEADER).replace("%s", "(?P<kind>batchnorm|infogain)") + "(?P<literal>.*)")
_COMMENT = re.compile(r"#[^\n]*")
# The keys of each drop-in's param_str that a stock field holds (others: no way back).
_BATCH_NORM_FIELDS = ("use_global_stats", "moving_average_fraction", "eps")
_INFOGAIN_FIELDS = {"source": "infogain_loss_param", "axis": "infogain_loss_param",
                    "ignore_label": "loss_param", "normalization": "loss_param"}
_OWN_KEYS = ("name", "follows", "iter_size")


def line_start(text, position):
    return text.rfind("\n", 0, position) + 1


def line_end(text, position):
    """One past the line end of the line at ``position`` (the text's end on its last line)."""
    newline = text.find("\n", position)
    return newline + 1 if newline >= 0 else len(text)


def comments(text, node):
    """[(offset, comment without its line end)] in the block ``node`` between its fields."""
    found, position = [], node.value_start + 1
    for start, end in [(c.start, c.end) for c in node.children] + [(node.value_end - 1, None)]:
        for match in _COMMENT.finditer(text, position, start):
            found.append((match.start(), match.group().rstrip("\r")))
        position = end
    return found


class Stripper:
    """Plans and applies the edits that take harden's work out of one net's text."""

    def __init__(self, net, hand_written=False):
        self.net, self.hand_written = net, hand_written
        self.pairs = [(layer, node) for layer, node in net.layers() if node.name == "layer"]
        self.edits = []  # (start, end, text), each applied as it is (its own line ends)
        self.removed = []  # (kind, name): harden's guards and clips taken out
        self.undone = []  # (kind, name): harden's swaps undone from their kept text
        self.by_hand = []  # (kind, name, what became of it)
        self.crlf = is_crlf(net.text)

    # ---- guards and clips ----------------------------------------------------------------

    def _plan_guards(self):
        for layer, node in self.pairs:
            if not is_safe_guard(layer):
                continue
            kind = layer.python_param.layer
            if HardenedLayer.of(layer) is not None:
                self.edits.append(self._native(removal(self.net.text, node)))
                self.removed.append((kind, layer.name))
            elif self.hand_written:
                self.edits.append(self._native(removal(self.net.text, node)))
                self.by_hand.append((kind, layer.name, "removed"))
            else:
                self.by_hand.append((kind, layer.name, None))

    def _native(self, edit):
        """An edit whose text is in the file's line ends."""
        start, end, new = edit
        if self.crlf:
            new = new.replace("\r\n", "\n").replace("\n", "\r\n")
        return (start, end, new)

    # ---- swaps ---------------------------------------------------------------------------

    def _plan_swaps(self):
        for layer, node in self.pairs:
            if layer.type != "Python" or layer.python_param.module != "safe_layers" \
                    or layer.python_param.layer not in SWAPPED:
                continue
            kind = layer.python_param.layer
            edits, why = self._undo(layer, node)
            if edits is not None:
                self.edits.extend(edits)
                self.undone.append((kind, layer.name))
                continue
            if self.hand_written:
                edits, why = self._rebuild(layer, node, why)
                if edits is not None:
                    self.edits.extend(edits)
                    self.by_hand.append((kind, layer.name, "rebuilt as %s from its param_str (%s)"
                                         % (SWAPPED[kind][1], why)))
                    continue
            self.by_hand.append((kind, layer.name, why))

    def _undo(self, layer, node):
        """(edits that give back the layer harden swapped, None), or (None, why not):
        the swap's header and lines as harden writes them, its kept text, and a
        param_str that is what the kept text gives (not edited since)."""
        text, (word, _, added) = self.net.text, SWAPPED[layer.python_param.layer]
        found = comments(text, node)
        headers = [(p, m) for p, m in ((p, _HEADER.match(c)) for p, c in found) if m]
        if len(headers) != 1 or headers[0][1].group("kind") != word:
            return None, "no record of a harden swap in it"
        (at, header), python_param = headers[0], node.children[-1]
        if python_param.name != "python_param" or len(node.all("python_param")) != 1 \
                or at > python_param.start:
            return None, "its python_param is not where harden writes it"
        after = text[python_param.end:node.value_end - 1]
        if "\n" in after:  # its own lines: from the header's line to python_param's
            span = (line_start(text, at), line_end(text, python_param.end))
            between = text[line_end(text, at):line_start(text, python_param.start)]
            form = re.fullmatch(r"[ \t]*\r?\n[ \t]*", after) and not text[span[0]:at].strip() \
                and re.fullmatch(r"(?:[ \t]*%s\r?\n)*" % added, between) \
                and not text[line_start(text, python_param.start):python_param.start].strip()
        else:  # on the closing brace's line: " # header\n<fields> python_param {...} "
            span = (at - 1, python_param.end + 1)
            between = text[line_end(text, at):python_param.start]
            form = after == " " and text[at - 1] == " " and re.fullmatch(r"(?:%s )*" % added, between)
        if not form:
            return None, "its lines are not those harden writes"
        type_node = node.find("type")
        edits = [span + ("",), (type_node.value_start, type_node.value_end, header.group("literal"))]
        kept = []
        for position, comment in found:
            for marker, start in ((KEPT_LINES, line_start(text, position)), (KEPT_INLINE, position)):
                if comment.startswith(marker):
                    try:
                        original = json.loads(comment[len(marker):])
                    except ValueError:
                        return None, "its kept text is not as harden writes it"
                    edits.append((start, line_end(text, position), original))
                    kept.append(original)
        expected = self._param_str(layer, "\n".join(kept))
        if expected != layer.python_param.param_str:
            return None, "its param_str was edited after the swap"
        return edits, None

    def _param_str(self, layer, kept):
        """The param_str harden writes for the stock layer whose fields are ``kept``, with
        the follows, iter_size and input of the layer's own (they come from the net)."""
        try:
            stock = prototxt.parse_text(kept, "LayerParameter", self.net.path, unknown_fields=True)
            live = yaml.safe_load(layer.python_param.param_str)
        except (InputError, yaml.YAMLError):
            return None
        if not isinstance(live, dict):
            return None
        pairs = [("name", layer.name)] + ([("follows", live["follows"])] if "follows" in live else [])
        if layer.python_param.layer == "StableBatchNorm":
            pairs += batch_norm_keys(stock.batch_norm_param)
        else:
            pairs += infogain_keys(stock.infogain_loss_param, stock.loss_param)
            if live.get("input") == "probabilities":
                pairs.append(("input", "probabilities"))
        return param_str(pairs, live.get("iter_size"))

    # ---- rebuilt from the param_str (asked for) --------------------------------------------

    def _rebuild(self, layer, node, why):
        """(edits that make the drop-in its stock layer from its param_str, note), or
        (None, why not): the swap's comments go, its lines and params stay."""
        try:
            live = yaml.safe_load(layer.python_param.param_str or "{}")
        except yaml.YAMLError:
            return None, why + "; its param_str does not parse"
        kind = layer.python_param.layer
        fields = _BATCH_NORM_FIELDS if kind == "StableBatchNorm" else tuple(_INFOGAIN_FIELDS)
        extra = sorted(k for k in (live if isinstance(live, dict) else {"?": 0})
                       if k not in fields + _OWN_KEYS + ("input",))
        if extra or len(node.all("python_param")) != 1:
            return None, "%s; %s has no field for %s" % (why, SWAPPED[kind][1], ", ".join(extra) or "it")
        text, ind = self.net.text, indent_unit(self.net.text, self.net.layers())
        type_node, python_param = node.find("type"), node.find("python_param")
        edits = [(type_node.value_start, type_node.value_end, '"%s"' % SWAPPED[kind][1])]
        for position, comment in comments(text, node):
            if _HEADER.match(comment) or comment.startswith((KEPT_LINES, KEPT_INLINE)):
                start = line_start(text, position)
                whole = not text[start:position].strip()
                end = line_end(text, position) if whole else position + len(comment)
                edits.append((start if whole else position, end, ""))
        blocks = {}
        for key in fields:
            if key in live:
                value = live[key]
                field = "batch_norm_param" if kind == "StableBatchNorm" else _INFOGAIN_FIELDS[key]
                written = (str(value).lower() if isinstance(value, bool) else prototxt_string(value)
                           if key == "source" else exact_short(value) if isinstance(value, float)
                           else str(value))
                blocks.setdefault(field, []).append("%s: %s" % (key, written))
        start, end = line_span(text, python_param)
        if (start, end) == (python_param.start, python_param.end):  # shares its line
            new = " ".join("%s { %s }" % (f, " ".join(v)) for f, v in blocks.items())
        else:
            first = text[start:python_param.start]
            new = "".join("%s%s {\n%s%s}\n" % (first, f, "".join("%s%s%s\n" % (first, ind, l) for l in v), first)
                          for f, v in blocks.items())
        edits.append(self._native((start, end, new)))
        note = why
        if live.get("input") == "probabilities":
            note += "; input: probabilities has no InfogainLoss field: InfogainLoss applies its own softmax"
        return edits, note

    # ---- apply ---------------------------------------------------------------------------

    def strip(self):
        """The stripped text (the input text itself when nothing harden wrote is in it)."""
        self._plan_guards()
        self._plan_swaps()
        text = apply_edits(self.net.text, self.edits, raw=True)
        if self.edits:
            # Never hand out a file Caffe cannot read (a fork's fields, kept in a swap's
            # comment, are back as they were: read as harden reads the input).
            prototxt.parse_text(text, "NetParameter", self.net.path + " (stripped)",
                                unknown_fields=True)
        return text

    def summary(self):
        """The lines for stderr: what was taken out, undone and left in place."""
        counts = {}
        for kind, _ in self.removed:
            counts[kind] = counts.get(kind, 0) + 1
        parts = ["%d NaNGuard and %d GradientClip removed" % (counts.get("NaNGuard", 0),
                                                              counts.get("GradientClip", 0))]
        lines = []
        if self.removed:
            lines.append("  - %s" % shortened(["%s %s" % kn for kn in self.removed], 6))
        for kind, (_, stock, _) in SWAPPED.items():
            names = [name for k, name in self.undone if k == kind]
            if names:
                parts.append("%d %s -> %s" % (len(names), kind, stock))
                lines.append("  ~ %s -> %s (the text harden kept): %s" % (kind, stock, shortened(names)))
        for kind, name, what in self.by_hand:
            if what == "removed":
                lines.append("  - %s %s removed (written by hand: --strip-hand-written)" % (kind, name))
            elif what and what.startswith("rebuilt"):
                lines.append("  ~ %s %s %s" % (kind, name, what))
        left = [(kind, name, why) for kind, name, why in self.by_hand
                if not why or not (why == "removed" or why.startswith("rebuilt"))]
        if left:
            lines.append("  = left in place (harden did not write them, or they were edited since; "
                         "--strip-hand-written %s): %s"
                         % ("removes the guards and clips, rebuilds the drop-ins from their param_str",
                            shortened(["%s %s%s" % (k, n, " (%s)" % w if w else "") for k, n, w in left], 6)))
        head = "harden --strip %s: %s" % (self.net.path, ", ".join(parts))
        if not self.edits:
            head += "; nothing to strip (no block harden wrote)"
        return [head] + lines
