"""Rewrite a net for incremental hardening: NaN guards where NaN starts, drop-in swaps.

    safe-layers harden train_val.prototxt -o hardened.prototxt
    safe-layers harden train_val.prototxt -o - --level repair --solver solver.prototxt
    safe-layers harden train_val.prototxt -o out.prototxt --swap batchnorm,infogain --dry-run

Levels (what each inserted NaNGuard does; outputs and gradients on finite input are those
of the original net at every level, bit for bit at ``observe``):

  observe  guards warn (one report line naming guard, layer, iteration, first bad element)
  repair   guards clamp in forward (NaN -> 0, +-Inf -> +-1000, NaNGuard's bound) and zero a non-finite
           gradient in backward; a GradientClip (L2 norm, --max-norm) below each loss
  strict   guards abort with the report at the first non-finite value

Default placement, and why each spot:

  * on every data layer's tops (Data, ImageData, HDF5Data, Input, ...): a NaN in the input
    reaches conv1's own weight gradient in conv1's backward, before any guard placed after
    conv1 could see it; only a guard on the data itself keeps it out;
  * on the input of each Pooling layer: a MAX window that is all NaN keeps mask -1 and
    Caffe's CPU backward then writes one element before its channel (another sample's
    gradient); clamping the input keeps every window finite;
  * on the output of each Pooling layer whose last windows can lie outside its input
    (stride > kernel, CEIL rounding, no pad): AVE pooling divides 0 by 0 there, and the
    NaN would reach the next layer's own weight gradient before a guard after that layer
    could see it (``safe-layers lint`` names the exact rows and the geometry fix);
  * after each layer known to produce non-finite values: BatchNorm (x/sqrt(eps) from
    untrained statistics, 0/0 on constant channels), Log, Power, Exp (domain traps);
  * below each loss (on its prediction input): the gradient that leaves the loss is where
    an explosion starts, and the last place to name the loss that produced it.

``--guard TYPE,...`` or ``--guard NAME-GLOB`` adds a guard after each matching layer
(``--no-default-guards`` keeps only those; an entry that matches no layer is an error).
Net-level inputs (``input:`` with ``input_dim`` / ``input_shape``, as in published deploy
nets) are guarded like an Input layer's tops: Caffe turns them into an Input layer named
``input`` when it loads the net, so the guard is ``input_guard`` (``follows: input``),
placed before the first layer. ``--swap batchnorm`` makes each BatchNorm a
StableBatchNorm (same name, so caffemodels load both ways; the three
``param { lr_mult: 0 }``; eps / moving_average_fraction / use_global_stats moved into its
param_str); ``--swap infogain`` makes each InfogainLoss a SafeInfogainLoss (source, axis,
ignore_label, normalization and the loss weight carried over; a Softmax in front is kept
and read with ``input: probabilities``).

Incremental hardening: on a net harden already hardened, the guards and clips it wrote
(recognised by their param_str, exactly as harden writes it) are moved to the requested
level: each guard's param_str is rewritten (nothing else in its block), GradientClips are
added (repair) or removed (observe, strict), and ``--solver`` / ``--max-norm``, when given,
update their iter_size / bound. The result is the file hardening the original at that
level gives, byte for byte. Guards and clips written by hand are left as they are, and
the summary names them.

Every inserted layer gets a name, ``follows`` and, with ``--solver``, the solver's
``iter_size``. Every other byte of the file is kept (comments, formatting): the diff shows
only the hardening. Hardening a hardened net at its level changes nothing. The input is
never written: ``-o`` is required (``-o -`` for stdout) and checked before any work; the
file appears complete or not at all. ``--dry-run`` prints the unified diff instead. A
summary of what changed goes to stderr.
"""

import difflib
import fnmatch
import os
import re
import sys

from safe_layers.readers import prototxt
from safe_layers.core.errors import InputError
from safe_layers.tools.findings import check_output_path
from safe_layers.readers.layer_types import INPUT, SOURCE_DATA
from safe_layers.readers.net_state import layers_in_state, loss_weights
from safe_layers.tools.lint.rules import pooling

HELP = "insert NaN guards (and drop-in swaps) into a net prototxt, keeping every other byte"

