"""Find what makes a Caffe net or solver go NaN, before training.

    safe-layers lint solver.prototxt              # the solver and the nets it names
    safe-layers lint train_val.prototxt --input-shape data=64,3,224,224
    safe-layers lint net.prototxt --format json --ignore SL401

A solver is checked with the nets it names (paths resolved as Caffe resolves them: from
the working directory). Each net is built by real Caffe in a child process, once per
phase, with its data layers replaced by Input layers of known shapes, so the pooling
rules see true blob shapes; where Caffe refuses the net, its own message is reported
against the layer it names; where shapes cannot be known, the shape-free rules run and
an SL002 note says why. `--list-rules` prints every rule id.

Findings print as `path:line:col: SLnnn severity message — fix: ...` (on a terminal the
fix goes on a second, indented line); a finding that holds in one phase only, or is worded
differently by phase, names it (`[TEST] ...`). `--format github` prints GitHub Actions
annotations, `--format sarif` a SARIF 2.1.0 log (code scanning). Every file given is
linted; one that cannot be read is reported (path:line:col) beside the others' findings.
Exit status: 0 no errors (warnings and notes only), 1 an error, 2 a file unreadable (after
everything is printed) or bad arguments; `--exit-zero` turns 1 into 0.

Settings may live in the project's pyproject.toml, `[tool.safe-layers]` (select, ignore,
input-shapes, per-file-ignores; the nearest one above each file, or `--config PATH`), and
findings may be silenced in the prototxt: `# safe-layers: ignore[SL201]` at the end of a
layer's opening line or on the line before it (or on the finding's own line), and
`# safe-layers: ignore-file[SL002]` anywhere for the whole file.
"""

import difflib
import os
import re
import sys

from safe_layers.core.errors import InputError
from safe_layers.readers import layer_types, netshapes, prototxt
from safe_layers.readers.net_state import layers_in_state
from safe_layers.tools import findings, rule_table
from safe_layers.tools.findings import Finding
from safe_layers.tools.lint import config as lint_config
from safe_layers.tools.lint.suppression import Suppressions
from safe_layers.tools.lint.rules import batch_norm, domain, loss, pooling, python_layers
from safe_layers.tools.lint.rules import solver as solver_rules
from safe_layers.tools.lint.rules import (CAFFE_REFUSES, FORK_SCHEMA, MODULE_MISSING, NET_PATH,
                                          SHAPES_UNKNOWN, V1_LAYERS, NetCheck, Report)

HELP = "check solver and net prototxts for the static causes of NaN (shapes from real Caffe)"


def add_arguments(parser):
    parser.add_argument("files", nargs="*", metavar="PATH",
                        help="solver or net prototxts (a solver brings the nets it names), folders "
                             "(every *.prototxt under them, in sorted order) or - (standard input)")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=N,C,H,W",
                        help="shape of a data top (or of a one-top data layer, or a net input); "
                             "it wins over what the prototxt and its data source say, N included; "
                             "repeat for several")
    parser.add_argument("--iterations", type=int, metavar="N",
                        help="simulate the learning rate over N iterations (a pycaffe loop) "
                             "instead of the solver's max_iter")
    parser.add_argument("--caffe-proto", metavar="caffe.proto",
                        help="your Caffe fork's schema (its src/caffe/proto/caffe.proto), compiled "
                             "with protoc, to read the fields it adds (default: the installed "
                             "Caffe's, plus the published forks' fields)")
    parser.add_argument("--no-shapes", action="store_true",
                        help="do not build the net with Caffe: shape-free rules only")
    parser.add_argument("--select", metavar="IDS", help="only these rule ids or prefixes (SL2,SL101); "
                        "replaces the select of [tool.safe-layers]")
    parser.add_argument("--ignore", metavar="IDS", help="leave out these rule ids or prefixes "
                        "(added to the ignore of [tool.safe-layers])")
    parser.add_argument("--config", metavar="PYPROJECT.toml",
                        help="read [tool.safe-layers] from this file for every file linted "
                             "(default: the nearest pyproject.toml with that table above each file, "
                             "else above the working directory)")
    parser.add_argument("--stdin-filename", metavar="PATH",
                        help="the name findings give the prototxt read from - (and the file its "
                             "per-file-ignores and pyproject.toml are found for)")
    parser.add_argument("--exit-zero", action="store_true",
                        help="exit 0 even when an error is found (2 still means unreadable input)")
    findings.add_list_rules_argument(parser, "lint")
    findings.add_format_argument(parser, machine_formats=True)


