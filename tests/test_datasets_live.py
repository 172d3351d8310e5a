"""Databases another process is writing while we read them (a conversion still running, a
second job appending): read as Caffe reads them, never a crash of our own process."""

import subprocess
import sys
import textwrap
import time

import pytest

from caffe_data import datum, write_lmdb

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
