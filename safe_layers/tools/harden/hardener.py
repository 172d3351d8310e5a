"""The hardening of one net's text: harden's own guards and clips moved to the level asked
for, the swaps, the new guards and clips; then the edits applied and checked."""

from safe_layers.core.errors import InputError
from safe_layers.core.float_text import exact_short
from safe_layers.readers import layer_types, prototxt
from safe_layers.readers.netshapes import caffe_tool
from safe_layers.tools.harden.param_strings import (DEFAULT_MAX_NORM, LEVEL_WORDS, LEVELS, HardenedLayer,
                                                    clip_param_str, guard_param_str,
                                                    is_safe_guard)
from safe_layers.tools.harden.placement import (INPUT_TYPES, existing, existing_loss_clip, matches,
                                                plan_loss_clips, plan_spots, run_after)
from safe_layers.tools.harden.swaps import swap_batch_norm, swap_infogain
from safe_layers.tools.harden.text_edits import (apply_edits, indent_unit, insert_after,
                                                 layer_block, prototxt_string, removal,
                                                 rules_text)

# Caffe's UpgradeNetInput turns net-level `input:` + `input_dim`/`input_shape` into an
# Input layer of this name when it loads the net: the name Caffe's log and reports use.
LEGACY_INPUT_LAYER = "input"


def shortened(items, most=8):
    """'a, b, c' or 'a, b, ... (12 in all)'."""
    items = list(items)
    if len(items) <= most:
        return ", ".join(items)
    return "%s, ... (%d in all)" % (", ".join(items[:most]), len(items))


