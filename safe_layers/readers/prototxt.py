"""The one reader of Caffe net and solver prototxts for every ``safe-layers`` subcommand.

The meaning of a file comes from Caffe's own schema: ``caffe.proto.caffe_pb2`` (the one
the installed Caffe was built with, so a fork's extra fields parse too) and protobuf's
``text_format``. Protobuf's Python parser keeps no positions, so :class:`Node` adds them:
a lexer-level index of where each field of the text starts and ends (line, column, byte
offsets), used to point findings at ``path:line:col`` and to edit a file in place without
touching the bytes around the edit (``harden``). The index never decides what a field
means; it only mirrors the structure the protobuf parse has already accepted.

    net = read_prototxt("train_val.prototxt")          # kind detected: "net" or "solver"
    for layer, node in net.layers():                    # LayerParameter, its Node
        stride = node.find("pooling_param.stride")      # Node or None
        print(net.where(stride or node), layer.name)    # "train_val.prototxt:12:5"
"""

import os
import re
import stat

from safe_layers.core.errors import InputError
# The position index, part of this reader's API (Node, LineIndex for tools and tests).
from safe_layers.readers.prototxt_index import LineIndex, Node, index_text, line_col  # noqa: F401
from safe_layers.readers.layer_types import FORK_FIELDS

_caffe_pb2 = None

# Caffe's own schema (BVLC caffe.proto as pycaffe compiles it, a FileDescriptorSet), shipped
# for the subcommands that read Caffe's files without running Caffe (scan, diagnose) on a
# Python with no pycaffe; tests/readers checks it against the installed Caffe's.
BUNDLED_SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "caffe_schema.desc")

# How to make pycaffe importable, for every message that needs it.
PYCAFFE_HINT = ("put your Caffe's python folder on PYTHONPATH (PYTHONPATH=<caffe>/python, where "
                "`make pycaffe` built it) or, in a safe_layers checkout, run `make setup`")

# A prototxt that is not a regular file (a device, a FIFO, /dev/zero) is read up to this
# many bytes; a regular file is read whole (a 32k-layer net is 5 MB).
MAX_STREAM_BYTES = 256 << 20

# Bytes looked at for a NUL before a file is read as text: a .caffemodel or a
# .binaryproto given as a prototxt is refused without reading a gigabyte of it.
SNIFF_BYTES = 1024