# The net rules, one module per family, run in this order.
NET_RULE_MODULES = (pooling, loss, batch_norm, python_layers, domain)
STDIN = "-"


def _rule_modules():
    return NET_RULE_MODULES


def list_rules():
    return rule_table.rules_of("lint")


def run(args):
    if not args.files:
        raise InputError("no FILE given (a solver or net prototxt, a folder, or - for standard "
                         "input); see --help")
    if args.caffe_proto:
        prototxt.use_schema(args.caffe_proto)
    if args.iterations is not None and args.iterations < 1:
        raise InputError("--iterations must be >= 1")
    known = [r.id for r in list_rules()]
    select = findings.rule_list(args.select, known=known, option="--select")
    ignore = findings.rule_list(args.ignore, known=known, option="--ignore")
    try:
        overrides = netshapes.parse_input_shapes(args.input_shape)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    paths, unreadable = expand_paths(args.files)
    groups = _group_by_config(paths, args, known)
    # Every file is read first, then every readable one is linted: one unreadable file
    # (exit 2) must not hide the findings of the others.
    loaded = []
    for config, group in groups:
        shapes = dict(config.input_shapes)
        shapes.update(overrides)
        linter = Linter(shapes, args.iterations, shapes=not args.no_shapes)
        loaded.append((config, linter, _load_all(linter, group, args, unreadable)))
    _check_input_shape_names(overrides, [net for _, _, docs in loaded for _, nets in docs
                                         for _, net in nets], unreadable)
    found, checked, suppressed = [], [], 0
    for config, linter, docs in loaded:
        for document, nets in docs:
            linter.lint(document, nets)
        kept, silenced = linter.unsuppressed(linter.findings())
        kept = findings.select(kept, select or config.select, config.ignore + ignore)
        found.extend(f for f in kept if not any(f.rule.startswith(i) for i in config.ignored_in(f.path)))
        checked.extend(linter.checked)
        suppressed += silenced
    found.sort(key=lambda f: (f.path, f.line, f.col, f.rule))
    status = _report(found, checked, suppressed, unreadable, args.format)
    if unreadable:
        return findings.EXIT_INPUT
    return findings.EXIT_CLEAN if args.exit_zero else status


def _report(found, checked, suppressed, unreadable, fmt):
    """Print the findings (and the unreadable files) in ``fmt``; the exit status of the
    findings alone."""
    counts = {s: sum(1 for f in found if f.severity == s) for s in findings.SEVERITIES}
    summary = "lint: %d error%s, %d warning%s, %d note%s in %s" % (
        counts["error"], "" if counts["error"] == 1 else "s",
        counts["warning"], "" if counts["warning"] == 1 else "s",
        counts["info"], "" if counts["info"] == 1 else "s", ", ".join(checked) or "no file")
    if suppressed:
        summary += "; %d silenced by safe-layers: ignore comments" % suppressed
    if unreadable:
        summary += "; %d unreadable: %s" % (len(unreadable), ", ".join(u["path"] for u in unreadable))
    for entry in unreadable:
        sys.stderr.write("safe-layers lint: error: %s\n" % entry["error"])
    sys.stderr.flush()
    return findings.emit(found, fmt, summary=summary, command="lint", errors=unreadable,
                         extra={"checked": checked, "counts": counts, "suppressed": suppressed,
                                "unreadable": unreadable})


