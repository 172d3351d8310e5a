"""The infogain matrix H of an InfogainLoss, read from its file as Caffe reads it
(``infogain_loss_layer.cpp``: ``ReadProtoFromBinaryFile`` of a BlobProto), or from ``.npy``."""

import os

import numpy

from safe_layers.readers.prototxt import caffe_pb2


def load_infogain_matrix(path):
    """H from a ``.npy`` file or a Caffe ``.binaryproto`` BlobProto, as float64 NumPy."""
    if not os.path.isfile(path):
        raise FileNotFoundError("H file %r does not exist" % path)
    if path.endswith(".npy"):
        return numpy.load(path, allow_pickle=False).astype(numpy.float64)
    blob = caffe_pb2().BlobProto()
    with open(path, "rb") as f:
        raw = f.read()
    try:
        blob.ParseFromString(raw)
    except Exception as exc:  # protobuf's DecodeError has no stable import path
        raise ValueError("H file %r is not a BlobProto (.binaryproto): %s" % (path, exc)) from None
    values = numpy.array(blob.data if len(blob.data) else blob.double_data, numpy.float64)
    if values.size == 0:
        raise ValueError("H file %r holds a BlobProto with no data" % path)
    return values
