"""Replayable records: the batch, the weights and the report of a watch's first fault
(:func:`safe_layers.anomaly.replay` runs that batch through a net again).

    record-dir/iter37.json          # iteration, report, what the other files hold
    record-dir/iter37.inputs.npz    # the tops of every layer without bottoms: the batch
    record-dir/iter37.caffemodel    # the weights the faulty pass ran with
"""

import json
import os

import numpy

from safe_layers.core import atomic
from safe_layers.core.float_text import jsonable


def write_record(directory, iteration, report, inputs, net=None, weights=True):
    """Write the record of a fault at ``iteration``; returns the JSON path.

    ``inputs`` maps blob names to arrays (the net's data-layer tops); ``net``'s weights
    are saved as a caffemodel when ``weights``. Every file is written to a temporary
    file and linked into place under ``iterN`` (``iterN-2``, ... when a record of that
    name is there: a second run never replaces the first run's): never over an existing
    file, never through a link. Raises OSError when the files cannot be written (the
    watch turns that into a warning: a record never kills a run), leaving none behind.
    """
    os.makedirs(directory, exist_ok=True)
    stem = "iter%s" % (iteration if iteration is not None else "-none")
    made = []
    try:
        parts = {".inputs.npz": _temporary(directory, made)}
        with open(parts[".inputs.npz"], "wb") as f:
            numpy.savez_compressed(f, **inputs)
        if net is not None and weights:
            parts[".caffemodel"] = _temporary(directory, made)
            with open(parts[".caffemodel"], "wb") as f:
                f.write(weights_proto(net))
        for name in atomic.stems(stem):
            document = {"iteration": iteration, "report": report.as_dict(),
                        "inputs": {blob: list(array.shape) for blob, array in inputs.items()},
                        "inputs_file": name + ".inputs.npz",
                        "weights_file": name + ".caffemodel" if ".caffemodel" in parts else None}
            json_path = _temporary(directory, made)
            with open(json_path, "w") as f:
                json.dump(jsonable(document), f, indent=2, sort_keys=True)
                f.write("\n")
            try:
                return atomic.publish_exactly(directory, name, dict(parts, **{".json": json_path}))[".json"]
            except FileExistsError:
                continue
        raise FileExistsError("no free record name for %r in %s" % (stem, directory))
    finally:
        for path in made:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _temporary(directory, made):
    path = atomic.temporary(directory)
    made.append(path)
    return path


def weights_proto(net):
    """The serialized NetParameter ``net.save`` would write (each layer with learnable
    blobs: its name, type and blobs), built here so that a full disk is an OSError of
    ours: Caffe's ``WriteProtoToBinaryFile`` CHECK-fails, and the process would abort."""
    from caffe.proto import caffe_pb2  # pycaffe is there: ``net`` is a caffe.Net
    message = caffe_pb2.NetParameter()
    message.name = getattr(net, "name", "") or ""
    for name, layer in zip(net._layer_names, net.layers):
        if not len(layer.blobs):
            continue
        entry = message.layer.add()
        entry.name, entry.type = name, layer.type
        for blob in layer.blobs:
            proto = entry.blobs.add()
            proto.shape.dim.extend(blob.data.shape)
            proto.data.extend(numpy.asarray(blob.data, numpy.float32).ravel())
    return message.SerializeToString()


def read_record(path):
    """(document, inputs dict, weights path or None) of a record's JSON file."""
    with open(path) as f:
        document = json.load(f)
    folder = os.path.dirname(os.path.abspath(path))
    with numpy.load(os.path.join(folder, document["inputs_file"])) as npz:
        inputs = {name: npz[name] for name in npz.files}
    weights = (os.path.join(folder, document["weights_file"]) if document.get("weights_file")
               else None)
    return document, inputs, weights