def expand_paths(given):
    """(paths, unreadable): the files ``given`` names, a folder replaced by every
    ``*.prototxt`` under it (sorted; folders whose name starts with a dot skipped, as
    .git), and ``-`` kept for standard input; a folder without one is unreadable."""
    paths, unreadable = [], []
    if given.count(STDIN) > 1:
        raise InputError("- (standard input) given %d times; it can be read once" % given.count(STDIN))
    for path in given:
        if path == STDIN or not os.path.isdir(path):
            paths.append(path)
            continue
        found = []
        for folder, subfolders, files in os.walk(path):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            found.extend(os.path.join(folder, name) for name in files if name.endswith(".prototxt"))
        if not found:
            unreadable.append(_unreadable(path, InputError("%s: a folder with no *.prototxt "
                                                           "under it" % path)))
        paths.extend(sorted(found))
    return list(dict.fromkeys(paths)), unreadable


def _group_by_config(paths, args, known):
    """[(LintConfig, [path])]: the files that share a ``[tool.safe-layers]`` table, in the
    order given (:mod:`safe_layers.tools.lint.config`)."""
    loaded = {}

    def settings(found):
        if found not in loaded:
            loaded[found] = lint_config.load(found, known) if found else lint_config.LintConfig()
        return loaded[found]

    if args.config:
        return [(settings(args.config), paths)]
    groups, found_from = {}, {}
    for path in paths:
        named = args.stdin_filename if path == STDIN else path
        for start in (os.path.dirname(os.path.abspath(named)) if named else os.getcwd(), os.getcwd()):
            if start not in found_from:  # a folder's files share one search
                found_from[start] = lint_config.find(start)
            if found_from[start]:
                break
        groups.setdefault(found_from[start], []).append(path)
    return [(settings(found), group) for found, group in groups.items()]


def _load_all(linter, paths, args, unreadable):
    """[(Prototxt, nets)] of the readable ``paths``; each unreadable one (or a net its
    solver names that is) goes to ``unreadable``."""
    docs = []
    for path in paths:
        name = (args.stdin_filename or STDIN) if path == STDIN else path
        try:
            text = prototxt.decode_text(sys.stdin.buffer.read(), name) if path == STDIN else None
            document, nets, errors = linter.load(name, text)
        except InputError as exc:
            unreadable.append(_unreadable(name, exc))
            continue
        docs.append((document, nets))
        unreadable.extend(_unreadable(name, exc) for exc in errors)
    return docs


def _unreadable(path, error):
    """The JSON entry of a file lint could not read: the file given, where the error is
    (``path``, ``line``, ``col``: a net a solver names may be the unreadable one; 0 when
    the error names no position) and the error's text."""
    match = re.match(r"(.*?):(\d+):(\d+): ", str(error))
    where = {"file": str(path), "path": str(path), "line": 0, "col": 0}
    if match:
        where.update(path=match.group(1), line=int(match.group(2)), col=int(match.group(3)))
    where["error"] = str(error)
    return where


def _check_input_shape_names(overrides, nets, unreadable):
    """InputError (exit 2) for an --input-shape NAME that is no data top (nor one-top data
    layer) of any net linted: it would be silently ignored."""
    if not overrides or not nets:
        return
    named = set()
    tops_of = []
    for net in nets:
        tops, names = netshapes.shapeable(net.message)
        named |= names
        tops_of.append("%s: %s" % (net.path, ", ".join(tops) or "none"))
    stray = [name for name in overrides if name not in named]
    if stray:
        unread = ("; not checked against %s (unreadable)" % ", ".join(u["path"] for u in unreadable)
                  if unreadable else "")
        raise InputError("--input-shape %s: no data top or data layer of that name in the net%s "
                         "linted (data tops: %s)%s"
                         % (", ".join(stray), "s" if len(nets) > 1 else "", "; ".join(
                             dict.fromkeys(tops_of)), unread))


