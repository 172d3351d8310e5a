"""Writers of real Caffe datasets for the scan and diagnose tests.

Two ways, as users make them: Caffe's own ``convert_mnist_data`` tool (uint8 Datums, keys
``%08d``, LMDB or LevelDB), and Python writing real ``caffe_pb2.Datum`` records with
``lmdb`` / ``plyvel`` (float_data, encoded images, and the poisoned records the convert
tools cannot make). HDF5 files are written with h5py, as Caffe's own examples do.
"""

import hashlib
import os
import struct
import subprocess
from pathlib import Path

import numpy as np


def caffe_prefix():
    """The install prefix of the Caffe pycaffe was imported from (its bin/ has the tools)."""
    import caffe
    # PREFIX/lib/python3/dist-packages/caffe/__init__.py
    return Path(caffe.__file__).resolve().parents[4]


def write_idx(folder, images, labels):
    """MNIST idx files of uint8 ``images`` (N, H, W) and ``labels`` (N,)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = np.asarray(images, np.uint8)
    labels = np.asarray(labels, np.uint8)
    image_path, label_path = folder / "images.idx3", folder / "labels.idx1"
    with open(image_path, "wb") as f:
        f.write(struct.pack(">IIII", 2051, *images.shape))
        f.write(images.tobytes())
    with open(label_path, "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)))
        f.write(labels.tobytes())
    return image_path, label_path


def convert_mnist(db_path, images, labels, backend):
    """A database written by Caffe's ``convert_mnist_data`` (keys %08d, in order)."""
    db_path = Path(db_path)
    image_path, label_path = write_idx(db_path.parent / (db_path.name + "_idx"), images, labels)
    tool = caffe_prefix() / "bin" / "convert_mnist_data"
    env = dict(os.environ, GLOG_minloglevel="2")
    subprocess.run([str(tool), str(image_path), str(label_path), str(db_path), "--backend=" + backend],
                   check=True, env=env, capture_output=True)
    return db_path


def datum(array, label, encoded=None):
    """A real Datum: uint8 arrays go to ``data``, floats to ``float_data`` (C, H, W);
    ``encoded`` (bytes) makes an encoded record instead."""
    from caffe.proto import caffe_pb2
    d = caffe_pb2.Datum()
    d.label = int(label)
    if encoded is not None:
        d.encoded = True
        d.data = encoded
        return d
    array = np.asarray(array)
    d.channels, d.height, d.width = array.shape
    if array.dtype == np.uint8:
        d.data = array.tobytes()
    else:
        d.float_data.extend(array.astype(np.float32).ravel().tolist())
    return d


def write_lmdb(path, records):
    """An LMDB of ``records``: (key bytes, Datum or raw bytes)."""
    import lmdb
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for key, value in records:
            txn.put(key, value if isinstance(value, bytes) else value.SerializeToString())
    env.close()
    return Path(path)


def write_leveldb(path, records, compact=True):
    """A LevelDB of ``records`` (as :func:`write_lmdb`); ``compact=False`` leaves the
    records in LevelDB's journal, which LevelDB rewrites into a table at the next Open."""
    import plyvel
    db = plyvel.DB(str(path), create_if_missing=True)
    with db.write_batch() as batch:
        for key, value in records:
            batch.put(key, value if isinstance(value, bytes) else value.SerializeToString())
    if compact:
        db.compact_range()
    db.close()
    return Path(path)


def tree_fingerprint(path, ignore=()):
    """{relative path: (size, mtime_ns, sha256)} of every file under ``path`` (or of the
    file itself), files named in ``ignore`` left out: what 'scan never writes into its
    input' is checked against."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*")
                                                 if p.is_file() and p.name not in ignore)
    out = {}
    for file in files:
        stat = file.stat()
        out[str(file.relative_to(path) if file != path else file.name)] = (
            stat.st_size, stat.st_mtime_ns, hashlib.sha256(file.read_bytes()).hexdigest())
    return out
