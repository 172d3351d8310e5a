"""Blob shapes of a net, from real Caffe, built in a child process.

Caffe's ``CHECK`` / ``LOG(FATAL)`` abort the whole process, so the net is never built in
the tool's own: :func:`infer` writes a copy of the net in which every data layer is an
``Input`` layer of known shapes, runs ``python -m safe_layers.readers.netshapes`` on it, and
reads back, for each layer, the shapes of its bottoms and tops; or Caffe's own message and
the layer it was setting up when it refused the net.

Where a data top's shape comes from (first that answers):

1. ``--input-shape NAME=N,C,H,W`` (NAME a data top, or a data layer with one top): what
   the user says wins, its N included; the layer's other tops (labels) take that N too,
   as all tops of a data layer share one batch size;
2. the net's own declaration: the net-level ``input`` with ``input_shape`` /
   ``input_dim``, ``Input``/``DummyData`` shapes, ``MemoryData``'s batch/channels/
   height/width, ``batch_size``, ``crop_size``, ``new_height``/``new_width``,
   ``is_color``, the mean file's or mean values' channel count;
3. the first record of its source (LMDB/LevelDB ``Datum``, the datasets of the first HDF5
   file, the first image of an ``ImageData`` list), read with
   :mod:`safe_layers.readers.datasets`, for what the declaration leaves open.

When one data top stays unknown the net cannot be built with true shapes: :func:`infer`
says which, and how to give it, and the caller falls back to shape-free rules.
"""

import json
import os
import re
import subprocess
import sys

from safe_layers.core import scratch
from safe_layers.core.errors import InputError
from safe_layers.readers import datasets, layer_types, prototxt

# Layer types that read data from outside the net; each is replaced by an Input layer.
CHILD_TIMEOUT_S = 300


class ShapeUnknown(Exception):
    """A data top whose shape cannot be known from the prototxt, its sources or the
    command line."""


class Shapes:
    """What Caffe said about one net in one phase.

    Attributes:
        layers (dict): layer name -> {"type", "bottoms": [(blob, shape)], "tops": [...]}
            (shapes as tuples), for the layers Caffe built (its own Split layers included).
        failure (dict or None): {"message", "layer", "location", "kind"} when Caffe refused
            the net (kind "caffe": a CHECK/LOG(FATAL); "python": an exception from a
            Python layer; "import": a Python layer's module not importable; "crash": the
            child died otherwise; "timeout").
        unknown (str or None): why shapes could not be known (no build was tried).
        data_shapes (dict): data top -> (shape, where it came from).
    """

    def __init__(self, layers=None, failure=None, unknown=None, data_shapes=None):
        self.layers = layers or {}
        self.failure = failure
        self.unknown = unknown
        self.data_shapes = data_shapes or {}

    @property
    def known(self):
        return bool(self.layers) and self.failure is None

    def bottom_shape(self, layer_name, index=0):
        entry = self.layers.get(layer_name)
        if entry is None or index >= len(entry["bottoms"]):
            return None
        return entry["bottoms"][index][1]

    def top_shape(self, layer_name, index=0):
        entry = self.layers.get(layer_name)
        if entry is None or index >= len(entry["tops"]):
            return None
        return entry["tops"][index][1]


# Caffe's kMaxBlobAxes: a blob has at most 32 axes.
MAX_AXES = 32


def parse_input_shapes(items):
    """``["data=64,1,28,28", ...]`` -> {"data": (64, 1, 28, 28)}; ValueError when malformed.
    Any blob shape Caffe can hold is accepted (1 to 32 positive dimensions): Caffe's blobs
    are N-d, and whether a layer takes the shape is Caffe's to say when it builds the net."""
    shapes = {}
    for item in items or ():
        name, sep, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if (not sep or not name.strip() or not shape or len(shape) > MAX_AXES
                or any(d <= 0 for d in shape)):
            raise ValueError("--input-shape %r: expected NAME=N,C,H,W (a blob shape: 1 to %d "
                             "positive integers, N first), e.g. data=64,3,224,224"
                             % (item, MAX_AXES))
        shapes[name.strip()] = shape
    return shapes