LEVELS = ("observe", "repair", "strict")
SWAPS = ("batchnorm", "infogain")
PRODUCER_TYPES = ("BatchNorm", "Log", "Power", "Exp")
INPUT_TYPES = SOURCE_DATA + INPUT
GUARD_PARAMS = {
    "observe": "action: warn",
    "repair": "action: clamp, backward_action: zero",
    "strict": "action: abort",
}
# How the summary names a level's guard actions: "5 NaNGuard warn -> clamp/zero".
LEVEL_WORDS = {"observe": "warn", "repair": "clamp/zero", "strict": "abort"}
DEFAULT_MAX_NORM = 1000.0
# Caffe's UpgradeNetInput turns net-level `input:` + `input_dim`/`input_shape` into an
# Input layer of this name when it loads the net: the name Caffe's log and reports use.
LEGACY_INPUT_LAYER = "input"

_SCALAR = r"'(?:[^']|'')*'|[^,{}']+"  # what yaml_text writes

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


def add_arguments(parser):
    parser.add_argument("input", metavar="IN.prototxt", help="the net to harden (never written)")
    parser.add_argument("-o", "--output", metavar="OUT.prototxt",
                        help="where the hardened net goes ('-' for stdout); required unless --dry-run")
    parser.add_argument("--level", choices=LEVELS, default="observe",
                        help="observe: guards warn (default); repair: clamp forward, zero backward, "
                             "GradientClip below each loss; strict: abort with the report. On a net "
                             "harden hardened before, its guards and clips move to this level")
    parser.add_argument("--guard", action="append", default=[], metavar="TYPE,...|NAME-GLOB",
                        help="also guard after each layer of these types (Convolution,InnerProduct) "
                             "or whose name matches the glob ('res5*'); repeatable; an entry that "
                             "matches no layer is an error")
    parser.add_argument("--no-default-guards", action="store_true",
                        help="only the --guard spots, not the default placement")
    parser.add_argument("--swap", default="", metavar="batchnorm,infogain",
                        help="replace BatchNorm by StableBatchNorm and/or InfogainLoss by SafeInfogainLoss")
    parser.add_argument("--solver", metavar="SOLVER.prototxt",
                        help="the solver that trains this net: its iter_size goes into every inserted "
                             "layer (and into the guards and clips harden inserted before)")
    parser.add_argument("--max-norm", type=float, default=None, metavar="X",
                        help="repair: the L2 bound of the GradientClip below each loss (default %g; "
                             "given, it also resets the clips harden inserted before)" % DEFAULT_MAX_NORM)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the unified diff to stdout; write nothing")


def run(args):
    if not args.dry_run and not args.output:
        raise InputError("-o OUT.prototxt is required (or -o - for stdout, or --dry-run); the "
                         "input is never overwritten")
    swaps = [s.strip().lower() for s in args.swap.split(",") if s.strip()]
    unknown = [s for s in swaps if s not in SWAPS]
    if unknown:
        raise InputError("--swap %s: allowed: %s" % (",".join(unknown), ", ".join(SWAPS)))
    if args.max_norm is not None and not args.max_norm > 0:
        raise InputError("--max-norm must be > 0")
    writes = not args.dry_run and args.output != "-"
    if writes:
        check_output_path(args.output, "the hardened net")
        if os.path.exists(args.output) and os.path.exists(args.input) and \
                os.path.samefile(args.output, args.input):
            raise InputError("-o %s is the input file: harden never overwrites its input" % args.output)
    iter_size = None
    if args.solver:
        iter_size = prototxt.read_solver(args.solver).message.iter_size or 1
    net = prototxt.read_prototxt(args.input)
    if net.kind != "net":
        raise InputError("%s is a solver; harden takes the net (give the solver with --solver)" % net.path)
    hardener = Hardener(net, level=args.level, guards=args.guard, default_guards=not args.no_default_guards,
                        swaps=swaps, iter_size=iter_size, max_norm=args.max_norm)
    text = hardener.harden()
    if args.dry_run:
        sys.stdout.writelines(difflib.unified_diff(
            net.text.splitlines(True), text.splitlines(True), fromfile=net.path,
            tofile=args.output if args.output and args.output != "-" else net.path + " (hardened)"))
        tail = "dry run: nothing written"
    elif args.output == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        tail = "wrote stdout"
    else:
        write_file(args.output, text)
        tail = "wrote %s" % args.output
    # The summary comes once the file is in place: "wrote" is true when it is printed, and a
    # closed stderr (`2>&1 | head`) cannot stop the file from being written.
    for line in hardener.summary() + [tail]:
        sys.stderr.write(line + "\n")
    return 0