class Hardener:
    """Plans and applies the edits to one net's text."""

    def __init__(self, net, level="observe", guards=(), default_guards=True, swaps=(), iter_size=None,
                 max_norm=None):
        if level not in LEVELS:
            raise ValueError("level %r; allowed: %s" % (level, ", ".join(LEVELS)))
        self.net, self.level, self.iter_size = net, level, iter_size
        # None: new clips get the default bound, harden's existing clips keep theirs.
        self.max_norm = max_norm
        self.guard_specs = [g.strip() for spec in guards for g in spec.split(",") if g.strip()]
        self.default_guards, self.swaps = default_guards, list(swaps)
        pairs = net.layers()
        if any(node.name == "layers" for _, node in pairs):
            raise InputError("%s uses the V1 'layers' format; upgrade it first with Caffe's own "
                             "tool (%s %s NEW.prototxt), then harden NEW.prototxt"
                             % (net.path, caffe_tool("upgrade_net_proto_text")
                                or "upgrade_net_proto_text", net.path))
        if not pairs:
            raise InputError("no layers in %s: nothing to harden" % net.path)
        self.pairs = pairs
        self.names = {layer.name for layer, _ in pairs}
        self._check_guard_specs()
        self.edits = []  # (start, end, text)
        self.log = []
        self.inserted = {"NaNGuard": 0, "GradientClip": 0}
        self.swapped = {}
        self.changed = []  # (kind, name, what): harden's own layers updated in place
        self.removed = []  # (kind, name, follows, why)
        self.by_hand = []  # (kind, name): safe_layers guards and clips harden did not write
        self.spots = 0  # the guard and clip spots asked for (inserted or already there)

    def _check_guard_specs(self):
        candidates = [layer for layer, _ in self.pairs if not is_safe_guard(layer)]
        for spec in self.guard_specs:
            if not any(matches(layer, spec) for layer in candidates):
                types = sorted({layer.type for layer in candidates})
                names = list(dict.fromkeys(layer.name for layer in candidates))
                raise InputError("--guard '%s' matches no layer of %s: no layer has that type and "
                                 "no layer name matches it (types: %s; names: %s)"
                                 % (spec, self.net.path, shortened(types, 12), shortened(names)))

    def _unique(self, base):
        name, n = base, 1
        while name in self.names:
            n += 1
            name = "%s_%d" % (base, n)
        self.names.add(name)
        return name

    # ---- guards and clips ----------------------------------------------------------------

    def _insert_inputs(self, ind):
        """The guard on net-level inputs (``input:`` + ``input_dim`` / ``input_shape``),
        before the first layer. Caffe builds them as an Input layer named ``input`` (only
        when a shape is declared: a bare ``input:`` is dropped, and its name is no blob)."""
        message = self.net.message
        if not self.default_guards or not len(message.input) or \
                not (len(message.input_shape) or len(message.input_dim)):
            return
        self.spots += 1
        blobs = [b for b in message.input if not existing(self.pairs, -1, b, "NaNGuard")]
        if not blobs:
            return
        name = self._unique("%s_guard" % LEGACY_INPUT_LAYER)
        block = layer_block(name, blobs, [], "NaNGuard",
                            guard_param_str(name, LEGACY_INPUT_LAYER, self.level, self.iter_size), ind)
        fields = [n for n in self.net.root.children if n.name in ("input", "input_dim", "input_shape")]
        last = max(fields, key=lambda n: n.end)
        first_layer = self.pairs[0][1]
        if last.end < first_layer.start:
            self.edits.append(insert_after(self.net.text, last, [block]))
        else:  # inputs declared after the layers: the guard still goes first
            text = self.net.text
            line_start = text.rfind("\n", 0, first_layer.start) + 1
            if text[line_start:first_layer.start].strip():
                self.edits.append((first_layer.start, first_layer.start, block))
            else:
                self.edits.append((line_start, line_start, block))
        self.inserted["NaNGuard"] += 1
        self.log.append("  + NaNGuard %s before the first layer on %s: the net's inputs (input + %s; "
                        "Caffe builds them as Input layer '%s')"
                        % (name, ", ".join(blobs), "input_shape" if len(message.input_shape) else "input_dim",
                           LEGACY_INPUT_LAYER))

    def _plan(self):
        """Where the guards and clips go: the spots, and the clips of the losses with
        several gradient blobs (repair, default placement)."""
        self.planned = plan_spots(self.pairs, self.level, self.default_guards, self.guard_specs)
        wanted = self.level == "repair" and self.default_guards
        self.loss_clips = plan_loss_clips(self.pairs) if wanted else []

    def _plan_guards(self):
        ind = indent_unit(self.net.text, self.pairs)
        self._insert_inputs(ind)
        for spot in self.planned:
            self.spots += 1
            layer, node = self.pairs[spot.index]
            blobs = [b for b in spot.blobs if not existing(self.pairs, spot.index, b, "NaNGuard")]
            blocks = []
            rules = rules_text(layer)
            if blobs:
                name = self._unique("%s_guard" % layer.name)
                blocks.append(layer_block(name, blobs, rules, "NaNGuard",
                                          guard_param_str(name, layer.name, self.level, self.iter_size), ind))
                self.inserted["NaNGuard"] += 1
                self.log.append("  + NaNGuard %s after %s on %s: %s"
                                % (name, layer.name, ", ".join(blobs), "; ".join(spot.reasons)))
            clip = spot.clip_blob
            if clip and not existing(self.pairs, spot.index, clip, "GradientClip"):
                name = self._unique("%s_clip" % layer.name)
                blocks.append(layer_block(name, [clip], rules, "GradientClip",
                                          clip_param_str(name, layer.name, self._max_norm(), self.iter_size), ind))
                self.inserted["GradientClip"] += 1
                self.log.append("  + GradientClip %s after %s on %s: L2 norm <= %s below the loss"
                                % (name, layer.name, clip, exact_short(self._max_norm())))
            if blocks:
                # After the guards and clips already there: a later run appends where an
                # earlier one stopped, in the order one run would have written.
                run = run_after(self.pairs, spot.index)
                anchor = run[-1][1] if run else node
                self.edits.append(insert_after(self.net.text, anchor, blocks))

    def _plan_loss_clips(self, ind):
        """One GradientClip right before each loss with several gradient blobs, over all of
        them (``<loss>_clip``, following the loss: in backward it takes what the loss sends
        down), after the guards planned at the same place (planned after them)."""
        for planned in self.loss_clips:
            self.spots += 1
            if existing_loss_clip(self.pairs, planned):
                continue
            loss = self.pairs[planned.index][0]
            name = self._unique("%s_clip" % loss.name)
            block = layer_block(name, planned.blobs, rules_text(loss), "GradientClip",
                                clip_param_str(name, loss.name, self._max_norm(), self.iter_size), ind)
            self.edits.append(insert_after(self.net.text, self.pairs[planned.index - 1][1], [block]))
            self.inserted["GradientClip"] += 1
            self.log.append("  + GradientClip %s before %s on %s: one L2 norm <= %s over the %d gradients "
                            "the loss sends down (their direction kept)"
                            % (name, loss.name, ", ".join(planned.blobs), exact_short(self._max_norm()),
                               len(planned.blobs)))

    def _max_norm(self):
        return self.max_norm if self.max_norm is not None else DEFAULT_MAX_NORM

    def _superseded(self, index, layer):
        """Why harden's own single-blob clip at ``index`` goes at repair, or None: its blob
        is one of a loss's several predictions, now clipped with the others by one norm
        (the form an earlier harden wrote, which clipped bottom 0 alone)."""
        if len(layer.bottom) != 1:
            return None
        blob = layer.bottom[0]
        for planned in self.loss_clips:
            if blob in planned.blobs:
                writer = index
                while writer >= 0 and is_safe_guard(self.pairs[writer][0]):
                    writer -= 1
                if any(spot.index == writer and spot.clip_blob == blob for spot in self.planned):
                    return None  # a loss of one prediction still wants it
                return "loss '%s' clips %s with one norm" % (self.pairs[planned.index][0].name,
                                                             ", ".join(planned.blobs))
        return None

    def _plan_own(self):
        """Harden's own guards and clips, moved to this run's level (and iter_size /
        max_norm, when given); the others' names for the summary."""
        for index, (layer, node) in enumerate(self.pairs):
            if not is_safe_guard(layer):
                continue
            own = HardenedLayer.of(layer)
            kind = layer.python_param.layer
            if own is None:
                self.by_hand.append((kind, layer.name))
                continue
            why = None
            if kind == "GradientClip":
                why = "level %s has no clip" % self.level if self.level != "repair" else \
                    self._superseded(index, layer)
            if why:
                self.edits.append(removal(self.net.text, node))
                self.removed.append((kind, layer.name, own.follows, why))
                continue
            what = []
            if kind == "NaNGuard" and own.level != self.level:
                what.append("%s -> %s" % (LEVEL_WORDS[own.level], LEVEL_WORDS[self.level]))
                own.level = self.level
            if kind == "GradientClip" and self.max_norm is not None and own.max_norm != self.max_norm:
                what.append("max_norm %s -> %s" % (exact_short(own.max_norm), exact_short(self.max_norm)))
                own.max_norm = self.max_norm
            if self.iter_size is not None and own.iter_size != self.iter_size:
                what.append("iter_size %s -> %d" % (own.iter_size or "unset", self.iter_size))
                own.iter_size = self.iter_size
            if what:
                literal = node.find("python_param.param_str")
                # Only the string changes: the literal's bytes, nothing around them.
                self.edits.append((literal.value_start, literal.value_end, prototxt_string(own.param_str())))
                self.changed.append((kind, layer.name, ", ".join(what)))

    # ---- swaps ---------------------------------------------------------------------------

    def _plan_swaps(self):
        text = self.net.text
        ind = indent_unit(text, self.pairs)
        for i, (layer, node) in enumerate(self.pairs):
            if layer.type == "BatchNorm" and "batchnorm" in self.swaps:
                edits, line = swap_batch_norm(text, self.pairs, i, layer, node, ind, self.iter_size)
                self.edits.extend(edits)
                self.log.append(line)
                self.swapped["BatchNorm"] = self.swapped.get("BatchNorm", 0) + 1
            elif layer.type == "InfogainLoss" and "infogain" in self.swaps:
                edits, line = swap_infogain(text, self.pairs, i, layer, node, ind, self.iter_size)
                self.edits.extend(edits)
                self.log.append(line)
                self.swapped["InfogainLoss"] = self.swapped.get("InfogainLoss", 0) + 1

    # ---- apply ---------------------------------------------------------------------------

    def harden(self):
        """The hardened text (the input text itself when nothing is to change)."""
        self._plan()
        self._plan_own()
        self._plan_swaps()
        self._plan_guards()
        self._plan_loss_clips(indent_unit(self.net.text, self.pairs))
        text = apply_edits(self.net.text, self.edits)
        if self.edits:
            # Never hand out a file Caffe cannot read (a fork's fields, which this Caffe
            # lacks, stay exactly as many as the input had: harden adds none).
            where = self.net.path + " (hardened)"
            fork = bool(self.net.unknown_fields)
            message = prototxt.parse_text(text, "NetParameter", where, unknown_fields=fork)
            if fork:
                unknown = prototxt.unknown_field_nodes(prototxt.index_text(text, where),
                                                       message.DESCRIPTOR)
                if len(unknown) != len(self.net.unknown_fields):
                    raise InputError("%s: the hardened text holds %d fields this Caffe does not "
                                     "know, the input %d" % (where, len(unknown),
                                                             len(self.net.unknown_fields)))
        return text

    def summary(self):
        """The lines for stderr: what was inserted, moved, removed, swapped and left alone."""
        parts = ["%d NaNGuard and %d GradientClip inserted" % (self.inserted["NaNGuard"],
                                                              self.inserted["GradientClip"])]
        groups = {}
        for kind, name, what in self.changed:
            groups.setdefault((kind, what), []).append(name)
        lines = []
        for (kind, what), names in groups.items():
            parts.append("%d %s %s" % (len(names), kind, what))
            lines.append("  ~ %s %s: %s" % (kind, shortened(names), what))
        if self.removed:
            parts.append("%d GradientClip removed" % len(self.removed))
            lines += ["  - %s %s after %s removed: %s" % (kind, name, follows, why)
                      for kind, name, follows, why in self.removed]
        parts.append(", ".join("%d %s swapped" % (n, k) for k, n in sorted(self.swapped.items())) or "no swap")
        head = "harden %s: level %s: %s" % (self.net.path, self.level, ", ".join(parts))
        if not self.edits:
            if self.spots:
                head += "; nothing to change (already hardened at level %s)" % self.level
            elif not self.default_guards and not self.guard_specs:
                head += "; nothing to change (--no-default-guards and no --guard: no guard asked for)"
            else:
                head += "; nothing to change (no spot of the default placement in this net)"
        if self.by_hand:
            lines.append("  = left as written (not in the form harden writes, so not harden's to move "
                         "to level %s): %s" % (self.level, shortened(["%s %s" % kn for kn in self.by_hand], 6)))
        strangers = self._unknown_sources()
        if strangers and self.default_guards:
            lines.append("  = left alone: %s, without bottoms, of %s no Caffe or fork harden knows "
                         "(a fork's data layer?): its tops are not guarded; --guard NAME guards them"
                         % (shortened(["'%s'" % layer.name for layer in strangers], 6),
                            "a type" if len({l.type for l in strangers}) == 1 else "types"))
        return [head] + self.log + lines

    def _unknown_sources(self):
        """Bottomless layers of a type that is no data layer harden knows (a fork's?)."""
        known = set(INPUT_TYPES) | set(layer_types.ALL_DATA) | {"Python"}
        guarded = {blob for spot in self.planned for blob in spot.blobs}
        return [layer for layer, node in self.pairs
                if node.name == "layer" and not layer.bottom and layer.top
                and layer.type not in known and not set(layer.top) <= guarded]