def is_source(layer):
    """Whether a layer's tops come from outside the net (data layers, Input, DummyData,
    a Python layer without bottoms): the tops --input-shape can shape."""
    return (layer.type in layer_types.SOURCE_DATA or layer.type in ("Input", "DummyData")
            or (layer.type == "Python" and not layer.bottom))


def shapeable(net_message):
    """(tops, names): the net's data tops in file order (net-level ``input``s, the tops of
    its source layers) and every name --input-shape accepts (those tops and the name of
    each source layer with one top)."""
    tops, names = list(net_message.input), set(net_message.input)
    # V1 entries: their data layers by the V1 type enum's names (DATA, IMAGE_DATA, ...).
    v1_sources = {"DATA", "IMAGE_DATA", "HDF5_DATA", "WINDOW_DATA", "MEMORY_DATA", "DUMMY_DATA"}
    for layer in net_message.layers:
        type_name = layer.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_number[layer.type].name
        if type_name in v1_sources:
            tops.extend(t for t in layer.top if t not in tops)
            names.update(layer.top)
            if len(layer.top) == 1:
                names.add(layer.name)
    for layer in net_message.layer:
        if is_source(layer):
            tops.extend(t for t in layer.top if t not in tops)
            names.update(layer.top)
            if len(layer.top) == 1:
                names.add(layer.name)
    return tops, names


def _given(layer, index, overrides):
    """The --input-shape for the layer's top ``index`` (by top name, or by the layer's name
    when it has one top), or None."""
    top = layer.top[index]
    if top in overrides:
        return overrides[top]
    if len(layer.top) == 1 and layer.name in overrides:
        return overrides[layer.name]
    return None


# ---------------------------------------------------------------------------------------
# Data layers -> Input layers

def data_layer_shapes(layer, overrides, net_path):
    """{top: (shape, how)} for a data layer; raises ShapeUnknown saying what is missing."""
    tops = list(layer.top)
    found = {}
    for i, top in enumerate(tops):
        shape = _given(layer, i, overrides)
        if shape is not None:
            found[top] = (tuple(shape), "--input-shape")
    if len(found) == len(tops):
        return found
    declared = _declared_shapes(layer, net_path)
    # A given N is the batch of every top of the layer (the labels must match the data).
    batch = next(iter(found.values()))[0][0] if found else None
    for top in tops:
        if top not in found and top in declared:
            shape, how = declared[top]
            if batch is not None and shape:
                shape, how = (batch,) + tuple(shape[1:]), how + ", N from --input-shape"
            found[top] = (shape, how)
    missing = [t for t in tops if t not in found]
    if missing:
        raise ShapeUnknown("data layer '%s' (%s): shape of top %s unknown (%s); give it with "
                           "--input-shape %s=N,C,H,W"
                           % (layer.name, layer.type, ", ".join("'%s'" % t for t in missing),
                              declared.get("__why__", "not declared in the prototxt"), missing[0]))
    return found


def _dummy_shapes(layer):
    """The shape DummyData declares for each top (``shape``, or the legacy num/channels/
    height/width; one entry for all tops or one per top), None where it declares none."""
    p = layer.dummy_data_param
    shapes = []
    for i in range(len(layer.top)):
        if len(p.shape):
            shapes.append(tuple(p.shape[i if len(p.shape) > 1 else 0].dim))
        elif len(p.num):
            def pick(values):
                return values[i if len(values) > 1 else 0] if len(values) else 0
            shapes.append((pick(p.num), pick(p.channels), pick(p.height), pick(p.width)))
        else:
            shapes.append(None)
    return shapes


def _declared_input_shapes(layer):
    """The shape an Input layer declares for each top (None where it declares none)."""
    p = layer.input_param
    return [tuple(p.shape[i if len(p.shape) > 1 else 0].dim) if len(p.shape) else None
            for i in range(len(layer.top))]


