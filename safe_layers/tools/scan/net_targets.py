"""The sources a net or solver prototxt reads: each Data and HDF5Data layer's, with the
batch size, the number of classes and the ignore_label the net gives them (SL930)."""

import os

from safe_layers.core.errors import InputError
from safe_layers.readers import prototxt
from safe_layers.tools import rule_table
from safe_layers.tools.findings import Finding
from safe_layers.tools.scan.targets import Target

SOURCE_MISSING = rule_table.rule(
    "scan", "SL930", "error", "a net's data layer whose source is missing or not scanned",
    doc="""
    Caffe opens a data layer's source while it builds the net, relative to the working
    directory of the process: a Data layer through db::LMDB::Open or db::LevelDB::Open
    (db_lmdb.cpp:19-21 fails a CHECK with `mdb_status == 0 (2 vs. 0) No such file or
    directory`, naming no path; db_leveldb.cpp:15-16), an HDF5Data layer by reading its list
    file (hdf5_data_layer.cpp:83-90, `Failed to open source file`). Training then dies
    before the first iteration. scan names the layer and the path instead (an error for a
    missing or empty source, a warning where the path only exists relative to the
    prototxt), and notes the ImageData, WindowData and MemoryData layers it does not read.
    """)

# Loss layers whose bottom[1] is a class label (bottom[0] has the classes on axis 1).
CLASS_LOSSES = ("SoftmaxWithLoss", "InfogainLoss", "Accuracy", "MultinomialLogisticLoss",
                "HingeLoss")
SAFE_CLASS_LOSSES = ("SafeInfogainLoss",)


def targets_from_prototxt(path):
    """(targets, findings) for every data layer of a net prototxt, or of the nets a solver
    names: Data (LMDB/LevelDB) and HDF5Data sources; other data layers are noted."""
    document = prototxt.read_prototxt(path)
    nets = [n for _, n in prototxt.solver_nets(document)] if document.kind == "solver" else [document]
    targets, notes = {}, []
    for net in nets:
        classes, classes_from = _num_classes(net)
        ignore = _ignore_label(net)
        for layer, node in net.layers():
            kind = _layer_type(layer)
            phase = _phases(layer)
            where = "%s: layer '%s'%s" % (net.path, layer.name, phase)
            if kind in ("Data", "HDF5Data"):
                param = layer.data_param if kind == "Data" else layer.hdf5_data_param
                field = "data_param" if kind == "Data" else "hdf5_data_param"
                source_node = node.find(field + ".source")
                line, col = net.where(source_node or node)
                if not param.source:
                    notes.append(Finding(net.path, line, col, SOURCE_MISSING, "error",
                                         "data layer '%s' (%s) names no source" % (layer.name, kind),
                                         "set %s.source" % field, layer=layer.name))
                    continue
                resolved, note = prototxt.resolve_reference(param.source, net.path)
                if note == "does not exist":
                    notes.append(Finding(
                        net.path, line, col, SOURCE_MISSING, "error",
                        "data layer '%s' (%s): source %r does not exist (Caffe opens it relative to "
                        "the working directory, %s)" % (layer.name, kind, param.source, os.getcwd()),
                        "create the dataset or fix the path", layer=layer.name,
                        data={"source": param.source}))
                    continue
                if note:
                    notes.append(Finding(net.path, line, col, SOURCE_MISSING, "warning",
                                         "data layer '%s': source %r %s" % (layer.name, param.source, note),
                                         "run from the folder Caffe will run in", layer=layer.name))
                backend = "hdf5" if kind == "HDF5Data" else (
                    "lmdb" if param.backend == prototxt.caffe_pb2().DataParameter.LMDB else "leveldb")
                key = os.path.realpath(resolved)
                target = targets.get(key)
                if target is None:
                    target = targets[key] = Target(
                        resolved, backend, batch_size=param.batch_size or None,
                        tops=list(layer.top) if kind == "HDF5Data" else None,
                        num_classes=classes, classes_from=classes_from, ignore_label=ignore)
                target.layers.append(where)
            elif kind in ("ImageData", "WindowData", "MemoryData"):
                line, col = net.where(node)
                notes.append(Finding(net.path, line, col, SOURCE_MISSING, "info",
                                     "data layer '%s' (%s) is not scanned: scan reads LMDB, LevelDB "
                                     "and HDF5 sources" % (layer.name, kind), layer=layer.name))
    if not targets and not any(f.severity == "error" for f in notes):
        raise InputError("%s: no Data or HDF5Data layer with a source to scan" % path)
    return list(targets.values()), notes


def _layer_type(layer):
    kind = layer.type
    if isinstance(kind, int):  # a V1 `layers { type: DATA }` entry
        name = prototxt.caffe_pb2().V1LayerParameter.LayerType.Name(kind)
        return {"DATA": "Data", "HDF5_DATA": "HDF5Data", "IMAGE_DATA": "ImageData",
                "WINDOW_DATA": "WindowData", "MEMORY_DATA": "MemoryData",
                "SOFTMAX_LOSS": "SoftmaxWithLoss", "INFOGAIN_LOSS": "InfogainLoss",
                "ACCURACY": "Accuracy", "INNER_PRODUCT": "InnerProduct",
                "CONVOLUTION": "Convolution"}.get(name, name)
    return kind


def _phases(layer):
    phases = []
    for rule in layer.include:
        if rule.HasField("phase"):
            phases.append(prototxt.caffe_pb2().Phase.Name(rule.phase))
    return " (%s)" % "/".join(phases) if phases else ""


def _python_layer_name(layer):
    return layer.python_param.layer if _layer_type(layer) == "Python" else None


def _num_classes(net):
    """(K, 'layer fc8 (num_output)') from the layer producing the scores a classification
    loss reads, or (None, None)."""
    producers = {}
    layers = [layer for layer, _ in net.layers()]
    for layer in layers:
        for top in layer.top:
            producers.setdefault(top, []).append(layer)
    for layer in layers:
        kind = _layer_type(layer)
        if kind not in CLASS_LOSSES and _python_layer_name(layer) not in SAFE_CLASS_LOSSES:
            continue
        if not layer.bottom:
            continue
        for producer in producers.get(layer.bottom[0], []):
            ptype = _layer_type(producer)
            if ptype == "InnerProduct":
                return producer.inner_product_param.num_output, "layer '%s' (num_output)" % producer.name
            if ptype == "Convolution":
                return producer.convolution_param.num_output, "layer '%s' (num_output)" % producer.name
    return None, None


def _ignore_label(net):
    for layer, _ in net.layers():
        if layer.HasField("loss_param") and layer.loss_param.HasField("ignore_label"):
            return layer.loss_param.ignore_label
    return None
