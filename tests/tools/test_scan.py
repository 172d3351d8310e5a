"""`safe-layers scan` on real LMDB, LevelDB and HDF5 sets with poisoned records at known
keys: it finds exactly those, a clean set scans clean, a corrupt one exits 2, and the
source is never written to. Where it matters, real Caffe reads the same set and shows
the fault where scan said it is."""

import fcntl
import io
import json
import math
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

from safe_layers.tools import cli
from safe_layers.readers import datasets
from safe_layers.core.errors import InputError
from support.caffe_data import convert_mnist, datum, tree_fingerprint, write_leveldb, write_lmdb


def scan(*argv):
    """(exit status, stdout, stderr) of `safe-layers scan ...`, run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = cli.main(["scan", *map(str, argv)])
    return status, out.getvalue(), err.getvalue()


def scan_json(*argv):
    status, out, err = scan(*argv, "--format", "json")
    return status, json.loads(out), err


def faults(document):
    """{(rule, key)} of the record findings in a JSON document."""
    return {(f["rule"], f.get("key")) for f in document["findings"] if f["severity"] == "error"}


def key(i):
    return b"%08d" % i


def images(n, seed=0, shape=(8, 8)):
    return np.random.default_rng(seed).integers(0, 256, (n,) + shape, dtype=np.uint8)


# ---------------------------------------------------------------------------------------
# LMDB / LevelDB written by Caffe's own convert tool.

@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_convert_tool_database_clean_and_with_bad_labels(caffe, tmp_path, backend):
    labels = np.arange(60) % 10
    clean = convert_mnist(tmp_path / "clean", images(60), labels, backend)
    status, doc, _ = scan_json(clean, "--num-classes", 10)
    assert status == 0 and doc["findings"] == []
    [source] = doc["sources"]
    assert source["backend"] == backend and source["records"] == 60
    assert source["shape"] == [1, 8, 8]
    assert source["labels"]["histogram"] == {str(c): 6 for c in range(10)}

    bad_labels = labels.copy()
    bad_labels[[7, 31]] = 12  # outside [0, 10)
    bad = convert_mnist(tmp_path / "bad", images(60), bad_labels, backend)
    status, doc, _ = scan_json(bad, "--num-classes", 10)
    assert status == 1
    assert faults(doc) == {("SL904", "00000007"), ("SL904", "00000031")}
    assert {f["position"] for f in doc["findings"] if f["rule"] == "SL904"} == {7, 31}
    # Out-of-range labels are not classes: the histogram holds the ten real ones.
    assert set(doc["sources"][0]["labels"]["histogram"]) == {str(c) for c in range(10)}

    # A negative label is no class index whatever K is: found without --num-classes.
    bad_labels[[7, 31]] = [-1, 3]
    negative = convert_mnist(tmp_path / "negative", images(60), bad_labels, backend)
    status, doc, _ = scan_json(negative)
    assert status == 1 and faults(doc) == {("SL904", "00000007")}
    assert "label -1 is negative" in doc["findings"][0]["message"]
    assert "-1" not in doc["sources"][0]["labels"]["histogram"]


def test_an_empty_database_is_an_error(caffe, tmp_path):
    import lmdb
    lmdb.open(str(tmp_path / "empty_lmdb"), map_size=1 << 20).close()
    status, doc, _ = scan_json(tmp_path / "empty_lmdb")
    assert status == 1 and [f["rule"] for f in doc["findings"]] == ["SL907"]
    assert doc["sources"][0]["records"] == 0


POISON = {
    5: ("SL901", "nan"),
    17: ("SL901", "inf"),
    23: ("SL902", "size"),
    29: ("SL903", "shape"),
    31: ("SL906", "garbage"),
    37: ("SL904", "label"),
    41: ("SL902", "empty"),
}


def poisoned_records(n=48):
    """Float Datums 2x3x3 with one fault at each key of POISON."""
    rng = np.random.default_rng(1)
    records = []
    for i in range(n):
        array = rng.standard_normal((2, 3, 3)).astype(np.float32)
        label = i % 4
        kind = POISON.get(i, (None, None))[1]
        if kind == "nan":
            array[1, 2, 0] = np.nan
        elif kind == "inf":
            array[0, 0, 1] = np.inf
        elif kind == "label":
            label = 9
        d = datum(array, label)
        if kind == "size":
            del d.float_data[-1]
        elif kind == "shape":
            d = datum(rng.standard_normal((2, 4, 3)), label)
        elif kind == "empty":
            del d.float_data[:]
        records.append((key(i), b"\x08\x01\xff\xff\xfe" if kind == "garbage" else d))
    return records


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_poisoned_records_found_exactly(caffe, tmp_path, backend):
    writer = write_lmdb if backend == "lmdb" else write_leveldb
    db = writer(tmp_path / "poisoned", poisoned_records())
    status, doc, _ = scan_json(db, "--num-classes", 4)
    assert status == 1
    assert faults(doc) == {(rule, "%08d" % i) for i, (rule, _) in POISON.items()}
    by_key = {f["key"]: f for f in doc["findings"]}
    assert by_key["00000005"]["nan"] == 1 and by_key["00000005"]["first_index"] == [1, 2, 0]
    assert by_key["00000017"]["posinf"] == 1 and by_key["00000017"]["first_index"] == [0, 0, 1]
    assert by_key["00000023"]["values"] == 17
    assert by_key["00000029"]["shape"] == [2, 4, 3]
    assert by_key["00000037"]["label"] == 9
    [source] = doc["sources"]
    assert source["records"] == 48 and source["shape"] == [2, 3, 3]
    # Text output: one line per faulty record, in the compiler shape.
    status, out, _ = scan(db, "--num-classes", 4)
    assert "%s:0:0: SL901 error record 00000005 (position 5): float_data holds nan=1" % db in out


def test_clean_float_set_scans_clean_and_limit(caffe, tmp_path):
    records = [r for i, r in enumerate(poisoned_records()) if i not in POISON]
    db = write_lmdb(tmp_path / "clean", records)
    status, doc, _ = scan_json(db, "--num-classes", 4)
    assert status == 0 and doc["findings"] == []
    poisoned = write_lmdb(tmp_path / "poisoned", poisoned_records())
    status, doc, _ = scan_json(poisoned, "--limit", 10)
    assert faults(doc) == {("SL901", "00000005")}
    assert doc["sources"][0]["records"] == 10 and doc["sources"][0]["limit_reached"]


def test_caffe_data_layer_reads_the_nan_where_scan_says(caffe, make_net, tmp_path):
    """The record scan flags is the one that makes Caffe's Data layer output NaN."""
    db = write_lmdb(tmp_path / "poisoned", poisoned_records())
    _, doc, _ = scan_json(db, "--limit", 16)
    [nan_record] = [f for f in doc["findings"] if f["rule"] == "SL901" and f["nan"]]
    net = make_net("""
        layer { name: "data" type: "Data" top: "data" top: "label"
                data_param { source: "%s" backend: LMDB batch_size: 1 } }
        layer { name: "silence" type: "Silence" bottom: "data" bottom: "label" }
        """ % db)
    seen = []
    for position in range(8):
        net.forward()
        seen.append(np.isnan(net.blobs["data"].data).any())
    assert [i for i, bad in enumerate(seen) if bad] == [nan_record["position"]]


