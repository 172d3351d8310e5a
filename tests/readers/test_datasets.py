"""The dataset readers (safe_layers.readers.datasets, run by `scan`) on databases another
process is writing while we read them (a conversion still running, a second job
appending): read as Caffe reads them, never a crash of our own process."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from support.caffe_data import datum, write_lmdb

pytest.importorskip("lmdb")

WRITER = textwrap.dedent("""
    import sys, time, lmdb
    env = lmdb.open(sys.argv[1], map_size=1 << 28)
    value = sys.stdin.buffer.read()
    end = time.time() + float(sys.argv[2])
    i = 0
    sys.stdout.write("writing\\n"); sys.stdout.flush()
    while time.time() < end:
        with env.begin(write=True) as txn:
            for _ in range(50):
                txn.put(b"%08d" % (1000 + i), value)
                i += 1
        # rewrite old keys too: freed pages are reused while readers walk
        with env.begin(write=True) as txn:
            for k in range(0, i, 7):
                txn.put(b"%08d" % (1000 + k), value)
""")


def test_scan_of_an_lmdb_being_written_reads_under_the_reader_lock(tmp_path):
    import numpy as np
    record = datum(np.zeros((1, 8, 8), np.uint8), 3)
    db = write_lmdb(tmp_path / "live_lmdb", [(b"%08d" % i, record) for i in range(500)])
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), "8"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    writer.stdin.write(record.SerializeToString())
    writer.stdin.close()
    assert writer.stdout.readline() == b"writing\n"
    try:
        outcomes = []
        deadline = time.time() + 6
        while time.time() < deadline:
            result = subprocess.run([sys.executable, "-m", "safe_layers.tools.cli", "scan", str(db)],
                                    capture_output=True, text=True, timeout=120)
            outcomes.append(result.returncode)
            assert result.returncode in (0, 1), result.stderr[-2000:]
            assert "Traceback" not in result.stderr
        assert len(outcomes) >= 2
    finally:
        writer.wait(30)


LEVELDB_HOLDER = textwrap.dedent("""
    import sys, time, plyvel
    db = plyvel.DB(sys.argv[1], create_if_missing=True)
    sys.stdout.write("open\\n"); sys.stdout.flush()
    end = time.time() + float(sys.argv[2])
    i = 0
    while time.time() < end:
        db.put(b"%08d" % (i % 5000), b"x" * 200)
        i += 1
        if i % 2000 == 0:
            db.compact_range()
    db.close()
