"""Caffe's own files, read as Caffe reads them; prints nothing and knows no command.

* :mod:`.prototxt`: net and solver prototxts (Caffe's ``caffe_pb2`` + protobuf
  ``text_format``), with the line and column of every field.
* :mod:`.net_state`: which layers Caffe keeps for a phase, level and stages; loss weights.
* :mod:`.layer_types`: the kinds of Caffe layer types (data layers, ...).
* :mod:`.netshapes`: blob shapes of a net, built by Caffe in a child process.
* :mod:`.caffe_log`: glog lines of ``caffe train`` and pycaffe runs.
* :mod:`.datasets`: LMDB, LevelDB, HDF5 and image-list sources.
"""