def write_file(path, text):
    """Write ``text`` to ``path`` whole or not at all: into a temporary file beside it,
    then renamed over it; the temporary file is removed on any failure. An OSError
    becomes an InputError naming ``path``."""
    tmp = "%s.tmp%d" % (path, os.getpid())
    try:
        # newline="": the text's own line ends, byte for byte.
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise InputError("could not write the hardened net %s: %s"
                             % (path, exc.strerror or exc)) from None
        raise


# Values harden copies from the net (names, paths): plain in the YAML flow mapping when
# YAML reads them back as that very string, else single-quoted.
_TEXT_KEYS = ("name", "follows", "source")
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./\-]*\Z")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def yaml_text(value):
    """``value`` as a YAML scalar that reads back as this string: plain when safe
    (``conv1``, ``inception_3a/1x1``), else single-quoted (``'fc, 1'``, ``'2'``)."""
    value = str(value)
    if _PLAIN.match(value) and value.lower() not in _YAML_WORDS:
        return value
    return "'%s'" % value.replace("'", "''")


def yaml_text_back(scalar):
    """The string :func:`yaml_text` wrote."""
    if len(scalar) >= 2 and scalar[0] == scalar[-1] == "'":
        return scalar[1:-1].replace("''", "'")
    return scalar


def prototxt_string(text):
    """``text`` as a double-quoted prototxt string literal (Caffe's text_format reads
    back exactly ``text``)."""
    return '"%s"' % str(text).replace("\\", "\\\\").replace('"', '\\"')


def _line_end_at(text, position):
    """The length of the line end (LF or CRLF) at ``position``, 0 if none: an empty line
    starts there."""
    if text.startswith("\r\n", position):
        return 2
    return 1 if text.startswith("\n", position) else 0


def _blank_line_before(text, start):
    """The length of the empty line (its line end) just before ``start``, a line start;
    0 when the line before is not empty."""
    for end in ("\r\n", "\n"):
        before = start - len(end)
        if before >= 0 and text.startswith(end, before) and (
                before == 0 or text[before - 1] == "\n"):
            return len(end)
    return 0


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


def number_text(value):
    """``value`` as short as reads back exactly: ``1000``, ``0.5``, ``1234567.0`` (never
    ``%g``'s ``1.23457e+06``, which would change the bound the user gave)."""
    short = "%g" % value
    return short if float(short) == value else repr(float(value))


def clip_param_str(name, follows, max_norm, iter_size=None):
    return param_str([("name", name), ("follows", follows), ("mode", "norm"),
                      ("max_norm", number_text(max_norm))], iter_size)


def is_safe_guard(layer):
    """A NaNGuard or GradientClip of safe_layers, whoever wrote it."""
    return layer.type == "Python" and layer.python_param.module.split(".")[0] == "safe_layers" \
        and layer.python_param.layer in ("NaNGuard", "GradientClip")


class Own:
    """A guard or clip harden wrote: its param_str is exactly one harden writes, naming the
    layer itself and the layer it follows (``<follows>_guard``, ``<follows>_clip_2``, ...)."""

    def __init__(self, kind, name, follows, level=None, max_norm=None, iter_size=None):
        self.kind, self.name, self.follows = kind, name, follows
        self.level, self.max_norm, self.iter_size = level, max_norm, iter_size

    @classmethod
    def of(cls, layer):
        """The Own for ``layer``, or None when harden did not write it."""
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