""")


def test_a_leveldb_another_process_has_open_is_named_as_such_never_by_a_private_folder(tmp_path):
    pytest.importorskip("plyvel")
    from safe_layers.readers import datasets
    db = tmp_path / "live_leveldb"
    holder = subprocess.Popen([sys.executable, "-c", LEVELDB_HOLDER, str(db), "6"],
                              stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"open\n"
    try:
        note = datasets._held_note(str(db))
        assert "process %d has this LevelDB open" % holder.pid in note
        deadline = time.time() + 4
        while time.time() < deadline:
            result = subprocess.run([sys.executable, "-m", "safe_layers.tools.cli", "scan", str(db)],
                                    capture_output=True, text=True, timeout=120)
            assert "Traceback" not in result.stderr
            assert "safe-layers-leveldb-" not in result.stderr + result.stdout
            if result.returncode == 2:
                assert "has this LevelDB open" in result.stderr, result.stderr
    finally:
        holder.wait(30)
    assert datasets._held_note(str(db)) == ""


def test_the_key_walk_reads_in_lmdbs_reader_table_as_the_record_reader_does(tmp_path):
    # Without a slot in the reader table (lock=False), a writer reuses the pages the walk
    # is reading: MDB_PAGE_NOTFOUND on a database that is fine (the test above meets it
    # now and then; this one every time). liblmdb makes lock.mdb when it takes a slot.
    import numpy as np
    from safe_layers.readers import lmdb_keys
    db = write_lmdb(tmp_path / "db_lmdb", [(b"%08d" % i, datum(np.zeros((1, 2, 2), np.uint8), 1))
                                           for i in range(20)])
    (db / "lock.mdb").unlink()
    assert lmdb_keys.walk_apart(str(db), True) is None
    assert (db / "lock.mdb").exists()


def test_an_lmdb_on_read_only_media_is_walked_and_read_without_the_lock(tmp_path):
    # A dataset on a read-only mount (EROFS on making lock.mdb): the key walk and the
    # record reader both read it, and write nothing there. (liblmdb opens a read-only
    # environment without its lock on EROFS itself; lmdb_keys.open_readonly's own fallback
    # is for EACCES, a folder of another user's, which a test run as root cannot meet.)
    import numpy as np
    from support.mounts import private_mount_command
    command = private_mount_command()
    if command is None:
        pytest.skip("no mount namespace here to mount a folder read-only in")
    db = write_lmdb(tmp_path / "ro_lmdb", [(b"%08d" % i, datum(np.zeros((1, 2, 2), np.uint8), i % 2))
                                           for i in range(20)])
    (db / "lock.mdb").unlink()
    shell = ('mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && ! touch "$1/probe" '
             '2>/dev/null && exec "$2" -m safe_layers.tools.cli scan "$1"')
    run = subprocess.run(command + ["sh", "-c", shell, "sh", str(db), sys.executable],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "20 records scanned" in run.stdout and "no faulty record" in run.stdout
    assert sorted(p.name for p in db.iterdir()) == ["data.mdb"]


def test_a_leveldb_read_never_writes_into_files_its_manifest_does_not_know_yet(tmp_path):
    """A live writer's table or journal begun but not yet logged in its MANIFEST bears a
    number the reader's LevelDB hands out afresh on open: linked into the private folder,
    its open(O_TRUNC) would follow the link and write into the source. Such files are left
    out (and the records are read all the same)."""
    pytest.importorskip("plyvel")
    import numpy as np
    from safe_layers.readers import datasets, leveldb_files
    from support.caffe_data import write_leveldb
    db = write_leveldb(tmp_path / "db_leveldb", [(b"%08d" % i, datum(np.zeros((1, 2, 2), np.uint8), 1))
                                                 for i in range(50)], compact=False)
    first = leveldb_files.next_file_number(str(db))
    assert first > max(leveldb_files.file_number(n) or 0 for n in os.listdir(db))
    # What a writer may have begun: the numbers the reader's LevelDB takes first.
    begun = ["%06d.log" % first, "%06d.ldb" % (first + 1), "%06d.ldb" % (first + 2),
             "MANIFEST-%06d" % (first + 3), "%06d.dbtmp" % first]
    for name in begun:
        (db / name).write_bytes(b"a writer's bytes")
    with datasets.open_database(str(db), "leveldb") as opened:
        assert len(list(opened.records())) == 50
    for name in begun:
        assert (db / name).read_bytes() == b"a writer's bytes", name


@pytest.mark.parametrize("damage", ["torn tail", "flipped byte"])
def test_a_damaged_manifest_never_gives_a_later_file_number(tmp_path, damage):
    """What a reader takes for the counter may fall short (fewer files linked, the open
    fails and says so), never past it (a link LevelDB would write through)."""
    pytest.importorskip("plyvel")
    import numpy as np
    from safe_layers.readers import leveldb_files
    from support.caffe_data import write_leveldb
    db = write_leveldb(tmp_path / "db_leveldb", [(b"%08d" % i, datum(np.zeros((1, 2, 2), np.uint8), 1))
                                                 for i in range(50)])
    whole = leveldb_files.next_file_number(str(db))
    manifest = db / (db / "CURRENT").read_text().strip()
    data = bytearray(manifest.read_bytes())
    for cut in range(1, len(data)):
        damaged = data[:cut] if damage == "torn tail" else (
            data[:cut] + bytes([data[cut] ^ 0x40]) + data[cut + 1:])
        manifest.write_bytes(bytes(damaged))
        assert leveldb_files.next_file_number(str(db)) <= whole, cut
    manifest.write_bytes(bytes(data))
    assert leveldb_files.next_file_number(str(db)) == whole > 0