def _as_input(layer, shapes, pb2):
    """Make ``layer`` an Input layer of ``shapes`` (one per top), keeping its name, tops
    and phase rules."""
    replacement = pb2.LayerParameter()
    replacement.name = layer.name
    replacement.type = "Input"
    replacement.top.extend(layer.top)
    replacement.include.extend(layer.include)
    replacement.exclude.extend(layer.exclude)
    for shape in shapes:
        replacement.input_param.shape.add().dim.extend(shape)
    layer.CopyFrom(replacement)


def _net_inputs(net, overrides, data_shapes):
    """Apply --input-shape to the net-level ``input`` fields (``input_shape``, or the legacy
    ``input_dim``, four per input), rewriting them as ``input_shape``."""
    given = [overrides.get(name) for name in net.input]
    if all(g is None for g in given):
        return
    shapes = []
    for i, name in enumerate(net.input):
        if given[i] is not None:
            shapes.append(tuple(given[i]))
            data_shapes[name] = (tuple(given[i]), "--input-shape")
        elif len(net.input_shape) > i:
            shapes.append(tuple(net.input_shape[i].dim))
        elif len(net.input_dim) >= 4 * (i + 1):
            shapes.append(tuple(net.input_dim[4 * i:4 * i + 4]))
        else:
            raise ShapeUnknown("net input '%s' declares no shape (input_shape / input_dim); give it "
                               "with --input-shape %s=N,C,H,W" % (name, name))
    del net.input_dim[:]
    del net.input_shape[:]
    for shape in shapes:
        net.input_shape.add().dim.extend(shape)


def _declared_shapes(layer, net_path):
    kind = layer.type
    out = {}
    tops = list(layer.top)
    if kind == "MemoryData":
        p = layer.memory_data_param
        if p.batch_size and p.channels and p.height and p.width and tops:
            out[tops[0]] = ((p.batch_size, p.channels, p.height, p.width), "memory_data_param")
        if len(tops) > 1:
            out[tops[1]] = ((p.batch_size,), "memory_data_param")
        return out
    if kind in ("Data", "ImageData", "WindowData", "AnnotatedData"):
        param = {"Data": layer.data_param, "ImageData": layer.image_data_param,
                 "WindowData": layer.window_data_param, "AnnotatedData": layer.data_param}[kind]
        batch = param.batch_size
        if len(tops) > 1 and batch:
            out[tops[1]] = ((batch,), "batch_size")
        if not tops:
            return out
        why = []
        record = None
        try:
            record = _first_record_shape(layer, net_path)
        except ShapeUnknown as exc:
            why.append(str(exc))
        transform = layer.transform_param
        crop = transform.crop_size or (param.crop_size if kind == "WindowData" else 0)
        channels = _transform_channels(transform, net_path)
        height = width = None
        how = []
        if kind == "ImageData":
            channels = 3 if param.is_color else 1
            if param.new_height and param.new_width:
                height, width = param.new_height, param.new_width
                how.append("new_height/new_width")
        if kind == "WindowData":
            channels = 3
        if record is not None:
            c, h, w, src = record
            channels = channels or c
            if height is None:
                height, width = h, w
            how.append(src)
        if crop:
            height = width = crop
            how.append("crop_size")
        if channels and height and width and batch:
            out[tops[0]] = ((batch, channels, height, width), ", ".join(how) or "declared")
        else:
            missing = [name for name, v in (("batch_size", batch), ("channels", channels),
                                            ("height/width", height)) if not v]
            out["__why__"] = "; ".join(why + ["%s not declared" % " and ".join(missing)])
        return out
    if kind == "HDF5Data":
        batch = layer.hdf5_data_param.batch_size
        try:
            datasets = _hdf5_first_file_shapes(layer, net_path)
        except ShapeUnknown as exc:
            out["__why__"] = str(exc)
            return out
        for top in tops:
            if top in datasets and batch:
                out[top] = ((batch,) + tuple(datasets[top][1:]), "HDF5 source")
        return out
    out["__why__"] = "a %s layer declares no shape" % kind
    return out


