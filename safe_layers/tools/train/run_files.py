"""What a `safe-layers train` run reads and what it writes, checked against each other
before anything is written: an output that names an input (the net, a dataset, the
snapshot resumed from) is refused, and so is an existing file at an output's name that
is not one of this tool's own (an event log it appends to, a PNG it replaces).
"""

import json
import os
import re

from safe_layers.anomaly import checkpoint_files
from safe_layers.core.errors import InputError
from safe_layers.readers import prototxt
from safe_layers.tools.findings import check_output_path

# Layer fields that name a file Caffe reads (data_layer.cpp, hdf5_data_layer.cpp,
# image_data_layer.cpp, window_data_layer.cpp, data_transformer.cpp, infogain_loss_layer.cpp).
_SOURCE_FIELDS = ("data_param.source", "hdf5_data_param.source", "image_data_param.source",
                  "window_data_param.source", "transform_param.mean_file",
                  "infogain_loss_param.source")

_SNAPSHOT_FILE = re.compile(r"_iter_\d+\.(caffemodel|solverstate)(\.h5)?$")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _node_value(message, dotted):
    for part in dotted.split("."):
        if not message.HasField(part):
            return None
        message = getattr(message, part)
    return message or None


def run_inputs(solver, nets, snapshot="", weights=""):
    """{real path: what it is} of every file the run reads: the solver (a Prototxt), the
    nets it names (``solver_nets``), every data source and mean or infogain file their
    layers name (as Caffe opens them, from the working directory), the snapshot resumed
    from and the weights."""
    inputs = {os.path.realpath(solver.path): "the solver"}
    for _, net in nets:
        inputs.setdefault(os.path.realpath(net.path), "the net")
        for layer, _ in net.layers():
            for field in _SOURCE_FIELDS:
                source = _node_value(layer, field)
                if source:
                    resolved, _ = prototxt.resolve_reference(source, net.path)
                    inputs.setdefault(os.path.realpath(resolved),
                                      "the %s of layer '%s'" % (field, layer.name))
    if snapshot:
        inputs[os.path.realpath(snapshot)] = "the snapshot resumed from"
    for path in [w.strip() for w in weights.split(",") if w.strip()]:
        inputs[os.path.realpath(path)] = "the weights"
    return inputs


def check_outputs(outputs, inputs):
    """InputError unless every output ({path: what}) can be written without harm: not an
    input of the run (nor inside an input folder, as an LMDB is), not a Caffe snapshot,
    a name that can be written (:func:`~safe_layers.tools.findings.check_output_path`), and where a file is
    already there, one of this tool's own of that kind."""
    for path, what in outputs.items():
        real = os.path.realpath(path)
        for source, role in inputs.items():
            if real == source or real.startswith(source.rstrip(os.sep) + os.sep):
                raise InputError("%s %s is %s of this run (%s): refusing to write over it"
                                 % (what, path, "inside " + role if real != source else role,
                                    source))
        if _SNAPSHOT_FILE.search(path):
            raise InputError("%s %s is named like a Caffe snapshot: refusing to write over it"
                             % (what, path))
        check_output_path(path, what)
        if os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) > 0:
            _check_ours(path, what)


def _check_ours(path, what):
    with open(path, "rb") as f:
        head = f.read(65536)
    if what == "the plot":
        if not head.startswith(PNG_MAGIC):
            raise InputError("%s %s exists and is not a PNG: refusing to replace it (name "
                             "another file)" % (what, path))
        return
    first = head.split(b"\n", 1)[0]
    try:
        record = json.loads(first.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        record = None
    if not isinstance(record, dict) or "event" not in record:
        raise InputError("%s %s exists and is not a safe-layers event log: refusing to write into "
                         "it (name another file)" % (what, path))


def check_snapshot(path):
    """InputError unless ``path`` is a SolverState Caffe can restore: it parses, and the
    weights file it names (``learned_net``, opened from the working directory as
    ``Solver::Restore`` does) is there, parses, and holds as many blobs as the state's
    momentum history needs (one or two per blob, by solver type). Caffe would otherwise
    abort with a CHECK that names the solver prototxt, or none at all."""
    if path.endswith(".h5"):
        return _check_h5_snapshot(path)
    pb2 = prototxt.caffe_pb2()
    state = pb2.SolverState()
    try:
        with open(path, "rb") as f:
            state.ParseFromString(f.read())
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError has no stable import path
        raise InputError("-snapshot %s: not a Caffe solverstate (protobuf: %s): cut short or "
                         "corrupt?" % (path, exc)) from None
    problem = checkpoint_files.incomplete(path, "state")
    if problem:
        raise InputError("-snapshot %s: it %s: a snapshot cut by a full disk or a kill? (Caffe "
                         "would restore what is there)" % (path, problem))
    if not state.learned_net:
        return  # Caffe restores the history alone
    if not os.path.isfile(state.learned_net):
        raise InputError("-snapshot %s: the weights it names, %s, do not exist (Caffe opens "
                         "them from the working directory, %s)"
                         % (path, state.learned_net, os.getcwd()))
    problem = checkpoint_files.incomplete(state.learned_net, "model")
    if problem:
        raise InputError("-snapshot %s: its weights %s: it %s" % (path, state.learned_net, problem))
    blobs = _count_blobs(state.learned_net, "-snapshot %s: its weights" % path)
    history = len(state.history)
    if history and blobs and history not in (blobs, 2 * blobs):
        raise InputError("-snapshot %s: %d history blobs do not fit the %d blobs of its weights "
                         "%s: a state and weights of different runs, or a file cut short"
                         % (path, history, blobs, state.learned_net))


def _check_h5_snapshot(path):
    try:
        import h5py
    except ImportError:
        return
    try:
        with h5py.File(path, "r") as f:
            for key in ("iter", "history"):
                if key not in f:
                    raise InputError("-snapshot %s: an HDF5 file without '%s': not a Caffe "
                                     "solverstate" % (path, key))
    except OSError as exc:
        raise InputError("-snapshot %s: not a readable HDF5 solverstate (%s)" % (path, exc)) from None


def _read_caffemodel(path, what):
    """The NetParameter in the caffemodel at ``path``; InputError naming ``what`` when
    protobuf cannot read it."""
    model = prototxt.caffe_pb2().NetParameter()
    try:
        with open(path, "rb") as f:
            model.ParseFromString(f.read())
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError has no stable import path
        raise InputError("%s %s: not a Caffe caffemodel (protobuf: %s)" % (what, path, exc)) from None
    return model


def _count_blobs(path, what):
    model = _read_caffemodel(path, what)
    return sum(len(layer.blobs) for layer in model.layer) + sum(len(l.blobs) for l in model.layers)


def weights_warnings(weights, net):
    """Warnings for -weights files that would copy no layer into the net (an empty file,
    a model of another net): Caffe's ``CopyTrainedLayersFrom`` copies by layer name and
    says nothing of a file that matches none, and training starts from scratch."""
    names = {layer.name for layer, _ in net.layers()}
    warnings = []
    for path in [w.strip() for w in weights.split(",") if w.strip()]:
        if path.endswith(".h5"):
            continue
        model = _read_caffemodel(path, "-weights")
        with_blobs = [l.name for l in list(model.layer) + list(model.layers) if len(l.blobs)]
        if not any(name in names for name in with_blobs):
            what = ("is empty" if not with_blobs else
                    "has weights for %s, none of them a layer of %s"
                    % (", ".join(with_blobs[:5]) + (", ..." if len(with_blobs) > 5 else ""), net.path))
            warnings.append("-weights %s %s: it copies no layer, and the net trains from its "
                            "fillers" % (path, what))
    return warnings
