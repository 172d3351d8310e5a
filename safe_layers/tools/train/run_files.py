"""What a `safe-layers train` run reads and what it writes, checked against each other
before anything is written: an output that names an input (the net, a dataset, the
snapshot resumed from) is refused, and so is an existing file at an output's name that
is not one of this tool's own (an event log it appends to, a PNG it replaces).
"""

import json
import os
import re

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


def run_inputs(solver_path, snapshot="", weights=""):
    """{real path: what it is} of every file the run reads: the solver, the nets it names,
    every data source and mean or infogain file their layers name (as Caffe opens them,
    from the working directory), the snapshot resumed from and the weights."""
    inputs = {os.path.realpath(solver_path): "the solver"}
    solver = prototxt.read_solver(solver_path)
    for _, net in prototxt.solver_nets(solver):
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
