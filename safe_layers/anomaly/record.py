"""Replayable records: the batch, the weights and the report of a watch's first fault
(:func:`safe_layers.anomaly.replay` runs that batch through a net again).

    record-dir/iter37.json          # iteration, report, what the other files hold
    record-dir/iter37.inputs.npz    # the tops of every layer without bottoms: the batch
    record-dir/iter37.caffemodel    # the weights the faulty pass ran with
"""

import json
import os

import numpy

from safe_layers.core.float_text import jsonable


def write_record(directory, iteration, report, inputs, net=None, weights=True):
    """Write the record of a fault at ``iteration``; returns the JSON path.

    ``inputs`` maps blob names to arrays (the net's data-layer tops); ``net`` is saved
    as a caffemodel when ``weights``. Raises OSError when the files cannot be written
    (the watch turns that into a warning: a record never kills a run).
    """
    os.makedirs(directory, exist_ok=True)
    stem = os.path.join(directory, "iter%s" % (iteration if iteration is not None else "-none"))
    numpy.savez_compressed(stem + ".inputs.npz", **inputs)
    weights_path = None
    if net is not None and weights:
        weights_path = stem + ".caffemodel"
        net.save(weights_path)
    document = {"iteration": iteration, "report": report.as_dict(),
                "inputs": {name: list(array.shape) for name, array in inputs.items()},
                "inputs_file": os.path.basename(stem + ".inputs.npz"),
                "weights_file": os.path.basename(weights_path) if weights_path else None}
    with open(stem + ".json", "w") as f:
        json.dump(jsonable(document), f, indent=2, sort_keys=True)
        f.write("\n")
    return stem + ".json"


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
