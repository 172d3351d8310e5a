"""Rewrite a net for incremental hardening: NaN guards where NaN starts, drop-in swaps.

    safe-layers harden train_val.prototxt -o hardened.prototxt
    safe-layers harden train_val.prototxt -o - --level repair --solver solver.prototxt
    safe-layers harden train_val.prototxt -o out.prototxt --swap batchnorm,infogain --dry-run
    safe-layers harden solver.prototxt -o hardened/      # its nets, and a solver naming them

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
  * after each layer known to produce non-finite values: BatchNorm and a fork's BN
    (x/sqrt(eps) from untrained statistics, 0/0 on constant channels), Log, Power, Exp
    (domain traps);
  * below each loss, on every input it sends a gradient to (its predictions): the gradient
    that leaves the loss is where an explosion starts, and the last place to name the loss
    that produced it; at repair one GradientClip over all of them (one norm).

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

``--strip`` is the way back, for engines without Python layers (OpenCV DNN, Caffe-to-ONNX
converters): it removes every guard and clip harden wrote (recognised as re-hardening
recognises them) and undoes its swaps from the original text each swap keeps in a comment
of the layer, so that a file that was only hardened (any level, any swap, any number of
re-hardenings) comes back byte for byte; the user's edits elsewhere stay. Guards and clips
harden did not write, and drop-ins it cannot undo exactly (no kept text, or a param_str
edited since), are left and named; ``--strip-hand-written`` removes those guards and clips
and rebuilds those drop-ins' stock fields from their param_str. A caffemodel loads both
ways: the swapped layers keep their names and blobs.

    safe-layers harden hardened.prototxt --strip -o deploy.prototxt
"""

import difflib
import os
import sys

from safe_layers.core import atomic
from safe_layers.core.errors import InputError
from safe_layers.readers import prototxt
from safe_layers.tools.findings import check_output_path
from safe_layers.tools.harden.hardener import Hardener
from safe_layers.tools.harden.param_strings import DEFAULT_MAX_NORM, LEVELS
from safe_layers.tools.harden.strip import Stripper
from safe_layers.tools.harden.swaps import SWAPS

HELP = "insert NaN guards (and drop-in swaps) into a net prototxt, keeping every other byte"