def test_encoded_records(caffe, tmp_path, monkeypatch):
    from PIL import Image

    def png(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    rng = np.random.default_rng(2)
    records = []
    for i in range(12):
        array = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        if i == 4:
            array = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)  # another size
        encoded = png(array)
        if i == 9:
            encoded = encoded[:40]  # cut short: does not decode
        records.append((key(i), datum(None, i % 3, encoded=encoded)))
    db = write_lmdb(tmp_path / "encoded", records)
    status, doc, _ = scan_json(db)
    assert status == 1
    assert faults(doc) == {("SL903", "00000004"), ("SL905", "00000009")}
    assert doc["sources"][0]["shape"] == [3, 6, 5] and doc["sources"][0]["encoded"] == 12
    broken = next(f for f in doc["findings"] if f["rule"] == "SL905")
    assert "encoded image does not decode" in broken["message"] and " at 0x" not in broken["message"]
    with pytest.raises(datasets.DatumError) as caught:  # bytes no image library knows
        datasets.decode_image(caffe.proto.caffe_pb2.Datum(encoded=True, data=b"not an image"))
    assert str(caught.value) == ("encoded image does not decode (UnidentifiedImageError: "
                                 "cannot identify image file)")
    # Without an image library the records are counted and reported unchecked.
    monkeypatch.setattr(datasets, "image_library", lambda: None)
    status, doc, _ = scan_json(db)
    assert status == 0
    [note] = doc["findings"]
    assert note["rule"] == "SL905" and note["severity"] == "info" and note["count"] == 12