def use_schema(proto_path):
    """Read every prototxt from now on with the schema in ``proto_path`` (a fork's
    caffe.proto, given as ``--caffe-proto``), compiled here with ``protoc`` into a
    descriptor pool of its own (beside, never over, the installed Caffe's caffe_pb2).
    InputError when protoc is missing or refuses the file, or it defines no
    caffe.NetParameter."""
    global _caffe_pb2
    import shutil
    import subprocess
    from safe_layers.core import scratch
    protoc = shutil.which("protoc")
    if protoc is None:
        raise InputError("--caffe-proto %s: compiling it needs protoc (Debian: apt-get install "
                         "protobuf-compiler, which building Caffe installs)" % proto_path)
    if not os.path.isfile(proto_path):
        raise InputError("--caffe-proto %s: no such file" % proto_path)
    with scratch.folder("proto") as tmp:
        out = os.path.join(tmp, "schema.desc")
        folder = os.path.dirname(os.path.abspath(proto_path))
        done = subprocess.run([protoc, "--include_imports", "--descriptor_set_out=" + out,
                               "-I", folder, os.path.abspath(proto_path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise InputError("--caffe-proto %s: protoc refuses it: %s"
                             % (proto_path, done.stderr.strip()[-2000:]))
        with open(out, "rb") as f:
            raw = f.read()
    _caffe_pb2 = CompiledSchema(raw, proto_path, from_caller=True)


_bundled_schema_allowed = False


def allow_bundled_schema():
    """From now on, read with the bundled BVLC schema where pycaffe is not importable (scan
    and diagnose read Caffe's files but never run Caffe)."""
    global _bundled_schema_allowed
    _bundled_schema_allowed = True


def bundled_schema():
    """The schema bundled with the package (Caffe's caffe.proto), compiled."""
    with open(BUNDLED_SCHEMA, "rb") as f:
        return CompiledSchema(f.read(), "Caffe's caffe.proto (bundled with safe_layers)")


class CompiledSchema:
    """A caffe.proto compiled at run time, with the attributes code reads from Caffe's
    generated ``caffe_pb2``: a class per message (``NetParameter``, ``SolverParameter``,
    ...), each top-level enum (``Phase``) and its values (``TRAIN``, ``TEST``)."""

    def __init__(self, descriptor_set, path, from_caller=False):
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
        from google.protobuf.internal import enum_type_wrapper
        files = descriptor_pb2.FileDescriptorSet()
        files.ParseFromString(descriptor_set)
        pool = descriptor_pool.DescriptorPool()
        for proto in files.file:
            pool.Add(proto)
        try:
            pool.FindMessageTypeByName("caffe.NetParameter")
        except KeyError:
            raise InputError("--caffe-proto %s defines no caffe.NetParameter: not a Caffe "
                             "schema" % path) from None
        # GetMessageClass is protobuf 4.21's; an older protobuf (a user's old pycaffe may
        # need one) has only the factory.
        message_class = getattr(message_factory, "GetMessageClass", None) \
            or message_factory.MessageFactory(pool).GetPrototype
        for proto in files.file:
            if proto.package != "caffe":
                continue
            for message in proto.message_type:
                setattr(self, message.name, message_class(
                    pool.FindMessageTypeByName("caffe." + message.name)))
            for enum in proto.enum_type:
                wrapper = enum_type_wrapper.EnumTypeWrapper(pool.FindEnumTypeByName("caffe." + enum.name))
                setattr(self, enum.name, wrapper)
                for value in enum.value:
                    setattr(self, value.name, value.number)
        self.path = path
        self.from_caller = from_caller


def schema_is_callers():
    """Whether prototxts are read with a schema given by --caffe-proto (a fork's): the
    installed Caffe cannot then be asked to build them."""
    return getattr(_caffe_pb2, "from_caller", False)


def fields_installed_caffe_lacks(doc):
    """[(dotted path, Node)] of the fields of ``doc`` (read with --caffe-proto) that the
    installed Caffe's schema does not have: what its Caffe could not read."""
    try:
        from caffe.proto import caffe_pb2 as installed
    except ImportError:
        return []
    kind = "NetParameter" if doc.kind == "net" else "SolverParameter"
    return unknown_field_nodes(doc.root, getattr(installed, kind).DESCRIPTOR)


def caffe_pb2():
    """Caffe's generated protobuf module (imported once; needs pycaffe installed)."""
    global _caffe_pb2
    if _caffe_pb2 is None:
        try:
            from caffe.proto import caffe_pb2 as module
        except ImportError as exc:
            if _bundled_schema_allowed:
                _caffe_pb2 = bundled_schema()
                return _caffe_pb2
            raise InputError("pycaffe is not importable (%s): this reads prototxts with your "
                             "Caffe's own schema; %s" % (exc, PYCAFFE_HINT)) from None
        _caffe_pb2 = module
    return _caffe_pb2


# ---------------------------------------------------------------------------------------
# Files: parse with Caffe's schema, index positions.

class Prototxt:
    """A parsed prototxt: ``message`` (NetParameter or SolverParameter, by Caffe's schema),
    ``root`` (the position index), ``text`` and ``path``; ``reference_note`` says where a
    net named by a solver was found when Caffe would not find it there (else None)."""

    def __init__(self, path, text, kind, message, root, unknown_fields=()):
        self.path, self.text, self.kind, self.message, self.root = path, text, kind, message, root
        self.reference_note = None
        # [(dotted field path, Node)] this Caffe's schema does not have (a fork's fields):
        # kept in the text, left out of ``message``.
        self.unknown_fields = list(unknown_fields)

    def where(self, node=None):
        """(line, col) of ``node`` (the start of the file when None)."""
        return (node.line, node.col) if node is not None else (1, 1)

    def layers(self):
        """[(LayerParameter, Node)] of a net, in file order; V1 ``layers`` entries are
        returned as V1LayerParameter (Caffe upgrades them when it reads the file)."""
        if self.kind != "net":
            raise ValueError("%s is a %s, not a net" % (self.path, self.kind))
        return layer_nodes(self.message, self.root)


def layer_nodes(net_message, net_node):
    """[(LayerParameter, Node)] pairing the parsed layers with their positions (text
    order is protobuf's order for a repeated field)."""
    pairs = []
    for field in ("layer", "layers"):
        messages = list(getattr(net_message, field))
        nodes = [n for n in net_node.children if n.name == field]
        if len(messages) != len(nodes):  # cannot happen for text protobuf accepted
            raise InputError("position index found %d '%s' blocks where protobuf parsed %d"
                             % (len(nodes), field, len(messages)))
        pairs.extend(zip(messages, nodes))
    return pairs


def read_text(path):
    try:
        raw = _read_bounded(path)
    except FileNotFoundError:
        raise InputError("%s: no such file" % path) from None
    except IsADirectoryError:
        raise InputError("%s: is a directory, not a prototxt" % path) from None
    except OSError as exc:
        raise InputError("%s: cannot read: %s" % (path, exc.strerror or exc)) from None
    return decode_text(raw, path)


def decode_text(raw, path):
    """The text of a prototxt's bytes ``raw`` (read from ``path``, the name errors give);
    InputError for bytes no text prototxt holds."""
    # A NUL is never in a text prototxt (and a file read only as far as its first
    # kilobyte ends at one); a byte that is not UTF-8 before it is named first.
    nul = raw.find(b"\0")
    try:
        text = raw[:nul].decode("utf-8") if nul >= 0 else raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, col = line_col(raw.decode("utf-8", "replace"), exc.start)
        raise InputError("%s:%d:%d: not a text prototxt (byte 0x%02x is not UTF-8; a binary "
                         "file such as a .caffemodel or .binaryproto?)"
                         % (path, line, col, raw[exc.start])) from None
    if nul >= 0:
        line, col = line_col(text, nul)
        raise InputError("%s:%d:%d: not a text prototxt (byte 0x00 is a NUL; a binary file "
                         "such as a .caffemodel or .binaryproto?)" % (path, line, col))
    return text


def _read_bounded(path):
    """The bytes of ``path``: a regular file whole; anything else (a device, a FIFO) up to
    :data:`MAX_STREAM_BYTES`, and refused past that. Either way a file whose first
    :data:`SNIFF_BYTES` hold a NUL is returned after those bytes alone."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
        if b"\0" in head:
            return head
        if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return head + f.read()
        rest = f.read(MAX_STREAM_BYTES + 1 - len(head))
        if len(head) + len(rest) > MAX_STREAM_BYTES:
            raise InputError("%s: not a regular file, and more than %d MB came out of it "
                             "without an end" % (path, MAX_STREAM_BYTES >> 20))
        return head + rest


_UNKNOWN_FIELD = re.compile(r'has no field named "')


def parse_text(text, message_type, path, unknown_fields=False):
    """``text`` parsed into a new ``caffe_pb2.<message_type>``; InputError with
    ``path:line:col`` on the protobuf error (worded as a file that ends too soon when the
    error is at its end and a block, field or string is left open there). With
    ``unknown_fields``, fields this schema lacks (a Caffe fork's) are skipped, not errors."""
    from google.protobuf import text_format
    message = getattr(caffe_pb2(), message_type)()
    try:
        text_format.Parse(text, message, allow_unknown_field=unknown_fields)
    except text_format.ParseError as exc:
        line, col = exc.GetLine(), exc.GetColumn()
        detail = str(exc)
        detail = re.sub(r"^\d+:\d+ : ", "", detail)
        if line is not None:
            cut = _cut_short(text, line, col)
            if cut:
                detail = "the file ends here, %s: is it cut short? (protobuf: %s)" % (cut, detail)
            raise InputError("%s:%d:%d: %s" % (path, line, col, detail)) from None
        raise InputError("%s: %s" % (path, detail)) from None
    return message


# Tokens of a text that may be cut anywhere (a string literal may lack its closing quote).
_LOOSE_TOKEN = re.compile(r"""\s+|\#[^\n]*|"(?:[^"\\\n]|\\.)*"?|'(?:[^'\\\n]|\\.)*'?"""
                          r"""|[A-Za-z0-9_.+\-]+|.""", re.S)


def _cut_short(text, line, col):
    """What the end of ``text`` leaves open, when protobuf's error at ``line``:``col`` is
    at the last token or past it and something is left open there (a block, a list, a
    field without its value, a string without its closing quote); else None. Protobuf
    reports a file that ends too soon at its last token, in words about that token
    ("Couldn't parse integer: ''", 'Expected "}".') that do not say the file ended."""
    tokens = [(m.group(), m.start()) for m in _LOOSE_TOKEN.finditer(text)
              if not m.group()[:1].isspace() and not m.group().startswith("#")]
    if not tokens:
        return None
    lines = text.split("\n")
    offset = sum(len(l) + 1 for l in lines[:line - 1]) + col - 1
    if offset < tokens[-1][1]:
        return None
    open_blocks, name = [], None
    previous = None
    for token, _ in tokens:
        if token in ("{", "<", "["):
            open_blocks.append((name or "?") + (" [" if token == "[" else " {"))
        elif token in ("}", ">", "]") and open_blocks:
            open_blocks.pop()
        elif (token[0].isalnum() or token[0] == "_") and previous != ":":
            name = token
        previous = token
    last = tokens[-1][0]
    parts = []
    if last[0] in "\"'" and (len(last) == 1 or last[-1] != last[0]):
        parts.append("in the middle of a string (no closing quote)")
    elif last == ":" or ((last[0].isalnum() or last[0] == "_") and
                         (len(tokens) < 2 or tokens[-2][0] != ":")):
        parts.append("in the middle of field '%s' (no value)" % name)
    if open_blocks:
        closers = "".join("]" if b.endswith("[") else "}" for b in reversed(open_blocks))
        parts.append("inside '%s ...' (%s)" % (
            " ".join(open_blocks), "%d closing '%s' missing" % (len(closers), closers[0])
            if len(set(closers)) == 1 else "'%s' missing" % closers))
    return ", ".join(parts) or None


def _kind_of(root):
    """'net' or 'solver': which message type the top-level field names belong to."""
    pb2 = caffe_pb2()
    names = {child.name for child in root.children}
    net_fields = set(pb2.NetParameter.DESCRIPTOR.fields_by_name)
    solver_fields = set(pb2.SolverParameter.DESCRIPTOR.fields_by_name)
    if not names or names <= net_fields:
        return "net"
    if names <= solver_fields:
        return "solver"
    return "solver" if len(names & solver_fields) > len(names & net_fields) else "net"


def read_prototxt(path, kind=None):
    """Read and parse ``path`` as a net or solver (``kind``; detected when None).
    Raises InputError (exit 2) saying what and where when it cannot."""
    path = str(path)
    return parse_prototxt(read_text(path), path, kind)


def parse_prototxt(text, path, kind=None):
    """:func:`read_prototxt` of a text already read (standard input), named ``path``."""
    try:
        root = index_text(text, path)
    except InputError:
        # Let protobuf word the error where it can (it knows the schema); ours otherwise.
        # Kind unknown: the message type whose parse gets further is the one meant.
        errors = []
        for message_type in ((["NetParameter"] if kind != "solver" else []) +
                             (["SolverParameter"] if kind != "net" else [])):
            try:
                parse_text(text, message_type, path)
            except InputError as exc:
                errors.append(exc)
        if errors:
            raise max(errors, key=_error_position)
        raise
    detected = kind is None
    kind = kind or _kind_of(root)
    message_type = "NetParameter" if kind == "net" else "SolverParameter"
    try:
        message = parse_text(text, message_type, path)
        unknown = []
    except InputError as exc:
        if not detected:
            _refuse_other_kind(text, kind, path)
        if not _UNKNOWN_FIELD.search(str(exc)):
            raise
        # A field this Caffe lacks: a fork's prototxt (py-faster-rcnn, SSD, SegNet ...) is
        # read, its fields kept in the text and the rules that need them skipped; a name no
        # fork has is a mistake, refused as Caffe would.
        message = parse_text(text, message_type, path, unknown_fields=True)
        unknown = unknown_field_nodes(root, message.DESCRIPTOR)
        strangers = [(d, n) for d, n in unknown if d.rsplit(".", 1)[-1] not in FORK_FIELDS]
        if strangers:
            dotted, node = strangers[0]
            hint = ("not a field of this Caffe's caffe.proto, nor of the forks safe-layers knows "
                    "(py-faster-rcnn, SSD, SegNet): a typo?")
            if '"%s"' % node.name in str(exc):
                raise InputError("%s (%s)" % (exc, hint)) from None
            raise InputError('%s:%d:%d: no field named "%s" (%s)'
                             % (path, node.line, node.col, dotted, hint)) from None
    return Prototxt(path, text, kind, message, root, unknown)


def unknown_field_nodes(node, descriptor, prefix=""):
    """[(dotted path, Node)] of the fields under ``node`` that ``descriptor`` (a message
    type of the schema) does not have; a known message field is searched in turn."""
    found = []
    for child in node.children:
        if child.name.startswith("["):
            continue  # an extension, resolved by protobuf itself
        field = descriptor.fields_by_name.get(child.name)
        dotted = prefix + child.name
        if field is None:
            found.append((dotted, child))
        elif field.message_type is not None and child.is_message:
            found.extend(unknown_field_nodes(child, field.message_type, dotted + "."))
        elif field.message_type is not None and child.value == "[list]":
            for item in child.children:
                found.extend(unknown_field_nodes(item, field.message_type, dotted + "."))
    return found


class WrongKind(InputError):
    """A net given where a solver is expected, or a solver where a net is."""


def _refuse_other_kind(text, kind, path):
    """InputError when a text asked for as ``kind``, which does not parse as it, parses as
    the other kind: a net where a solver is expected (``train -solver``, ``harden
    --solver``), or a solver named by a solver's ``net:``. Protobuf alone would say 'has no
    field named "name"', which does not tell what went wrong."""
    try:
        parse_text(text, "SolverParameter" if kind == "net" else "NetParameter", path)
    except InputError:
        return  # neither kind: the caller's error says what is wrong
    if kind == "solver":
        raise WrongKind("%s is a net prototxt, not a solver: where a solver is expected "
                        "(train -solver, harden --solver) give the solver file, whose net: "
                        "names this net" % path) from None
    raise WrongKind("%s is a solver prototxt, not a net: a solver's net / train_net / test_net "
                    "names a net prototxt (its layers), not another solver" % path) from None


def _error_position(error):
    """(line, column) of an InputError worded 'path:line:col: ...' ((0, 0) without)."""
    match = re.search(r":(\d+):(\d+): ", str(error))
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def read_net(path):
    return read_prototxt(path, "net")


def read_solver(path):
    return read_prototxt(path, "solver")


def read_solver_param(path):
    """The SolverParameter of ``path`` as Caffe builds it (``snapshot_prefix`` defaulted
    and resolved the way ``ReadSolverParamsFromTextFileOrDie`` does)."""
    param = read_solver(path).message
    resolve_snapshot_prefix(param, path)
    return param


def resolve_snapshot_prefix(param, solver_path):
    """Caffe's ``UpgradeSnapshotPrefixProperty`` (src/caffe/util/upgrade_proto.cpp:1102):
    no prefix -> the solver file's path without extension; a directory -> that
    directory / the solver file's stem."""
    if not param.HasField("snapshot_prefix"):
        param.snapshot_prefix = os.path.splitext(solver_path)[0]
    elif os.path.isdir(param.snapshot_prefix):
        stem = os.path.splitext(os.path.basename(solver_path))[0]
        param.snapshot_prefix = os.path.join(param.snapshot_prefix, stem)
    return param


def resolve_reference(name, referencing_file):
    """Where a path written inside a prototxt (a solver's ``net``, a data layer's
    ``source``) points, and a note when that differs from what Caffe would open.

    Caffe opens such paths relative to the *working directory* of the process, not to the
    file that names them. Returns ``(path, note)``: the working-directory path when it
    exists (note None); else the path relative to the referencing file's folder when that
    exists (note says `caffe train` run from here would not find it); else
    ``(name, "does not exist")``.
    """
    if os.path.isabs(name) or os.path.exists(name):
        return name, None if os.path.exists(name) else "does not exist"
    beside = os.path.join(os.path.dirname(os.path.abspath(referencing_file)), name)
    if os.path.exists(beside):
        return beside, ("found beside %s, not in the working directory %s, where Caffe looks; "
                        "run from %s or give an absolute path"
                        % (referencing_file, os.getcwd(), os.path.dirname(os.path.abspath(referencing_file))))
    return name, "does not exist"


def solver_nets(solver):
    """The nets a solver names: [(field, Prototxt)] for ``net`` / ``train_net`` /
    ``test_net`` (files, resolved with :func:`resolve_reference`) and ``net_param`` /
    ``train_net_param`` / ``test_net_param`` (inline; their Prototxt shares the solver's
    text and path, its ``root`` is the inline block). Raises InputError for a named net
    file that does not exist."""
    message = solver.message
    nets = []
    for field in ("net", "train_net"):
        if message.HasField(field):
            nets.append((field, _referenced_net(getattr(message, field), solver, field)))
    for name in message.test_net:
        nets.append(("test_net", _referenced_net(name, solver, "test_net")))
    for field in ("net_param", "train_net_param"):
        if message.HasField(field):
            nets.append((field, Prototxt(solver.path, solver.text, "net", getattr(message, field),
                                         solver.root.find(field))))
    for sub, node in zip(message.test_net_param, solver.root.all("test_net_param")):
        nets.append(("test_net_param", Prototxt(solver.path, solver.text, "net", sub, node)))
    return nets


def _referenced_net(name, solver, field):
    path, note = resolve_reference(name, solver.path)
    if note == "does not exist":
        node = solver.root.find(field)
        line, col = solver.where(node)
        raise InputError("%s:%d:%d: %s: %r does not exist (Caffe opens it relative to the working "
                         "directory, %s)" % (solver.path, line, col, field, name, os.getcwd()))
    try:
        net = read_net(path)
    except WrongKind as exc:
        line, col = solver.where(solver.root.find(field))
        raise InputError("%s:%d:%d: %s: %s" % (solver.path, line, col, field, exc)) from None
    net.reference_note = note
    return net