def add_arguments(parser):
    parser.add_argument("input", metavar="IN.prototxt",
                        help="the net to harden, or a solver: its nets are hardened and a copy of it "
                             "names them (never written)")
    parser.add_argument("-o", "--output", metavar="OUT.prototxt|DIR/",
                        help="where the hardened net goes ('-' for stdout); for a solver, the folder "
                             "its hardened nets and solver go to (made when missing); required "
                             "unless --dry-run")
    parser.add_argument("--caffe-proto", metavar="caffe.proto",
                        help="your Caffe fork's schema (its src/caffe/proto/caffe.proto), compiled "
                             "with protoc, to read the fields it adds (default: the installed "
                             "Caffe's, plus the published forks' fields)")
    parser.add_argument("--level", choices=LEVELS, default=None,
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
    parser.add_argument("--strip", action="store_true",
                        help="the way back: remove the guards and clips harden wrote and undo its "
                             "swaps (a file only hardened comes back byte for byte)")
    parser.add_argument("--strip-hand-written", action="store_true",
                        help="with --strip: also remove guards and clips harden did not write, and "
                             "rebuild BatchNorm / InfogainLoss from the param_str of drop-ins it "
                             "cannot undo exactly")


def run(args):
    if args.caffe_proto:
        prototxt.use_schema(args.caffe_proto)
    if not args.dry_run and not args.output:
        raise InputError("-o OUT.prototxt is required (or -o - for stdout, or --dry-run); the "
                         "input is never overwritten")
    if args.strip:
        return run_strip(args)
    if args.strip_hand_written:
        raise InputError("--strip-hand-written goes with --strip")
    args.level = args.level or "observe"
    swaps = [s.strip().lower() for s in args.swap.split(",") if s.strip()]
    unknown = [s for s in swaps if s not in SWAPS]
    if unknown:
        raise InputError("--swap %s: allowed: %s" % (",".join(unknown), ", ".join(SWAPS)))
    if args.max_norm is not None and not args.max_norm > 0:
        raise InputError("--max-norm must be > 0")
    net = prototxt.read_prototxt(args.input)
    if net.kind == "solver":
        return run_solver(args, net, swaps)
    check_output(args, "the hardened net")
    iter_size = None
    if args.solver:
        iter_size = prototxt.read_solver(args.solver).message.iter_size or 1
    hardener = _hardener(args, net, swaps, iter_size)
    text = hardener.harden()
    return emit(args, net, text, hardener.summary, "hardened")


def _hardener(args, net, swaps, iter_size):
    return Hardener(net, level=args.level, guards=args.guard, default_guards=not args.no_default_guards,
                    swaps=swaps, iter_size=iter_size, max_norm=args.max_norm)


def run_solver(args, solver, swaps):
    """``harden SOLVER -o DIR/``: each net file the solver names, hardened (with the
    solver's iter_size), and a copy of the solver naming them, into DIR (made when
    missing); the copy differs from the solver only in those paths, written as DIR/NAME,
    so that `caffe train` run from where DIR was named finds them. Nothing is written over
    an input; the nets are written first, so the solver never names a missing file."""
    if args.solver:
        raise InputError("%s is a solver: --solver goes with a net" % solver.path)
    if args.output == "-":
        raise InputError("-o -: a solver gives several files (its nets and itself); -o names a folder")
    folder = args.output
    if not folder:
        raise InputError("-o DIR/ is required with a solver (with --dry-run too: the diff names "
                         "the files it would write)")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InputError("-o %s: not a folder; with a solver, -o names the folder the hardened "
                         "nets and solver go to" % folder)
    named = prototxt.solver_nets(solver)
    inline = [field for field, _ in named if field.endswith("_param")]
    if inline:
        raise InputError("%s: %s holds the net inline; harden SOLVER rewrites net files (harden "
                         "the net alone, or move it to a file)" % (solver.path, inline[0]))
    if not named:
        raise InputError("%s names no net (net, train_net or test_net): nothing to harden" % solver.path)
    iter_size = solver.message.iter_size or 1
    outputs, hardeners, new_paths = [], {}, {}
    for _, net in named:
        key = os.path.realpath(net.path)
        if key in hardeners:
            continue
        hardeners[key] = _hardener(args, net, swaps, iter_size)
        new_paths[key] = os.path.join(folder, os.path.basename(net.path))
        outputs.append((net, new_paths[key], hardeners[key].harden(), hardeners[key].summary))
    solver_out = os.path.join(folder, os.path.basename(solver.path))
    outputs.append((solver, solver_out, _renamed_nets(solver, named, new_paths), lambda: []))
    _check_solver_outputs(solver, named, [target for _, target, _, _ in outputs])
    if args.dry_run:
        for doc, target, text, _ in outputs:
            sys.stdout.writelines(difflib.unified_diff(doc.text.splitlines(True), text.splitlines(True),
                                                       fromfile=doc.path, tofile=target))
        sys.stderr.write("dry run: nothing written\n")
        return 0
    os.makedirs(folder, exist_ok=True)
    for doc, target, text, summary in outputs:
        check_output_path(target, "the hardened %s" % doc.kind)
    for doc, target, text, summary in outputs:
        write_file(target, text, "the hardened %s" % doc.kind)
    for doc, target, text, summary in outputs:
        for line in summary():
            sys.stderr.write(line + "\n")
    sys.stderr.write("wrote %s\n" % ", ".join(target for _, target, _, _ in outputs))
    return 0


def _renamed_nets(solver, named, new_paths):
    """The solver's text with each net path it names replaced by the hardened net's
    (every other byte as it was)."""
    edits = []
    nodes = [solver.root.find(f) for f in ("net", "train_net") if solver.message.HasField(f)]
    nodes += solver.root.all("test_net")
    for node, (_, net) in zip(nodes, named):
        new = new_paths[os.path.realpath(net.path)]
        edits.append((node.value_start, node.value_end,
                      '"%s"' % new.replace("\\", "\\\\").replace('"', '\\"')))
    text = solver.text
    for start, end, value in sorted(edits, reverse=True):
        text = text[:start] + value + text[end:]
    return text


def _check_solver_outputs(solver, named, targets):
    """InputError when two outputs share a name or one is an input (the solver or a net)."""
    seen = set()
    inputs = [solver.path] + [net.path for _, net in named]
    for target in targets:
        if os.path.abspath(target) in seen:
            raise InputError("two of the files harden would write are %s (nets of the same name in "
                             "different folders): harden each net alone" % target)
        seen.add(os.path.abspath(target))
        if any(os.path.exists(target) and os.path.samefile(target, given) for given in inputs):
            raise InputError("%s is an input: harden never overwrites its input (name another -o "
                             "folder)" % target)


def check_output(args, what):
    """Refuse, before any work, an output that cannot be written or is the input itself."""
    if args.dry_run or args.output == "-":
        return
    check_output_path(args.output, what)
    if os.path.exists(args.output) and os.path.exists(args.input) and \
            os.path.samefile(args.output, args.input):
        raise InputError("-o %s is the input file: harden never overwrites its input" % args.output)


def run_strip(args):
    """``--strip``: harden's blocks out, its swaps undone (see the module's docstring)."""
    given = [flag for flag, value in (("--level", args.level), ("--guard", args.guard),
                                      ("--no-default-guards", args.no_default_guards),
                                      ("--swap", args.swap), ("--solver", args.solver),
                                      ("--max-norm", args.max_norm is not None)) if value]
    if given:
        raise InputError("--strip takes out what harden wrote; %s is for hardening" % ", ".join(given))
    check_output(args, "the stripped net")
    net = prototxt.read_prototxt(args.input)
    if net.kind != "net":
        raise InputError("%s is a solver; harden --strip takes the net" % net.path)
    stripper = Stripper(net, hand_written=args.strip_hand_written)
    text = stripper.strip()
    return emit(args, net, text, stripper.summary, "stripped")


def emit(args, net, text, summary, done):
    """The text to -o (or stdout, or as a diff with --dry-run), then the summary to stderr."""
    if args.dry_run:
        sys.stdout.writelines(difflib.unified_diff(
            net.text.splitlines(True), text.splitlines(True), fromfile=net.path,
            tofile=args.output if args.output and args.output != "-" else "%s (%s)" % (net.path, done)))
        tail = "dry run: nothing written"
    elif args.output == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        tail = "wrote stdout"
    else:
        write_file(args.output, text, "the %s net" % done)
        tail = "wrote %s" % args.output
    # The summary comes once the file is in place: "wrote" is true when it is printed, and a
    # closed stderr (`2>&1 | head`) cannot stop the file from being written.
    for line in summary() + [tail]:
        sys.stderr.write(line + "\n")
    return 0


def write_file(path, text, what="the hardened net"):
    """Write ``text`` (its own line ends, byte for byte) to ``path`` whole or not at all
    (:func:`safe_layers.core.atomic.replace_file`: a temporary file beside it renamed only
    over a regular file; /dev/null or a pipe written into); an OSError becomes an
    InputError naming ``path``."""
    try:
        atomic.replace_file(path, text)
    except OSError as exc:
        raise InputError("could not write %s %s: %s" % (what, path, exc.strerror or exc)) from None