# ---------------------------------------------------------------------------------------
# Corrupt input: exit 2 with a clear message; never a write into the source.

LMDB_PAGE = 4096  # LMDB's page size on x86-64 Linux (the OS page)


def lmdb_leaf_pages(data):
    """Offsets of the B-tree leaf pages of an LMDB data.mdb (mdb.c: struct MDB_page, whose
    flags are the uint16 at byte 10; P_LEAF 0x02, P_OVERFLOW 0x04), past its two meta pages."""
    return [offset for offset in range(2 * LMDB_PAGE, len(data) - LMDB_PAGE + 1, LMDB_PAGE)
            if int.from_bytes(data[offset + 10:offset + 12], "little") & 0x06 == 0x02]


def test_corrupt_lmdb_exits_2(caffe, tmp_path):
    db = write_lmdb(tmp_path / "db", [(key(i), datum(images(1, i, (3, 32, 32))[0], 0))
                                      for i in range(300)])
    data = db / "data.mdb"
    original = data.read_bytes()
    # Cut short (a copy interrupted): LMDB itself would die of SIGBUS reading past the end.
    data.write_bytes(original[:len(original) // 2])
    status, out, err = scan(db)
    assert status == 2
    assert "truncated LMDB" in err and str(data) in err
    # Garbage over a B-tree leaf page (its records' keys): one liblmdb aborts the process
    # reading it (mdb_assert), an older one walks it as keys out of order; either way the
    # keys are walked in a child process first, so the tool says so and exits 2.
    leaf = lmdb_leaf_pages(original)[1]
    data.write_bytes(original[:leaf] + os.urandom(LMDB_PAGE) + original[leaf + LMDB_PAGE:])
    status, out, err = scan(db)
    assert status == 2 and "%s: LMDB corrupt" % db in err, err
    assert "Traceback" not in err
    # Garbage over the page a record's value starts on: its header is checked by one
    # liblmdb (corrupt, exit 2), read as the value by another (not a Datum, SL906).
    first_value = lmdb_leaf_pages(original)[0] + LMDB_PAGE
    data.write_bytes(original[:first_value] + os.urandom(LMDB_PAGE) + original[first_value + LMDB_PAGE:])
    status, out, err = scan(db)
    assert (status == 2 and "LMDB corrupt after" in err and "last good key" in err) or \
        (status == 1 and "SL906" in out), (status, out, err)
    # Not an LMDB at all.
    data.write_bytes(os.urandom(20000))
    status, out, err = scan(db, "--backend", "lmdb")
    assert status == 2 and "not a readable LMDB" in err


def test_corrupt_leveldb_exits_2(caffe, tmp_path):
    db = write_leveldb(tmp_path / "db", [(key(i), datum(images(1, i, (3, 16, 16))[0], 0))
                                         for i in range(200)])
    [table] = [p for p in db.iterdir() if p.suffix == ".ldb"]
    raw = bytearray(table.read_bytes())
    raw[100:400] = os.urandom(300)
    table.write_bytes(bytes(raw))
    status, out, err = scan(db)
    assert status == 2 and str(db) in err
    assert "LevelDB" in err and ("orrupt" in err or "checksum" in err)
    (db / "CURRENT").write_text("MANIFEST-999999\n")
    status, out, err = scan(db)
    assert status == 2 and "not a readable LevelDB" in err


def test_not_a_database_exits_2(caffe, tmp_path):
    (tmp_path / "empty_dir").mkdir()
    status, _, err = scan(tmp_path / "empty_dir")
    assert status == 2 and "neither an LMDB" in err
    status, _, err = scan(tmp_path / "missing")
    assert status == 2 and "no such file" in err
    random_file = tmp_path / "random.bin"
    random_file.write_bytes(os.urandom(5000))
    status, _, err = scan(random_file)
    assert status == 2 and "not a database Caffe reads" in err


def test_a_backend_that_does_not_fit_the_source_exits_2(caffe, tmp_path):
    lmdb_dir = convert_mnist(tmp_path / "mnist_lmdb", images(10), np.arange(10) % 5, "lmdb")
    leveldb_dir = convert_mnist(tmp_path / "mnist_leveldb", images(10), np.arange(10) % 5, "leveldb")
    write_h5(tmp_path / "x.h5", data=np.ones((4, 2), np.float32), label=np.zeros(4))
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "odd.bin").write_bytes(os.urandom(5000))
    hdf5 = "an HDF5 source (an .h5 file or a list of .h5 files)"
    for source, backend, message in [
            (lmdb_dir, "hdf5", "%s is an LMDB, not %s: give --backend lmdb, or leave --backend out "
                               "(auto)" % (lmdb_dir, hdf5)),
            (lmdb_dir, "leveldb", "%s is an LMDB, not a LevelDB directory: give --backend lmdb" % lmdb_dir),
            (leveldb_dir, "lmdb", "%s is a LevelDB directory, not an LMDB: give --backend leveldb" % leveldb_dir),
            (tmp_path / "x.h5", "leveldb", "%s is %s, not a LevelDB directory" % (tmp_path / "x.h5", hdf5)),
            (tmp_path / "empty_dir", "hdf5", "%s is a directory: --backend hdf5 reads %s"
                                             % (tmp_path / "empty_dir", hdf5)),
            (tmp_path / "odd.bin", "leveldb", "%s is a file: --backend leveldb reads a LevelDB directory"
                                              % (tmp_path / "odd.bin"))]:
        status, out, err = scan(source, "--backend", backend)
        assert status == 2 and out == "" and "Traceback" not in err, (source, backend, err)
        assert err.startswith("safe-layers scan: error: " + message), err
    # The backend that fits is read.
    status, doc, _ = scan_json(lmdb_dir, "--backend", "lmdb")
    assert status == 0 and doc["sources"][0]["records"] == 10


def test_a_plot_path_that_cannot_be_written_exits_2_before_scanning(caffe, tmp_path, monkeypatch):
    db = convert_mnist(tmp_path / "db", images(10), np.arange(10) % 5, "lmdb")
    scanned = []
    real_records = datasets.LMDBDatabase.records
    monkeypatch.setattr(datasets.LMDBDatabase, "records",
                        lambda self, *a, **k: scanned.append(1) or real_records(self, *a, **k))
    for plot, message in [(tmp_path / "nowhere" / "x.png",
                           "cannot write the plot %s: folder %s does not exist"
                           % (tmp_path / "nowhere" / "x.png", tmp_path / "nowhere")),
                          (tmp_path, "cannot write the plot %s: it is a folder" % tmp_path),
                          (db / "labels.png", "--plot %s would write into the scanned source"
                                              % (db / "labels.png"))]:
        status, out, err = scan(db, "--plot", plot)
        assert status == 2 and out == "" and "Traceback" not in err
        assert err.startswith("safe-layers scan: error: " + message), err
    assert scanned == [] and not (tmp_path / "nowhere").exists()
    # Whatever its name, the plot is a PNG (the name does not choose the format).
    status, out, _ = scan(db, "--plot", tmp_path / "labels.prototxt")
    assert status == 0 and scanned == [1]
    assert (tmp_path / "labels.prototxt").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_scan_never_writes_into_its_source(caffe, tmp_path, backend):
    if backend == "lmdb":
        db = write_lmdb(tmp_path / "db", poisoned_records())
    else:
        # Left in LevelDB's journal: an ordinary Open would rewrite it into a table,
        # a new manifest and a new log inside the directory.
        db = write_leveldb(tmp_path / "db", poisoned_records(), compact=False)
    # lock.mdb is LMDB's table of readers, not data: scan takes its place there as
    # Caffe's db_lmdb.cpp does, so that a writer never reuses the pages it reads.
    before = tree_fingerprint(db, ignore=("lock.mdb",))
    assert scan(db)[0] == 1
    assert scan(db, "--limit", 6)[0] == 1
    assert tree_fingerprint(db, ignore=("lock.mdb",)) == before
    status, _, err = scan(db, "--plot", db / "labels.png")
    assert status == 2 and "would write into the scanned source" in err
    assert tree_fingerprint(db, ignore=("lock.mdb",)) == before


# ---------------------------------------------------------------------------------------
# HDF5, as HDF5Data reads it.

def write_h5(path, **datasets_):
    import h5py
    with h5py.File(str(path), "w") as f:
        for name, array in datasets_.items():
            f.create_dataset(name, data=array)
    return path


def test_hdf5_list_faults_with_rows(caffe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(3)
    a = rng.standard_normal((20, 2, 3)).astype(np.float32)
    a[[4, 11], 1, 2] = np.nan
    write_h5(tmp_path / "a.h5", data=a, label=(np.arange(20) % 5).astype(np.float32))
    b = rng.standard_normal((10, 2, 3))  # float64, converted to float32 by HDF5Data
    b[7, 0, 0] = 1e39                    # finite here, +inf as float32
    b[2, 1, 1] = -np.inf
    write_h5(tmp_path / "b.h5", data=b, label=np.full(10, 7, np.int32))  # 7: outside [0, 5)
    write_h5(tmp_path / "c.h5", data=rng.standard_normal((6, 2, 3)), label=np.zeros(5))
    write_h5(tmp_path / "d.h5", data=rng.standard_normal((6, 2, 4)), label=np.zeros(6))
    write_h5(tmp_path / "e.h5", data=np.zeros((4, 2, 3), "S1"), label=np.zeros(4))
    (tmp_path / "list.txt").write_text("a.h5\nb.h5\nmissing.h5\nc.h5\nd.h5\ne.h5\n")
    status, doc, _ = scan_json("list.txt", "--tops", "data,label", "--num-classes", 5)
    assert status == 1
    by_rule = {}
    for f in doc["findings"]:
        by_rule.setdefault(f["rule"], []).append(f)
    nonfinite = {os.path.basename(f["path"]): f["rows"] for f in by_rule["SL923"]}
    assert nonfinite == {"a.h5": [4, 11], "b.h5": [2, 7]}
    [b_finding] = [f for f in by_rule["SL923"] if f["path"].endswith("b.h5")]
    assert b_finding["overflow_float32"] == 1 and b_finding["neginf"] == 1
    [missing] = by_rule["SL920"]
    assert (missing["path"], missing["line"]) == ("list.txt", 3)
    assert [os.path.basename(f["path"]) for f in by_rule["SL924"]] == ["c.h5"]
    assert [os.path.basename(f["path"]) for f in by_rule["SL925"]] == ["d.h5"]
    assert [os.path.basename(f["path"]) for f in by_rule["SL922"]] == ["e.h5"]
    assert len(by_rule["SL904"]) == 10 and {f["label"] for f in by_rule["SL904"]} == {7}
    assert [f["row"] for f in by_rule["SL904"]] == list(range(10))  # b.h5's rows
    assert all(f["path"].endswith("b.h5") for f in by_rule["SL904"])
    assert set(by_rule) == {"SL920", "SL922", "SL923", "SL924", "SL925", "SL904"}


def test_hdf5_rows_match_caffe_hdf5data(caffe, make_net, tmp_path):
    """The rows scan names are the rows Caffe's HDF5Data layer delivers as non-finite."""
    rng = np.random.default_rng(4)
    data = rng.standard_normal((12, 3)).astype(np.float64)
    data[5, 1] = np.nan
    data[9, 0] = 3e38 * 10  # overflows float32
    write_h5(tmp_path / "x.h5", data=data, label=np.zeros(12))
    (tmp_path / "list.txt").write_text("%s\n" % (tmp_path / "x.h5"))
    _, doc, _ = scan_json(tmp_path / "list.txt")
    [finding] = doc["findings"]
    net = make_net("""
        layer { name: "h5" type: "HDF5Data" top: "data" top: "label"
                hdf5_data_param { source: "%s" batch_size: 12 } }
        layer { name: "silence" type: "Silence" bottom: "data" bottom: "label" }
        """ % (tmp_path / "list.txt"))
    net.forward()
    caffe_rows = np.flatnonzero(~np.isfinite(net.blobs["data"].data).all(axis=1)).tolist()
    assert finding["rows"] == caffe_rows == [5, 9]


def test_hdf5_file_of_no_rows_is_an_error(caffe, tmp_path):
    write_h5(tmp_path / "empty.h5", data=np.zeros((0, 2), np.float32), label=np.zeros((0,), np.float32))
    write_h5(tmp_path / "full.h5", data=np.zeros((3, 2), np.float32), label=np.zeros((3,), np.float32))
    (tmp_path / "list.txt").write_text("%s\n%s\n" % (tmp_path / "full.h5", tmp_path / "empty.h5"))
    status, doc, _ = scan_json(tmp_path / "list.txt", "--tops", "data,label")
    assert status == 1 and [f["rule"] for f in doc["findings"]] == ["SL927"]
    assert doc["findings"][0]["path"] == str(tmp_path / "empty.h5")
    assert "its datasets hold no row (data=0, label=0)" in doc["findings"][0]["message"]


def test_hdf5_empty_list_missing_dataset_and_corrupt_file(caffe, tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    status, doc, _ = scan_json(tmp_path / "empty.txt", "--backend", "hdf5")
    assert status == 1 and [f["rule"] for f in doc["findings"]] == ["SL926"]
    write_h5(tmp_path / "x.h5", data=np.zeros((3, 2)))
    status, doc, _ = scan_json(tmp_path / "x.h5", "--tops", "data,label")
    assert status == 1 and [f["rule"] for f in doc["findings"]] == ["SL921"]
    raw = (tmp_path / "x.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(raw[:len(raw) // 3])
    (tmp_path / "list.txt").write_text("%s\n" % (tmp_path / "cut.h5"))
    before = tree_fingerprint(tmp_path / "cut.h5")
    status, _, err = scan(tmp_path / "list.txt")
    assert status == 2 and "cut.h5: not a readable HDF5 file" in err
    assert tree_fingerprint(tmp_path / "cut.h5") == before


# ---------------------------------------------------------------------------------------
# Labels: absent classes, the batch-size trap, label order.

def test_label_histogram_and_batch_trap(caffe, tmp_path):
    # 1000 records: class 3 is rare (10), class 5 absent, the rest common; shuffled.
    rng = np.random.default_rng(5)
    labels = np.array([0, 1, 2, 4, 6] * 198 + [3] * 10)
    rng.shuffle(labels)
    db = convert_mnist(tmp_path / "db", images(1000, 5, (4, 4)), labels, "lmdb")
    status, doc, _ = scan_json(db, "--num-classes", 7, "--batch-size", 32)
    assert status == 0  # warnings only
    rules = {f["rule"]: f for f in doc["findings"]}
    assert set(rules) == {"SL910", "SL911"}
    assert rules["SL910"]["classes"] == [5]
    assert rules["SL911"]["classes"] == [3]
    # Hypergeometric, computed independently: P(no class-3 record among 32 of 1000).
    p = math.comb(990, 32) / math.comb(1000, 32)
    [row3] = [r for r in doc["sources"][0]["labels"]["classes"] if r["label"] == 3]
    assert row3["p_absent_random"] == pytest.approx(p, rel=1e-9)
    need = next(b for b in range(1, 1000) if math.comb(990, b) / math.comb(1000, b) <= 0.01)
    assert row3["batch_for_99"] == rules["SL911"]["batch_for_99"] == need
    half = next(b for b in range(1, 1000) if math.comb(990, b) / math.comb(1000, b) < 0.5)
    assert row3["likely_absent_up_to"] == half - 1
    # The table in text output.
    status, out, _ = scan(db, "--num-classes", 7, "--batch-size", 32)
    assert "labels (1000 records, 7 classes, batch size 32):" in out
    assert any(line.split()[:2] == ["5", "0"] and "always" in line for line in out.splitlines())


def test_label_ordered_set_is_flagged(caffe, tmp_path):
    labels = np.repeat(np.arange(4), 50)  # as a converter writes a class-sorted list
    db = convert_mnist(tmp_path / "sorted", images(200, 6, (4, 4)), labels, "leveldb")
    status, doc, _ = scan_json(db, "--batch-size", 25)
    rules = {f["rule"]: f for f in doc["findings"]}
    assert "SL912" in rules and rules["SL912"]["classes_per_batch"] == 1.0
    shuffled = np.random.default_rng(6).permutation(labels)
    db2 = convert_mnist(tmp_path / "shuffled", images(200, 6, (4, 4)), shuffled, "leveldb")
    status, doc, _ = scan_json(db2, "--batch-size", 25)
    assert "SL912" not in {f["rule"] for f in doc["findings"]}


def test_plot_png(caffe, tmp_path):
    db = convert_mnist(tmp_path / "db", images(100), np.arange(100) % 7, "lmdb")
    plot = tmp_path / "labels.png"
    status, out, _ = scan(db, "--batch-size", 8, "--plot", plot)
    assert status == 0 and "plot: %s" % plot in out
    from PIL import Image
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] >= 800


# ---------------------------------------------------------------------------------------
# A net prototxt: every data layer's source.

NET = """\
name: "two_sources"
layer {
  name: "train_data" type: "Data" top: "data" top: "label"
  include { phase: TRAIN }
  data_param { source: "train_lmdb" backend: LMDB batch_size: 16 }
}
layer {
  name: "test_data" type: "Data" top: "data" top: "label"
  include { phase: TEST }
  data_param { source: "test_leveldb" batch_size: 8 }
}
layer {
  name: "extra" type: "HDF5Data" top: "aux" top: "label2"
  hdf5_data_param { source: "aux_list.txt" batch_size: 4 }
}
layer {
  name: "missing" type: "Data" top: "m" top: "ml"
  include { phase: TEST }
  data_param { source: "nowhere_lmdb" backend: LMDB batch_size: 4 }
}
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 6 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "silence" type: "Silence" bottom: "aux" bottom: "label2" bottom: "m" bottom: "ml" }
"""


def test_net_prototxt_scans_each_data_layer(caffe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_labels = np.arange(48) % 6
    train_labels[13] = 6  # the net's ip has num_output 6
    convert_mnist(tmp_path / "train_lmdb", images(48), train_labels, "lmdb")
    convert_mnist(tmp_path / "test_leveldb", images(24), np.arange(24) % 6, "leveldb")
    aux = np.ones((8, 2), np.float32)
    aux[3, 1] = np.nan
    write_h5(tmp_path / "aux.h5", aux=aux, label2=np.zeros(8))
    (tmp_path / "aux_list.txt").write_text("aux.h5\n")
    (tmp_path / "net.prototxt").write_text(NET)
    status, doc, _ = scan_json("net.prototxt")
    assert status == 1
    errors = {(f["rule"], f.get("key") or f.get("path")) for f in doc["findings"] if f["severity"] == "error"}
    assert errors == {("SL904", "00000013"), ("SL923", "aux.h5"), ("SL930", "net.prototxt")}
    [missing] = [f for f in doc["findings"] if f["rule"] == "SL930"]
    source_line = '  data_param { source: "nowhere_lmdb" backend: LMDB batch_size: 4 }'
    assert (missing["line"], missing["col"]) == (NET.splitlines().index(source_line) + 1,
                                                 source_line.index("source") + 1)
    sources = {os.path.basename(s["path"]): s for s in doc["sources"]}
    assert set(sources) == {"train_lmdb", "test_leveldb", "aux_list.txt"}
    assert sources["train_lmdb"]["num_classes"] == 6
    assert sources["train_lmdb"]["classes_from"] == "layer 'ip' (num_output)"
    assert sources["train_lmdb"]["labels"]["batch_size"] == 16
    assert sources["test_leveldb"]["backend"] == "leveldb"
    assert sources["aux_list.txt"]["backend"] == "hdf5"


def test_solver_prototxt_and_bad_prototxt(caffe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    convert_mnist(tmp_path / "train_lmdb", images(20), np.arange(20) % 6, "lmdb")
    (tmp_path / "net.prototxt").write_text(textwrap.dedent("""\
        layer { name: "d" type: "Data" top: "data" top: "label"
                data_param { source: "train_lmdb" backend: LMDB batch_size: 4 } }
        """))
    (tmp_path / "solver.prototxt").write_text('net: "net.prototxt"\nbase_lr: 0.1\n')
    status, doc, _ = scan_json("solver.prototxt")
    assert status == 0 and [os.path.basename(s["path"]) for s in doc["sources"]] == ["train_lmdb"]
    (tmp_path / "broken.prototxt").write_text('layer { name: "d" type: "Data" \n')
    status, _, err = scan("broken.prototxt")
    assert status == 2 and "broken.prototxt" in err


def test_select_or_ignore_of_no_rule_exits_2(caffe, tmp_path):
    db = convert_mnist(tmp_path / "db", images(10), np.arange(10) % 5, "lmdb")
    for option, ids in (("--select", "SL999"), ("--ignore", "SL90,SL1")):
        status, out, err = scan(db, option, ids)
        bad = ids.split(",")[-1]
        assert status == 2 and out == "" and "Traceback" not in err
        assert err.startswith("safe-layers scan: error: %s %s: no such rule (this command's rules: "
                              "SL901, " % (option, bad))
    status, doc, _ = scan_json(db, "--select", "SL91", "--num-classes", 6)
    assert status == 0 and {f["rule"] for f in doc["findings"]} == {"SL910"}


def test_every_rule_scan_reports_is_in_its_rule_list():
    import re
    from safe_layers.tools import rule_table
    from safe_layers.tools import scan as scan_package
    folder = os.path.dirname(scan_package.__file__)
    source = "".join(open(os.path.join(folder, name)).read()
                     for name in sorted(os.listdir(folder)) if name.endswith(".py"))
    assert set(re.findall(r'"(SL\d{3})"', source)) == set(rule_table.ids_of("scan"))


def test_list_rules_prints_the_rule_table_and_exits_0():
    from safe_layers.tools import rule_table
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as stop:
        cli.main(["scan", "--list-rules"])
    assert stop.value.code == 0 and err.getvalue() == ""
    assert out.getvalue() == "\n".join(rule_table.list_lines("scan")) + "\n"
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["SL901", "SL902", "SL903", "SL904", "SL905", "SL906",
                                                   "SL907", "SL910", "SL911", "SL912", "SL920", "SL921",
                                                   "SL922", "SL923", "SL924", "SL925", "SL926", "SL927",
                                                   "SL930"]
    assert lines[0] == "SL901  error    non-finite float_data"
    assert all(rule_table.RULES[rule_id].doc for rule_id in rule_table.ids_of("scan"))


# ---------------------------------------------------------------------------------------
# The reader API other tools use, and the progress bar.

def test_datasets_api(caffe, tmp_path):
    db = convert_mnist(tmp_path / "db", images(5, 7, (6, 4)), [0, 1, 2, 3, 4], "leveldb")
    assert datasets.detect_backend(db) == "leveldb"
    assert datasets.first_datum_shape(db) == (1, 6, 4)
    with datasets.open_database(db) as source:
        records = list(source.records())
    assert [r.position for r in records] == [0, 1, 2, 3, 4]
    assert [r.key_text for r in records] == ["%08d" % i for i in range(5)]
    array = datasets.datum_array(datasets.parse_datum(records[2].value))
    assert array.dtype == np.uint8 and (array[0] == images(5, 7, (6, 4))[2]).all()
    write_h5(tmp_path / "x.h5", data=np.zeros((7, 3, 2)), label=np.zeros((7, 1)))
    (tmp_path / "list.txt").write_text("%s\n" % (tmp_path / "x.h5"))
    assert datasets.hdf5_first_shapes(tmp_path / "list.txt", ["data", "label"]) == {
        "data": (7, 3, 2), "label": (7, 1)}
    with pytest.raises(InputError, match="empty"):
        datasets.first_datum_shape(write_lmdb(tmp_path / "empty", []))


def test_progress_bar_only_on_a_terminal(caffe, tmp_path):
    db = convert_mnist(tmp_path / "db", images(30), np.arange(30) % 3, "lmdb")
    command = [sys.executable, "-m", "safe_layers.tools.cli", "scan", str(db)]
    piped = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and piped.stderr == ""
    leader, follower = pty.openpty()
    # A terminal 100 columns wide (a fresh pty is 0x0, where tqdm draws nothing).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=follower, stdin=follower)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    proc.wait(timeout=120)
    os.close(leader)
    assert proc.returncode == 0
    assert b"0/30" in output and b"rec/s" in output
