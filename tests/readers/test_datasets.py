"""The dataset readers (safe_layers.readers.datasets, run by `scan`) on databases another
process is writing while we read them (a conversion still running, a second job
appending): read as Caffe reads them, never a crash of our own process."""

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