def _transform_channels(transform, net_path):
    """Channels implied by the mean: a mean file's channels, or 3 mean values (BGR)."""
    if transform.mean_file:
        path, note = prototxt.resolve_reference(transform.mean_file, net_path)
        if note != "does not exist":
            try:
                blob = prototxt.caffe_pb2().BlobProto()
                with open(path, "rb") as f:
                    blob.ParseFromString(f.read())
                if blob.HasField("shape") and len(blob.shape.dim) >= 3:
                    return int(blob.shape.dim[-3])
                return int(blob.channels) or None
            except Exception:  # noqa: BLE001 - an unreadable mean file: channels unknown
                return None
    if len(transform.mean_value) > 1:
        return len(transform.mean_value)
    return None


def _first_record_shape(layer, net_path):
    """(C, H, W, how) of the first record of a Data/ImageData source, or None when the
    layer has no source; ShapeUnknown with the reason when it cannot be read."""
    if layer.type in ("Data", "AnnotatedData") and layer.data_param.source:
        source = layer.data_param.source
        path, note = prototxt.resolve_reference(source, net_path)
        if note == "does not exist":
            raise ShapeUnknown("source %r does not exist" % source)
        backend = prototxt.caffe_pb2().DataParameter.DB.Name(layer.data_param.backend).lower()
        try:
            shape = datasets.first_datum_shape(path, backend)
        except InputError as exc:
            raise ShapeUnknown("source %r unreadable: %s" % (source, exc)) from None
        return tuple(shape) + ("first record of %s" % source,)
    if layer.type == "ImageData" and layer.image_data_param.source:
        p = layer.image_data_param
        path, note = prototxt.resolve_reference(p.source, net_path)
        if note == "does not exist":
            raise ShapeUnknown("source %r does not exist" % p.source)
        with open(path) as f:
            first = f.readline().split()
        if not first:
            raise ShapeUnknown("source %r is empty" % p.source)
        image = os.path.join(p.root_folder, first[0]) if p.root_folder else first[0]
        try:
            with open(image, "rb") as f:
                size = _image_size(f.read())
        except OSError as exc:
            raise ShapeUnknown("first image %r unreadable: %s" % (image, exc.strerror)) from None
        if size is None:
            raise ShapeUnknown("first image %r could not be decoded" % image)
        return size + ("first image of %s" % p.source,)
    return None


def _image_size(raw):
    """(C, H, W) of an encoded image (Pillow), or None."""
    try:
        import io
        from PIL import Image
        with Image.open(io.BytesIO(raw)) as image:
            channels = len(image.getbands())
            return (3 if channels >= 3 else 1, image.height, image.width)
    except Exception:  # noqa: BLE001 - not an image Pillow reads
        return None


def _hdf5_first_file_shapes(layer, net_path):
    source = layer.hdf5_data_param.source
    path, note = prototxt.resolve_reference(source, net_path)
    if note == "does not exist":
        raise ShapeUnknown("source %r does not exist" % source)
    try:
        return datasets.hdf5_first_shapes(path, list(layer.top))
    except InputError as exc:
        raise ShapeUnknown("source %r unreadable: %s" % (source, exc)) from None


def input_net(net_message, net_path, overrides):
    """A copy of ``net_message`` whose data layers are Input layers of known shapes, and
    {top: (shape, how)} (data layers' tops, and the inputs --input-shape gave). Raises
    ShapeUnknown for the first data top it cannot shape."""
    pb2 = prototxt.caffe_pb2()
    copy = pb2.NetParameter()
    copy.CopyFrom(net_message)
    data_shapes = {}
    _net_inputs(copy, overrides, data_shapes)
    for layer in copy.layer:
        if not is_source(layer):
            continue
        given = [_given(layer, i, overrides) for i in range(len(layer.top))]
        if layer.type in ("Input", "DummyData"):
            if all(g is None for g in given):
                continue  # Caffe builds it as declared
            declared = (_declared_input_shapes(layer) if layer.type == "Input"
                        else _dummy_shapes(layer))
            # The batch given for one top is every top's (labels included), as for Data.
            batch = next((g[0] for g in given if g), None)
            shapes = []
            for top, shape, own in zip(layer.top, given, declared):
                if shape is not None:
                    data_shapes[top] = (tuple(shape), "--input-shape")
                elif own and batch is not None:
                    own = (batch,) + tuple(own[1:])
                shapes.append(shape if shape is not None else own or ())
            _as_input(layer, shapes, pb2)
            continue
        if layer.type == "Python" and all(g is None for g in given):
            raise ShapeUnknown("Python data layer '%s': its shapes come from Python code; give "
                               "them with --input-shape %s=N,C,H,W"
                               % (layer.name, layer.top[0] if layer.top else "NAME"))
        shapes = data_layer_shapes(layer, overrides, net_path)
        data_shapes.update(shapes)
        _as_input(layer, [shapes[top][0] for top in layer.top], pb2)
    return copy, data_shapes


