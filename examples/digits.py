"""The demo's dataset: scikit-learn's 8x8 handwritten digits as Caffe LMDBs of Datums.

scikit-learn ships the 1,797 digits inside its package (no download). Pixels 0..16 are
scaled to 0..1 and stored as ``float_data`` (only ``float_data`` can carry a NaN, which is
how a real poisoned record looks: a preprocessing step that divided by a zero range).

    python examples/digits.py OUTDIR            # OUTDIR/digits_{train,test}_lmdb
    python examples/digits.py OUTDIR --poison 737
"""

import argparse
import os

import numpy

TRAIN_SIZE = 1500
SHAPE = (1, 8, 8)
POISONED_PIXEL = 27  # row 3, column 3 of the 8x8 image


def digits():
    """(images float32 N x 1 x 8 x 8 in [0, 1], labels int) in a fixed shuffled order."""
    from sklearn.datasets import load_digits
    data = load_digits()
    order = numpy.random.RandomState(0).permutation(len(data.target))
    images = (data.images[order] / 16.0).astype(numpy.float32).reshape((-1,) + SHAPE)
    return images, data.target[order].astype(int)


def record_key(index):
    """The LMDB key of record ``index``, as Caffe's convert tools write them (%08d)."""
    return b"%08d" % index


def write_lmdb(path, images, labels, poison=None):
    """Write Datums (float_data) to a new LMDB at ``path``; with ``poison``, that record's
    pixel POISONED_PIXEL is NaN. Returns the poisoned key (or None)."""
    import lmdb
    from caffe.proto import caffe_pb2
    if os.path.exists(path):
        raise FileExistsError("%s exists; the demo writes fresh datasets only" % path)
    env = lmdb.open(path, map_size=1 << 28)
    with env.begin(write=True) as txn:
        for index, (image, label) in enumerate(zip(images, labels)):
            values = image.reshape(-1).copy()
            if index == poison:
                values[POISONED_PIXEL] = numpy.nan
            datum = caffe_pb2.Datum(channels=SHAPE[0], height=SHAPE[1], width=SHAPE[2],
                                    label=int(label))
            datum.float_data.extend(values.tolist())
            txn.put(record_key(index), datum.SerializeToString())
    env.close()
    return record_key(poison).decode() if poison is not None else None


def write_digits(outdir, poison=None):
    """OUTDIR/digits_train_lmdb (1,500 records, one poisoned when asked) and
    OUTDIR/digits_test_lmdb (297 records). Returns the poisoned key or None."""
    images, labels = digits()
    os.makedirs(outdir, exist_ok=True)
    key = write_lmdb(os.path.join(outdir, "digits_train_lmdb"), images[:TRAIN_SIZE],
                     labels[:TRAIN_SIZE], poison)
    write_lmdb(os.path.join(outdir, "digits_test_lmdb"), images[TRAIN_SIZE:], labels[TRAIN_SIZE:])
    return key


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir")
    parser.add_argument("--poison", type=int, default=None, help="index of the record to poison")
    args = parser.parse_args()
    print(write_digits(args.outdir, args.poison) or "clean")