class Linter:
    """Lints files one by one; ``findings()`` returns them deduplicated and sorted."""

    def __init__(self, overrides=None, iterations=None, shapes=True):
        self.overrides = overrides or {}
        self.iterations = iterations
        self.build_shapes = shapes
        self.report = Report()
        self.checked = []
        self.phases_of = {}  # path -> the phases its nets were built in
        self.suppressions = {}  # path -> Suppressions of its text

    def load(self, path, text=None):
        """(Prototxt, [(field, net Prototxt)], [InputError]) of ``path`` (of ``text``, read
        from standard input, when given): a solver with the nets it names, or a net with
        field None. InputError where ``path`` itself cannot be read; a net the solver names
        that cannot be read is one of the errors returned, and the solver is still linted
        (its own rules need no net)."""
        doc = prototxt.read_prototxt(path) if text is None else prototxt.parse_prototxt(text, path)
        if not doc.root.children:
            raise InputError("%s: no field in it (an empty or comment-only file is neither a net "
                             "nor a solver; a wrong path?)" % doc.path)
        if doc.kind != "solver":
            _check_net(doc)
            return doc, [(None, doc)], []
        errors, nets = [], []
        try:
            named = prototxt.solver_nets(doc)
        except InputError as exc:
            return doc, [], [exc]
        for field, net in named:
            try:
                _check_net(net)
            except InputError as exc:
                errors.append(exc)
                continue
            nets.append((field, net))
        return doc, nets, errors

    def lint(self, doc, nets):
        self.checked.append(doc.path)
        self._suppressions(doc)
        if doc.kind == "solver":
            self.lint_solver(doc, nets)
        else:
            self.lint_net(doc, (("TRAIN", 0, ()), ("TEST", 0, ())))

    def lint_file(self, path):
        """Load and lint one file (InputError when it, or a net it names, cannot be read)."""
        doc, nets, errors = self.load(path)
        if errors:
            raise errors[0]
        self.lint(doc, nets)

    def lint_solver(self, solver, nets):
        fork = _fork_note(solver)
        if fork:
            self.report.add(solver.path, None, FORK_SCHEMA, fork,
                "run lint where your fork's pycaffe is importable: its caffe_pb2 is then the schema")
        solver_rules.check(solver, self.report, self.iterations)
        msg = solver.message
        train_state = (msg.train_state.level, tuple(msg.train_state.stage))
        test_state = ((msg.test_state[0].level, tuple(msg.test_state[0].stage))
                      if len(msg.test_state) else (0, ()))
        for field, net in nets:
            if net.reference_note:
                self.report.add(solver.path, solver.root.find(field), NET_PATH,
                                "%s %r: %s" % (field, getattr(msg, field) if field in ("net", "train_net")
                                               else net.path, net.reference_note),
                                "run from the folder Caffe resolves it against, or an absolute path")
            if field in ("net", "net_param"):
                phases = (("TRAIN",) + train_state, ("TEST",) + test_state)
            elif field.startswith("train"):
                phases = (("TRAIN",) + train_state,)
            else:
                phases = (("TEST",) + test_state,)
            self.lint_net(net, phases, solver)
        solver_rules.check_iter_size(solver, [net for _, net in nets], self.report)

    def lint_net(self, net, phases, solver=None):
        pb2 = prototxt.caffe_pb2()
        pairs = net.layers()
        self._suppressions(net).add_layers(net.text, [node for _, node in pairs])
        self.phases_of.setdefault(net.path, set()).update(phase for phase, _, _ in phases)
        fork = _fork_note(net)
        if fork:
            self.report.add(net.path, None, FORK_SCHEMA, fork,
                            "run lint where your fork's pycaffe is importable: its caffe_pb2 "
                            "is then the schema, and its Caffe builds the net")
        current = [(layer, node) for layer, node in pairs if node.name == "layer"]
        if len(current) != len(pairs):
            self.report.add(net.path, next(n for _, n in pairs if n.name == "layers"), V1_LAYERS,
                            "this net uses the V1 'layers' format: Caffe upgrades it when it builds "
                            "the net (SL001 would show a refusal), but the rules read only 'layer' entries",
                            "upgrade it with Caffe's own tool: %s %s NEW.prototxt"
                            % (netshapes.caffe_tool("upgrade_net_proto_text")
                               or "upgrade_net_proto_text", net.path))
        built_for = {}
        for phase_spec in phases:
            phase, level, stages = phase_spec
            kept = layers_in_state(current, pb2.Phase.Value(phase), level, stages)
            shapes = None
            ctx = NetCheck(net, phase, kept, None, solver, self.report)
            message = _buildable_part(net) if fork else net.message
            if self.build_shapes and message is not None:
                # A phase that keeps the same layers as one already built has its shapes
                # (no built-in layer's output shape depends on the phase; a Python layer's
                # might): one child, not two.
                key = tuple(node.start for _, node in kept)
                if any(layer.type == "Python" for layer, _ in kept):
                    key += (phase,)
                if key not in built_for:
                    built_for[key] = netshapes.infer(message, net.path, phase, self.overrides,
                                                     stages, level)
                shapes = self._shape_findings(ctx, built_for[key], pairs)
            ctx.shapes = shapes
            for module in _rule_modules():
                module.check(ctx)

    def _shape_findings(self, ctx, built, pairs):
        if built.unknown:
            ctx.add(None, SHAPES_UNKNOWN, "blob shapes unknown, so the shape rules (pooling "
                    "geometry, infogain K) ran without them: %s" % built.unknown,
                    "give the data shape with --input-shape NAME=N,C,H,W")
            return None
        if built.failure is None:
            return built
        failure = built.failure
        by_name = {layer.name: node for layer, node in pairs}
        node = by_name.get(failure["layer"])
        where = ("layer '%s'" % failure["layer"]) if failure["layer"] else "the net"
        if failure["kind"] == "import":
            ctx.add(node, MODULE_MISSING, "Caffe could not import the Python layer at %s: %s; "
                    "shapes unknown, shape-free rules only" % (where, failure["message"]),
                    "put the layer's module on PYTHONPATH (as for `caffe train`)",
                    layer=failure["layer"])
            return None
        if failure["kind"] == "timeout":
            ctx.add(node, SHAPES_UNKNOWN, "%s; shape-free rules only" % failure["message"])
            return None
        if failure["kind"] == "python" and failure["message"].startswith("ParamError"):
            return None  # SL601 reports it, with the layer's own words
        location = " (%s)" % failure["location"] if failure["location"] else ""
        message = "Caffe refuses the net at %s%s: %s" % (where, location, failure["message"].strip())
        fix = "fix %s as the message says" % where
        data = {"caffe_message": failure["message"].strip(), "location": failure["location"]}
        given = {top: shape for top, (shape, how) in built.data_shapes.items()
                 if how == "--input-shape"}
        if given:
            # The net was built with shapes the user gave, not ones it declares: a wrong
            # --input-shape makes Caffe refuse a correct net at the first layer it feeds.
            shown = ", ".join("%s=%s" % (top, ",".join(map(str, shape))) for top, shape in given.items())
            message += ("; the net was built with the shape%s given by --input-shape %s, which "
                        "may be the cause" % ("s" if len(given) > 1 else "", shown))
            fix = ("check --input-shape %s (N,C,H,W for an image net); if it is right, %s"
                   % (shown, fix))
            data["input_shapes"] = {top: list(shape) for top, shape in given.items()}
        ctx.add(node, CAFFE_REFUSES, message, fix, layer=failure["layer"], data=data)
        return None

    def findings(self):
        """The findings, one per file, place, rule and message: one found the same in every
        phase its net was built in names none; one found in some phases only (or worded
        differently by phase: another batch size) names them, ``[TEST] ...``."""
        merged = {}
        for f in self.report.findings:
            key = (f.path, f.line, f.col, f.rule, f.message)
            if key in merged:
                phases = merged[key].data.get("phase", "")
                new = f.data.get("phase")
                if new and new not in phases.split(","):
                    merged[key].data["phase"] = phases + "," + new
                continue
            merged[key] = Finding(f.path, f.line, f.col, f.rule, f.severity, f.message, f.fix,
                                  f.layer, f.data)
        for f in merged.values():
            phases = f.data.get("phase")
            if phases and set(phases.split(",")) != self.phases_of.get(f.path, set()):
                f.message = "[%s] %s" % (phases, f.message)
        return sorted(merged.values(), key=lambda f: (f.path, f.line, f.col, f.rule))

    def unsuppressed(self, found):
        """(the findings no ``# safe-layers: ignore`` comment silences, how many it did)."""
        kept = [f for f in found if f.path not in self.suppressions
                or not self.suppressions[f.path].covers(f)]
        return kept, len(found) - len(kept)

    def _suppressions(self, doc):
        if doc.path not in self.suppressions:
            self.suppressions[doc.path] = Suppressions(doc.text)
        return self.suppressions[doc.path]


