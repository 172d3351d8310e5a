"""What scan reads: one source (a :class:`Target`), and what kind of source a path is."""

import os

from safe_layers.core.errors import InputError
from safe_layers.readers import datasets


class Target:
    """One source to scan: its path and backend, and what the net says about it."""

    def __init__(self, path, backend, layers=(), batch_size=None, tops=None, num_classes=None,
                 classes_from=None, ignore_label=None):
        self.path = str(path)
        self.backend = backend
        self.layers = list(layers)      # "net.prototxt: layer 'data' (TRAIN)"
        self.batch_size = batch_size
        self.tops = tops
        self.num_classes = num_classes
        self.classes_from = classes_from
        self.ignore_label = ignore_label


def is_prototxt(path):
    """Whether ``path`` is a net or solver prototxt (by its name, else its first 4 KiB)."""
    if os.path.isdir(path) or not os.path.isfile(path):
        return False
    if path.endswith((".prototxt", ".pt", ".prototxt.txt")):
        return True
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"\x89HDF"):
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return any(word in text for word in ("layer {", "layer{", "layers {", "net:", "train_net:",
                                         "net_param", "base_lr"))


def backend_of(path, backend="auto"):
    """The backend to read ``path`` with: what is on disk (``auto``), else ``backend``
    once :func:`check_backend` agrees."""
    return datasets.detect_backend(path) if backend == "auto" else check_backend(path, backend)


def check_backend(path, backend):
    """``backend`` when ``path`` can be that kind of source; InputError saying what the
    path is otherwise (an HDF5 source is a file, a LevelDB a directory; what is on disk
    and recognised as another kind is not read as this one)."""
    try:
        found = datasets.detect_backend(path)
    except InputError:
        found = None  # not recognised (damaged?): the reader says what is wrong
    what = {"lmdb": "an LMDB", "leveldb": "a LevelDB directory",
            "hdf5": "an HDF5 source (an .h5 file or a list of .h5 files)"}
    if found is not None and found != backend:
        raise InputError("%s is %s, not %s: give --backend %s, or leave --backend out (auto)"
                         % (path, what[found], what[backend], found))
    if backend == "hdf5" and os.path.isdir(path):
        raise InputError("%s is a directory: --backend hdf5 reads %s" % (path, what["hdf5"]))
    if backend == "leveldb" and not os.path.isdir(path):
        raise InputError("%s is a file: --backend leveldb reads %s" % (path, what["leveldb"]))
    return backend
