"""An LMDB's B-tree walked key by key in a child process, before this process reads it.

liblmdb aborts the process that reads some garbage pages (mdb.c's ``mdb_assert``: a leaf
page whose header is not a leaf's is one), and an older liblmdb walks a garbage leaf page
without an error, as keys out of order. Walked apart first, a corrupt database is an
error that names where, not the end of the tool.

    python -m safe_layers.readers.lmdb_keys PATH SUBDIR(0|1) [LIMIT]
    exit 0: walked; 3: one line on stderr, "POSITION<TAB>LAST_KEY_HEX<TAB>WHY".
"""

import os
import subprocess
import sys

BROKEN = 3


def walk_apart(path, subdir, limit=None):
    """None when the keys of ``path`` walk in order (up to ``limit``), else (position,
    last good key bytes or None, why); position None where the walk died unheard."""
    done = subprocess.run([sys.executable, "-m", "safe_layers.readers.lmdb_keys", path,
                           str(int(subdir))] + ([] if limit is None else [str(limit)]),
                          capture_output=True, text=True, env=dict(os.environ))
    if done.returncode == 0:
        return None
    said = [line for line in done.stderr.strip().splitlines() if line.strip()]
    if done.returncode == BROKEN and said and said[-1].count("\t") == 2:
        position, last, why = said[-1].split("\t")
        return int(position), bytes.fromhex(last) if last else None, why
    if done.returncode < 0:
        why = "liblmdb ended the process that walked its keys (signal %d)%s" % (
            -done.returncode, ": " + said[-1] if said else "")
    else:
        why = said[-1] if said else "the process that walked its keys exited %d" % done.returncode
    return None, None, why


def open_readonly(lmdb, path, subdir):
    """The environment, read-only, in LMDB's reader table (lock=True) so that a process
    writing the database meanwhile never reuses the pages read here (a walk without it
    meets MDB_PAGE_NOTFOUND in a database that is fine); without the lock only where
    the lock file cannot be made (read-only media, where no one writes).
    readahead=False: a cursor walk should not fault in pages it will not read."""
    try:
        return lmdb.open(path, subdir=subdir, readonly=True, lock=True, readahead=False,
                         max_dbs=0)
    except lmdb.ReadonlyError:
        pass  # liblmdb's EACCES/EROFS on making or opening lock.mdb
    except lmdb.Error as exc:
        if "Read-only file system" not in str(exc):
            raise
    return lmdb.open(path, subdir=subdir, readonly=True, lock=False, readahead=False,
                     max_readers=1, max_dbs=0)


def _walk(path, subdir, limit):
    import lmdb
    env = open_readonly(lmdb, path, subdir)
    position, last = 0, None
    try:
        with env.begin(buffers=True) as txn:
            for key in txn.cursor().iternext(values=False):
                if limit is not None and position >= limit:
                    break
                key = bytes(key)
                if last is not None and key <= last:
                    # LMDB keeps its keys sorted: anything else is a page of garbage.
                    raise ValueError("key 0x%s out of order" % key.hex())
                last, position = key, position + 1
    except (lmdb.Error, ValueError) as exc:
        sys.stderr.write("%d\t%s\t%s\n" % (position, "" if last is None else last.hex(),
                                           str(exc).strip() or type(exc).__name__))
        return BROKEN
    return 0


if __name__ == "__main__":
    sys.exit(_walk(sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]) if len(sys.argv) > 3 else None))