def _check_net(net):
    """InputError for a net with nothing to build; else note its fork's layer types (and,
    read with --caffe-proto, the fields the installed Caffe lacks)."""
    if not net.layers() and not len(net.message.input):
        raise InputError("%s: a net without layers: nothing Caffe would build or train" % net.path)
    net.unknown_types = _unknown_types(net, net.layers())
    if prototxt.schema_is_callers():
        net.unknown_fields = prototxt.fields_installed_caffe_lacks(net)


def _unknown_types(net, pairs):
    """[(LayerParameter, Node)] of the layers whose type this Caffe does not know and a
    fork has (ROIPooling, MultiBoxLoss, BN ...: the net is read, its shapes are not built);
    InputError (exit 2, as Caffe's "Unknown layer type") for a type no fork has."""
    import caffe
    known = set(caffe.layer_type_list()) | set(layer_types.SOURCE_DATA)
    forks = []
    for layer, node in pairs:
        if node.name != "layer" or layer.type in known:
            continue
        if layer.type in layer_types.FORK_TYPES or prototxt.schema_is_callers():
            forks.append((layer, node))
            continue
        type_node = node.find("type") or node
        close = difflib.get_close_matches(layer.type, sorted(known), n=3)
        raise InputError("%s:%d:%d: layer '%s' has type '%s', which this Caffe does not know, "
                         "nor a fork safe-layers knows%s"
                         % (net.path, type_node.line, type_node.col, layer.name, layer.type,
                            " (close: %s)" % ", ".join(close) if close else
                            " (`python -c 'import caffe; print(caffe.layer_type_list())'` "
                            "lists this Caffe's)"))
    return forks