# ---------------------------------------------------------------------------------------
# The child process

_GLOG = re.compile(r"^([IWEF])\d{4}(?:\d{4})? \d\d:\d\d:\d\d\.\d{6} +\d+ (\S+:\d+)\] (.*)$")
_CREATING = re.compile(r"^Creating [Ll]ayer (.+)$")
_SETTING_UP = re.compile(r"^Setting up (.+)$")
_NAMED_LAYER = re.compile(r"layer '([^']+)'")
_PY_ERROR = re.compile(r"^[A-Za-z_.]*(Error|Exception): .*$")


def upgraded_v1(net_message, timeout=CHILD_TIMEOUT_S):
    """``net_message`` with its V1 ``layers`` entries upgraded to ``layer`` as Caffe does
    when it reads a net (upgrade_proto.cpp: UpgradeV1Net), by Caffe's own
    ``upgrade_net_proto_text`` (beside the ``caffe`` binary); None where that tool is not
    there or refuses the net."""
    from google.protobuf import text_format
    tool = caffe_tool("upgrade_net_proto_text")
    if tool is None:
        return None
    with scratch.folder("upgrade") as tmp:
        old, new = os.path.join(tmp, "v1.prototxt"), os.path.join(tmp, "v2.prototxt")
        with open(old, "w") as f:
            f.write(text_format.MessageToString(net_message))
        try:
            done = subprocess.run([tool, old, new], capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode != 0 or not os.path.exists(new):
            return None
        upgraded = type(net_message)()
        with open(new) as f:
            text_format.Parse(f.read(), upgraded)
        return upgraded


def caffe_tool(name):
    """The path of one of Caffe's tools (``upgrade_net_proto_text``, ...): on PATH, beside
    this Python (a venv's bin, where set-up puts them), or beside the ``caffe`` binary."""
    import shutil
    for folder in (None, os.path.dirname(sys.executable)):
        found = shutil.which(name, path=folder)
        if found:
            return found
    caffe = shutil.which("caffe") or shutil.which("caffe", path=os.path.dirname(sys.executable))
    if caffe:
        with open(caffe, "rb") as f:
            head = f.read(4096)
        # set-up's wrapper script names the real binary: its folder holds the tools.
        match = re.search(rb'exec "([^"]+)/caffe"', head)
        if match:
            candidate = os.path.join(match.group(1).decode(), name)
            if os.access(candidate, os.X_OK):
                return candidate
    return None


def infer(net_message, net_path, phase, overrides=None, stages=(), level=0, timeout=CHILD_TIMEOUT_S):
    """Shapes of ``net_message`` (a NetParameter) in ``phase`` ('TRAIN' or 'TEST'); a V1 net
    is upgraded first, as Caffe does when it reads one, so that its data layers are
    replaced like any other."""
    if len(net_message.layers):
        upgraded = upgraded_v1(net_message)
        if upgraded is None:
            return Shapes(unknown="a V1 net ('layers' entries), and Caffe's upgrade_net_proto_text "
                                  "is not on PATH to upgrade it as Caffe would (Caffe builds it beside "
                                  "the caffe binary, in build/tools)")
        net_message = upgraded
    try:
        net, data_shapes = input_net(net_message, net_path, overrides or {})
    except ShapeUnknown as exc:
        return Shapes(unknown=str(exc))
    from google.protobuf import text_format
    with scratch.folder("shapes") as tmp:
        net_file = os.path.join(tmp, "net.prototxt")
        out_file = os.path.join(tmp, "shapes.json")
        with open(net_file, "w") as f:
            f.write(text_format.MessageToString(net))
        env = dict(os.environ)
        env["GLOG_minloglevel"] = "0"  # "Creating Layer X" tells which layer Caffe refused
        env["GLOG_logtostderr"] = "1"
        # Python layers of the user's net import as they would beside the net.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (os.path.dirname(os.path.abspath(net_path)), env.get("PYTHONPATH")) if p)
        command = [sys.executable, "-m", "safe_layers.readers.netshapes", net_file, phase, out_file,
                   str(level)] + list(stages)
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Shapes(failure={"kind": "timeout", "layer": None, "location": None,
                                   "message": "Caffe did not build the net within %d s" % timeout},
                          data_shapes=data_shapes)
        result = None
        if done.returncode == 0 and os.path.exists(out_file):
            with open(out_file) as f:
                result = json.load(f)
        if result is not None and "layers" in result:
            layers = {entry["name"]: {"type": entry["type"],
                                      "bottoms": [(b, tuple(s)) for b, s in entry["bottoms"]],
                                      "tops": [(t, tuple(s)) for t, s in entry["tops"]]}
                      for entry in result["layers"]}
            return Shapes(layers=layers, data_shapes=data_shapes)
        return Shapes(failure=_failure(done, result), data_shapes=data_shapes)


def _failure(done, result):
    """What the child's stderr (glog) and result say about why Caffe refused the net."""
    current = None
    fatal = None
    for line in done.stderr.splitlines():
        match = _GLOG.match(line)
        if not match:
            continue
        level, location, text = match.groups()
        for pattern in (_CREATING, _SETTING_UP):
            named = pattern.match(text)
            if named:
                current = named.group(1).strip()
        if level == "F" and fatal is None:
            fatal = (location, text)
    if result is not None and "error" in result:
        message = result["error"]
        if "returned NULL without setting an" in message:  # "an exception" (3.11), "an error" (3.8)
            # An error at a Python layer's import or construction: Caffe printed it
            # (PyErr_Print) and pycaffe raised a bare SystemError; the printed one says why.
            printed = [m.group(0) for m in map(_PY_ERROR.match, done.stderr.splitlines()) if m]
            message = printed[-1] if printed else message
        kind = "import" if re.match(r"(ModuleNotFound|Import)Error", message) else "python"
        return {"kind": kind, "layer": current, "location": None, "message": message}
    if fatal is not None:
        location, text = fatal
        named = _NAMED_LAYER.search(text)
        layer = named.group(1) if named else current
        return {"kind": "caffe", "layer": layer, "location": location, "message": text}
    tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-3:]
    return {"kind": "crash", "layer": current, "location": None,
            "message": "the child process building the net exited with status %d%s"
                       % (done.returncode, (": " + " | ".join(tail)) if tail else "")}


def _child(argv):
    """``python -m safe_layers.readers.netshapes NET PHASE OUT LEVEL [STAGE...]``: build the
    net and write its layers' blob shapes (or the Python error) to OUT as JSON. A Caffe
    CHECK failure aborts this process, which is the point of running it apart."""
    net_file, phase, out_file, level = argv[:4]
    stages = argv[4:]
    import caffe
    caffe.set_mode_cpu()
    try:
        net = caffe.Net(net_file, getattr(caffe, phase), level=int(level), stages=stages)
    except Exception as exc:  # noqa: BLE001 - a Python layer's error, reported to the parent
        with open(out_file, "w") as f:
            json.dump({"error": "%s: %s" % (type(exc).__name__, exc)}, f)
        return 0
    names = list(net._blob_names)
    layers = []
    for i, name in enumerate(net._layer_names):
        layers.append({
            "name": name, "type": net.layers[i].type,
            "bottoms": [(names[b], list(net._blobs[b].shape)) for b in net._bottom_ids(i)],
            "tops": [(names[t], list(net._blobs[t].shape)) for t in net._top_ids(i)]})
    with open(out_file, "w") as f:
        json.dump({"layers": layers}, f)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