class Spot:
    """A guard to insert after layer ``index``, on ``blobs``, for ``reasons``."""

    def __init__(self, index, blobs, reason):
        self.index, self.blobs, self.reasons = index, list(blobs), [reason]
        self.clip_blob = None  # repair: a GradientClip on this blob (below a loss)

    def add(self, blobs, reason):
        for blob in blobs:
            if blob not in self.blobs:
                self.blobs.append(blob)
        if reason not in self.reasons:
            self.reasons.append(reason)


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
            raise InputError("%s uses the V1 'layers' format; upgrade it first "
                             "(upgrade_net_proto_text OLD NEW), then harden" % net.path)
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
        self.removed = []  # (kind, name, follows)
        self.by_hand = []  # (kind, name): safe_layers guards and clips harden did not write
        self.spots = 0  # the guard and clip spots asked for (inserted or already there)

    def _check_guard_specs(self):
        candidates = [layer for layer, _ in self.pairs if not is_safe_guard(layer)]
        for spec in self.guard_specs:
            if not any(self._matches(layer, spec) for layer in candidates):
                types = sorted({layer.type for layer in candidates})
                names = list(dict.fromkeys(layer.name for layer in candidates))
                raise InputError("--guard '%s' matches no layer of %s: no layer has that type and "
                                 "no layer name matches it (types: %s; names: %s)"
                                 % (spec, self.net.path, shortened(types, 12), shortened(names)))

    @staticmethod
    def _matches(layer, spec):
        return layer.type == spec or fnmatch.fnmatchcase(layer.name, spec)

    # ---- planning ------------------------------------------------------------------------

    def _phase_lists(self):
        pb2 = prototxt.caffe_pb2()
        index_of = {node.start: i for i, (_, node) in enumerate(self.pairs)}
        lists = []
        for phase in ("TRAIN", "TEST"):
            kept = layers_in_state(self.pairs, pb2.Phase.Value(phase))
            lists.append([index_of[node.start] for _, node in kept])
        return lists

    def _last_writers(self, before, blob):
        """Indices of the layers that last write ``blob`` before layer ``before``, one per
        phase (a TRAIN and a TEST data layer may both write 'data')."""
        found = []
        for order in self._phase_lists():
            if before not in order:
                continue
            position = order.index(before)
            for i in reversed(order[:position]):
                # Guards and clips are transparent: the writer is the layer they follow.
                if blob in self.pairs[i][0].top and not is_safe_guard(self.pairs[i][0]):
                    if i not in found:
                        found.append(i)
                    break
        return found

    def _plan_spots(self):
        spots = {}

        def want(index, blobs, reason):
            if index in spots:
                spots[index].add(blobs, reason)
            else:
                spots[index] = Spot(index, blobs, reason)
            return spots[index]

        for i, (layer, _) in enumerate(self.pairs):
            if is_safe_guard(layer):
                continue
            if self.default_guards:
                if layer.type in INPUT_TYPES or (layer.type == "Python" and not layer.bottom):
                    if layer.top:
                        want(i, list(layer.top), "data layer tops")
                if layer.type == "Pooling" and layer.bottom:
                    for w in self._last_writers(i, layer.bottom[0]):
                        want(w, [layer.bottom[0]], "input of pooling '%s'" % layer.name)
                    if layer.top and pooling.axes_outside(layer):
                        want(i, [layer.top[0]], "output of pooling '%s': stride > kernel, so its "
                             "last windows can lie outside the input (AVE: 0/0)" % layer.name)
                if layer.type in PRODUCER_TYPES and layer.top:
                    want(i, [layer.top[0]], "a %s output" % layer.type)
                elif (layer.type == "Python" and layer.python_param.layer == "StableBatchNorm"
                      and layer.top):
                    # Where a --swap of the same run guards it: a net swapped first and
                    # hardened later gets the same file.
                    want(i, [layer.top[0]], "a BatchNorm output (StableBatchNorm)")
                if any(loss_weights(layer)) and layer.bottom:
                    for w in self._last_writers(i, layer.bottom[0]):
                        spot = want(w, [layer.bottom[0]], "below loss '%s'" % layer.name)
                        if self.level == "repair":
                            spot.clip_blob = layer.bottom[0]
            for spec in self.guard_specs:
                if self._matches(layer, spec) and layer.top:
                    want(i, list(layer.top), "--guard %s" % spec)
        return [spots[i] for i in sorted(spots)]

    def _run_after(self, index):
        """The guards and clips that sit right after layer ``index`` (-1: at the start of
        the layer list), in order: (layer, node) pairs."""
        run = []
        for layer, node in self.pairs[index + 1:]:
            if not is_safe_guard(layer):
                break
            run.append((layer, node))
        return run

    def _existing(self, index, blob, kind):
        """Whether a safe_layers ``kind`` layer on ``blob`` already sits right after layer
        ``index`` (among the guards/clips that follow it): hardening twice adds nothing."""
        return any(layer.python_param.layer == kind and blob in layer.bottom
                   for layer, _ in self._run_after(index))

    # ---- text ----------------------------------------------------------------------------

    def _indent(self):
        """The file's indentation unit, read from the first multi-line layer block."""
        text = self.net.text
        for _, node in self.pairs:
            if node.children and node.children[0].line > node.line:
                child = node.children[0]
                start = text.rfind("\n", 0, child.start) + 1
                return text[start:child.start] or "  "
        return "  "

    def _unique(self, base):
        name, n = base, 1
        while name in self.names:
            n += 1
            name = "%s_%d" % (base, n)
        self.names.add(name)
        return name

    def _param_str(self, pairs):
        return param_str(pairs, self.iter_size)

    def _block(self, name, blobs, rules, kind, param_str, ind):
        lines = ["layer {", '%sname: %s' % (ind, prototxt_string(name)), '%stype: "Python"' % ind]
        lines += ['%sbottom: %s' % (ind, prototxt_string(b)) for b in blobs]
        lines += ['%stop: %s' % (ind, prototxt_string(b)) for b in blobs]
        lines += ["%s%s" % (ind, r) for r in rules]
        lines += ["%spython_param {" % ind, '%s%smodule: "safe_layers"' % (ind, ind),
                  '%s%slayer: "%s"' % (ind, ind, kind),
                  '%s%sparam_str: %s' % (ind, ind, prototxt_string(param_str)), "%s}" % ind, "}"]
        return "\n".join(lines) + "\n"

    def _rules_text(self, layer):
        from google.protobuf import text_format
        out = []
        for field in ("include", "exclude"):
            for rule_message in getattr(layer, field):
                out.append("%s { %s }" % (field, text_format.MessageToString(rule_message, as_one_line=True)))
        return out

    def _insert_after(self, node, blocks):
        """An edit that puts ``blocks`` on the lines after ``node``.

        Where the file separates its blocks by a blank line, each inserted block is
        preceded by one: inserting blocks one run at a time gives the text inserting them
        at once gives (a guard now, its clip on a later run), and :meth:`_removal` undoes
        exactly one block's insertion."""
        text = self.net.text
        newline = text.find("\n", node.end)
        rest = text[node.end:newline if newline >= 0 else len(text)]
        if rest.strip() and not rest.strip().startswith("#"):  # more fields on its line
            return (node.end, node.end, "\n" + "".join(blocks))
        if newline < 0:  # the last line, without a line end
            return (len(text), len(text), "\n" + "".join(blocks))
        position = newline + 1
        separator = "\n" if _line_end_at(text, position) else ""
        return (position, position, "".join(separator + block for block in blocks))

    def _removal(self, node):
        """The edit that removes a block :meth:`_insert_after` inserted: its lines, and
        the blank line before it where one is after it too."""
        text = self.net.text
        start, end = self._line_span(node)
        if (start, end) == (node.start, node.end):  # not alone on its lines: the block itself
            return (start, end, "")
        blank = _blank_line_before(text, start)
        if _line_end_at(text, end) and blank:
            start -= blank
        return (start, end, "")

    def _insert_inputs(self, ind):
        """The guard on net-level inputs (``input:`` + ``input_dim`` / ``input_shape``),
        before the first layer. Caffe builds them as an Input layer named ``input`` (only
        when a shape is declared: a bare ``input:`` is dropped, and its name is no blob)."""
        message = self.net.message
        if not self.default_guards or not len(message.input) or \
                not (len(message.input_shape) or len(message.input_dim)):
            return
        self.spots += 1
        blobs = [b for b in message.input if not self._existing(-1, b, "NaNGuard")]
        if not blobs:
            return
        name = self._unique("%s_guard" % LEGACY_INPUT_LAYER)
        block = self._block(name, blobs, [], "NaNGuard",
                            guard_param_str(name, LEGACY_INPUT_LAYER, self.level, self.iter_size), ind)
        fields = [n for n in self.net.root.children if n.name in ("input", "input_dim", "input_shape")]
        last = max(fields, key=lambda n: n.end)
        first_layer = self.pairs[0][1]
        if last.end < first_layer.start:
            self.edits.append(self._insert_after(last, [block]))
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

    def _plan_guards(self):
        ind = self._indent()
        self._insert_inputs(ind)
        for spot in self._plan_spots():
            self.spots += 1
            layer, node = self.pairs[spot.index]
            blobs = [b for b in spot.blobs if not self._existing(spot.index, b, "NaNGuard")]
            blocks = []
            rules = self._rules_text(layer)
            if blobs:
                name = self._unique("%s_guard" % layer.name)
                blocks.append(self._block(name, blobs, rules, "NaNGuard",
                                          guard_param_str(name, layer.name, self.level, self.iter_size), ind))
                self.inserted["NaNGuard"] += 1
                self.log.append("  + NaNGuard %s after %s on %s: %s"
                                % (name, layer.name, ", ".join(blobs), "; ".join(spot.reasons)))
            clip = spot.clip_blob
            if clip and not self._existing(spot.index, clip, "GradientClip"):
                name = self._unique("%s_clip" % layer.name)
                max_norm = self.max_norm if self.max_norm is not None else DEFAULT_MAX_NORM
                blocks.append(self._block(name, [clip], rules, "GradientClip",
                                          clip_param_str(name, layer.name, max_norm, self.iter_size), ind))
                self.inserted["GradientClip"] += 1
                self.log.append("  + GradientClip %s after %s on %s: L2 norm <= %s below the loss"
                                % (name, layer.name, clip, number_text(max_norm)))
            if blocks:
                # After the guards and clips already there: a later run appends where an
                # earlier one stopped, in the order one run would have written.
                run = self._run_after(spot.index)
                anchor = run[-1][1] if run else node
                self.edits.append(self._insert_after(anchor, blocks))

    def _plan_own(self):
        """Harden's own guards and clips, moved to this run's level (and iter_size /
        max_norm, when given); the others' names for the summary."""
        for layer, node in self.pairs:
            if not is_safe_guard(layer):
                continue
            own = Own.of(layer)
            kind = layer.python_param.layer
            if own is None:
                self.by_hand.append((kind, layer.name))
                continue
            if kind == "GradientClip" and self.level != "repair":
                self.edits.append(self._removal(node))
                self.removed.append((kind, layer.name, own.follows))
                continue
            what = []
            if kind == "NaNGuard" and own.level != self.level:
                what.append("%s -> %s" % (LEVEL_WORDS[own.level], LEVEL_WORDS[self.level]))
                own.level = self.level
            if kind == "GradientClip" and self.max_norm is not None and own.max_norm != self.max_norm:
                what.append("max_norm %s -> %s" % (number_text(own.max_norm), number_text(self.max_norm)))
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

    def _line_span(self, node):
        """The span that removes ``node``: its whole line(s) when nothing else is on them."""
        text = self.net.text
        line_start = text.rfind("\n", 0, node.start) + 1
        newline = text.find("\n", node.end)
        line_end = newline + 1 if newline >= 0 else len(text)
        before = text[line_start:node.start]
        after = text[node.end:line_end]
        if not before.strip() and (not after.strip() or after.strip().startswith("#")):
            return line_start, line_end
        return node.start, node.end

    def _closing(self, node):
        """(position, indent, own_line): where a field goes at the end of a layer block."""
        text = self.net.text
        close = node.end - 1  # the '}'
        line_start = text.rfind("\n", 0, close) + 1
        if not text[line_start:close].strip():
            return line_start, True
        return close, False

    def _field_edit(self, node, lines, ind):
        position, own_line = self._closing(node)
        if own_line:
            return (position, position, "".join("%s%s\n" % (ind, l) for l in lines))
        return (position, position, " " + " ".join(lines) + " ")

    def _python_param_lines(self, kind, param_str, ind):
        return ["python_param {", '%smodule: "safe_layers"' % ind, '%slayer: "%s"' % (ind, kind),
                '%sparam_str: %s' % (ind, prototxt_string(param_str)), "}"]

    def _producer_name(self, index, blob):
        writers = self._last_writers(index, blob)
        return self.pairs[writers[0]][0].name if writers else None

    def _swap_batch_norm(self, index, layer, node, ind):
        p = layer.batch_norm_param
        params = [("name", layer.name)]
        producer = self._producer_name(index, layer.bottom[0]) if layer.bottom else None
        if producer:
            params.append(("follows", producer))
        moved = []
        for key in ("use_global_stats", "moving_average_fraction", "eps"):
            if p.HasField(key):
                value = getattr(p, key)
                params.append((key, str(value).lower() if isinstance(value, bool) else "%.7g" % value))
                moved.append(key)
        dropped = [f.name for f, _ in p.ListFields() if f.name not in moved]
        edits = [self._type_edit(node)]
        block = node.find("batch_norm_param")
        if block is not None:
            edits.append(self._line_span(block) + ("",))
        zero = [spec for spec in layer.param if spec.lr_mult == 0]
        lines = ["param { lr_mult: 0 }"] * max(0, 3 - len(layer.param)) if len(zero) == len(layer.param) else []
        lines += self._python_param_lines("StableBatchNorm", self._param_str(params), ind)
        edits.append(self._field_edit(node, lines, ind))
        note = "moved %s into param_str" % ", ".join(moved) if moved else "no batch_norm_param keys"
        if dropped:
            note += "; dropped %s (StableBatchNorm has no such key)" % ", ".join(dropped)
        self.log.append("  ~ %s: BatchNorm -> StableBatchNorm (same name: caffemodels load); %s%s"
                        % (layer.name, note, "; added %d param { lr_mult: 0 }" % (lines.count("param { lr_mult: 0 }"))
                           if "param { lr_mult: 0 }" in lines else ""))
        return edits

    def _swap_infogain(self, index, layer, node, ind):
        params = [("name", layer.name)]
        producer = self._producer_name(index, layer.bottom[0]) if layer.bottom else None
        if producer:
            params.append(("follows", producer))
        ip, lp = layer.infogain_loss_param, layer.loss_param
        if ip.source:
            params.append(("source", ip.source))
        if ip.HasField("axis"):
            params.append(("axis", ip.axis))
        if lp.HasField("ignore_label"):
            params.append(("ignore_label", lp.ignore_label))
        if lp.HasField("normalization"):
            enum = lp.DESCRIPTOR.fields_by_name["normalization"].enum_type
            params.append(("normalization", enum.values_by_number[lp.normalization].name))
        elif lp.HasField("normalize"):
            params.append(("normalization", "VALID" if lp.normalize else "BATCH_SIZE"))
        softmax = None
        if layer.bottom:
            writers = self._last_writers(index, layer.bottom[0])
            if writers and self.pairs[writers[0]][0].type == "Softmax":
                softmax = self.pairs[writers[0]][0].name
                params.append(("input", "probabilities"))
        edits = [self._type_edit(node)]
        for field in ("infogain_loss_param", "loss_param"):
            block = node.find(field)
            if block is not None:
                edits.append(self._line_span(block) + ("",))
        lines = [] if len(layer.loss_weight) else ["loss_weight: 1"]
        lines += self._python_param_lines("SafeInfogainLoss", self._param_str(params), ind)
        edits.append(self._field_edit(node, lines, ind))
        self.log.append("  ~ %s: InfogainLoss -> SafeInfogainLoss (%s%s)"
                        % (layer.name, "loss_weight: 1 added, a Python layer has no default; "
                           if not len(layer.loss_weight) else "",
                           "Softmax '%s' in front kept and read with input: probabilities, the loss "
                           "this prototxt was written for (today's InfogainLoss applied softmax twice "
                           "here)" % softmax if softmax else "reads the logits, as InfogainLoss does"))
        return edits

    def _type_edit(self, node):
        type_node = node.find("type")
        return (type_node.value_start, type_node.value_end, '"Python"')

    def _plan_swaps(self):
        ind = self._indent()
        for i, (layer, node) in enumerate(self.pairs):
            if layer.type == "BatchNorm" and "batchnorm" in self.swaps:
                self.edits.extend(self._swap_batch_norm(i, layer, node, ind))
                self.swapped["BatchNorm"] = self.swapped.get("BatchNorm", 0) + 1
            elif layer.type == "InfogainLoss" and "infogain" in self.swaps:
                self.edits.extend(self._swap_infogain(i, layer, node, ind))
                self.swapped["InfogainLoss"] = self.swapped.get("InfogainLoss", 0) + 1

    # ---- apply ---------------------------------------------------------------------------

    def harden(self):
        """The hardened text (the input text itself when nothing is to change)."""
        self._plan_own()
        self._plan_swaps()
        self._plan_guards()
        text = self.net.text
        # A file with Windows line ends gets them in what is inserted too.
        crlf = text.count("\r\n") * 2 > text.count("\n")
        # Apply from the end so earlier offsets stay valid; at one offset, in plan order.
        order = sorted(range(len(self.edits)), key=lambda k: (self.edits[k][0], k), reverse=True)
        for k in order:
            start, end, new = self.edits[k]
            if crlf:
                new = new.replace("\r\n", "\n").replace("\n", "\r\n")
            text = text[:start] + new + text[end:]
        if self.edits:
            # Never hand out a file Caffe cannot read.
            prototxt.parse_text(text, "NetParameter", self.net.path + " (hardened)")
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
            lines += ["  - %s %s after %s removed: level %s has no clip" % (kind, name, follows, self.level)
                      for kind, name, follows in self.removed]
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
        return [head] + self.log + lines