def _buildable_part(net):
    """The layers of a fork's net this Caffe can build as written: those before the first
    one of a type it lacks or with a field it lacks (a dropped field, such as ceil_mode,
    would change the shapes). None when that leaves no layer."""
    stop = {id(node) for _, node in getattr(net, "unknown_types", ())}
    for dotted, node in net.unknown_fields:
        if dotted.startswith("layer."):
            owner = next((n for _, n in net.layers() if n.start <= node.start < n.end), None)
            if owner is not None:
                stop.add(id(owner))
        else:
            return None  # a net-level field: nothing is known to be built as written
    message = type(net.message)()
    message.CopyFrom(net.message)
    del message.layer[:]
    for layer, node in net.layers():
        if node.name != "layer" or id(node) in stop:
            break
        message.layer.add().CopyFrom(layer)
    return message if len(message.layer) else None


def _fork_note(net):
    """The one line that names what this Caffe did not know in ``net`` (fields, layer
    types) and what that costs; "" when it knew everything."""
    parts = []
    fields = {}
    for dotted, node in net.unknown_fields:
        fields.setdefault(dotted.rsplit(".", 1)[-1], node.line)
    if fields:
        parts.append("fields %s" % ", ".join("%s (line %d)" % kv for kv in sorted(fields.items(),
                                                                               key=lambda kv: kv[1])))
    types = {}
    for layer, node in getattr(net, "unknown_types", ()):
        types.setdefault(layer.type, "'%s', line %d" % (layer.name, node.line))
    if types:
        parts.append("layer types %s" % ", ".join("%s (%s)" % kv for kv in types.items()))
    if not parts:
        return ""
    if net.kind == "solver":
        return ("this Caffe does not know %s (a fork's?): they are kept as written; every other "
                "rule ran" % "; ".join(parts))
    return ("this Caffe does not know %s (a fork's?): they are kept as written; Caffe builds "
            "the net here only up to the first of them, so the shape rules check the layers "
            "before it; every other rule ran" % "; ".join(parts))