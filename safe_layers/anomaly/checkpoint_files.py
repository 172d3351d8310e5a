"""The files behind a watch's checkpoints: the lock that gives one watch a snapshot_prefix,
the manifest of the snapshots it wrote, and what makes a snapshot file one to restore
(whole, and still the bytes the watch took).

Caffe gives Python no error to catch on either side. ``Solver::Snapshot`` writes
``<prefix>_iter_N.caffemodel`` and ``.solverstate`` in place and CHECK-fails on a write
that fails (src/caffe/util/io.cpp:72, ``WriteProtoToBinaryFile``; measured on a full
tmpfs: the model written, the state left empty, the process killed by SIGABRT), and
``Solver::Restore`` CHECK-fails on a file it cannot read. So a watch looks first: free
space before a snapshot, the files' completeness after it, their digests before a restore.
"""

import collections
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import time
import weakref

import numpy

from safe_layers.core import atomic, caffe_process
from safe_layers.readers import prototxt

LOCK_SUFFIX = ".safe_layers.lock"
MANIFEST_SUFFIX = ".safe_layers.checkpoints"

# Room kept free beyond a checkpoint's size: the manifest, and what others write meanwhile.
SPACE_SLACK = 256 << 10

# A snapshot the manifest says was being written when its process died: its files (absent
# when it began) are removed by the next watch if they were written within this long after
# it began; the margin before allows for file times that the kernel takes from a coarser
# clock than time.time_ns().
PENDING_WINDOW_NS = 3600 * 10 ** 9
CLOCK_MARGIN_NS = 10 ** 9

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

# SolverState (src/caffe/proto/caffe.proto): learned_net = 2, current_step = 4, the last
# field SGDSolver::SnapshotSolverStateToBinaryProto sets (protobuf writes in field order).
STATE_LEARNED_NET, STATE_CURRENT_STEP = 2, 4
NET_LAYER = 100  # NetParameter.layer: Net::ToProto writes one per layer of the net

# Values of each param blob compared to tell a snapshot of the solver's state.
COMPARED_VALUES = 64

_CHUNK = 1 << 20

Digest = collections.namedtuple("Digest", "size mtime_ns sha256")
Digest.__doc__ = "A file as a checkpoint took it: its size, mtime (ns) and SHA-256."


def digest(path):
    """The :class:`Digest` of ``path`` (raises OSError)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            sha.update(chunk)
    return Digest(st.st_size, st.st_mtime_ns, sha.hexdigest())


def change(path, taken):
    """How ``path`` differs from its :class:`Digest` ``taken``: 'is gone', 'was changed',
    or None (the same bytes)."""
    try:
        if os.stat(path).st_size == taken.size and digest(path).sha256 == taken.sha256:
            return None
    except FileNotFoundError:
        return "is gone"
    except OSError as exc:
        return "cannot be read (%s)" % exc.strerror
    return "was changed"


def same_write(path, taken):
    """Whether ``path`` is still the file written when ``taken`` was (no one wrote it
    since): what a watch may delete as its own."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (taken.size, taken.mtime_ns)


def remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def free_bytes(folder):
    """Bytes an unprivileged writer may still write in ``folder``'s file system."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def errno_name(number):
    """'ENOSPC' for errno.ENOSPC."""
    return errno.errorcode.get(number, str(number))


# ---------------------------------------------------------------------------------------
# Is a snapshot file whole?

def _varint(f):
    result = shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise ValueError("is cut short inside a field")
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("is no protobuf message")


def proto_fields(path, keep=()):
    """The top-level fields of the binary protobuf message in ``path``: (Counter of field
    numbers, {field: bytes of its first value} for the length-delimited fields in ``keep``).
    ValueError (saying how) unless the fields end exactly at the end of the file."""
    size = os.path.getsize(path)
    counts, values = collections.Counter(), {}
    with open(path, "rb") as f:
        while f.tell() < size:
            key = _varint(f)
            field, wire = key >> 3, key & 7
            if field == 0 or wire not in (0, 1, 2, 5):
                raise ValueError("is no protobuf message (byte %d)" % f.tell())
            if wire == 0:
                _varint(f)
            elif wire == 2:
                length = _varint(f)
                if field in keep and field not in values:
                    values[field] = f.read(length)
                else:
                    f.seek(length, os.SEEK_CUR)
            else:
                f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            counts[field] += 1
        if f.tell() != size:
            raise ValueError("is cut short (its last field runs past its %d bytes)" % size)
    return counts, values


def incomplete(path, kind, layers=None):
    """Why the snapshot file ``path`` is not a whole ``kind`` ('model' or 'state') that
    ``Solver::Restore`` could read, or None. ``layers``: the net's layer count, which a
    whole binary model holds."""
    try:
        if os.path.getsize(path) == 0:
            return "is empty"
        if path.endswith(".h5"):
            return _incomplete_hdf5(path)
        counts, _ = proto_fields(path)
    except ValueError as exc:
        return str(exc)
    except OSError as exc:
        return "cannot be read (%s)" % exc.strerror
    if kind == "state" and not counts[STATE_CURRENT_STEP]:
        return "is cut short (no current_step, the field Caffe writes last)"
    if kind == "model" and layers is not None and counts[NET_LAYER] != layers:
        return "is cut short (%d layers of the net's %d)" % (counts[NET_LAYER], layers)
    return None


def _incomplete_hdf5(path):
    with open(path, "rb") as f:
        if f.read(len(HDF5_SIGNATURE)) != HDF5_SIGNATURE:
            return "has no HDF5 signature"
    try:
        import h5py  # deferred: heavy, and only HDF5 snapshots need it
    except ImportError:
        return None
    try:
        with h5py.File(path, "r") as f:
            list(f.keys())
    except Exception as exc:  # noqa: BLE001 - whatever HDF5 says, the file is not whole
        return "cannot be read back (%s)" % exc
    return None


# ---------------------------------------------------------------------------------------
# The state a solver was restored from.

def learned_net(state):
    """The model file ``state`` names (``SolverState.learned_net``, opened by Caffe's
    restore as written, from the working directory), or None when it cannot say."""
    if state.endswith(".h5"):
        try:
            import h5py  # deferred: heavy, and only HDF5 snapshots need it
            with h5py.File(state, "r") as f:
                value = f["learned_net"][()]
            return value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except Exception:  # noqa: BLE001 - Caffe's own name below
            return re.sub(r"\.solverstate\.h5$", ".caffemodel.h5", state)
    try:
        _, values = proto_fields(state, keep=(STATE_LEARNED_NET,))
    except (OSError, ValueError):
        return None
    name = values.get(STATE_LEARNED_NET)
    return name.decode("utf-8", "replace") if name else None


def _saved_weights(model):
    """{layer: [the first COMPARED_VALUES values of each blob, float32]} of ``model``."""
    if model.endswith(".h5"):
        import h5py  # deferred: heavy, and only HDF5 snapshots need it
        with h5py.File(model, "r") as f:
            return {name: [numpy.asarray(group[str(k)][...], numpy.float32).ravel()[:COMPARED_VALUES]
                           for k in range(len(group))]
                    for name, group in f["data"].items()}
    net = prototxt.caffe_pb2().NetParameter()
    with open(model, "rb") as f:
        net.ParseFromString(f.read())
    return {layer.name: [numpy.asarray(blob.data[:COMPARED_VALUES], numpy.float32)
                         for blob in layer.blobs]
            for layer in list(net.layer) or list(net.layers) if len(layer.blobs)}


def state_problem(state, model, solver):
    """Why ``state`` (and its ``model``) is not the state ``solver`` is in (its iteration,
    or its first weights, differ), or None: the snapshot a solver was just restored from,
    or just wrote, and not another run's of the same name."""
    try:
        at = caffe_process.solverstate_iteration(state)
    except Exception as exc:  # noqa: BLE001 - a state we cannot read is no rollback point
        return "cannot be read (%s)" % exc
    if at != int(solver.iter):
        return "is the state of iteration %d, and the solver is at %d" % (at, int(solver.iter))
    try:
        saved = _saved_weights(model)
    except Exception as exc:  # noqa: BLE001 - a model we cannot read is no rollback point
        return "names model %s, which cannot be read (%s)" % (model, exc)
    compared = 0
    for name, blobs in solver.net.params.items():
        if name not in saved:
            continue
        if len(saved[name]) != len(blobs):
            return "holds %d blobs of layer %s, the net %d" % (len(saved[name]), name, len(blobs))
        for values, blob in zip(saved[name], blobs):
            live = numpy.asarray(blob.data, numpy.float32).ravel()[:len(values)]
            if live.tobytes() != values.tobytes():
                return "holds weights of layer %s other than the solver's" % name
            compared += 1
    return None if compared else "shares no weighted layer with the net"


# ---------------------------------------------------------------------------------------
# One watch per snapshot_prefix.

_claims = weakref.WeakSet()


def _drop_in_child():
    # A forked child shares the lock (flock belongs to the open file): it lets go of its
    # copy, so that the lock dies with the process that took it.
    for claim in list(_claims):
        claim.forget_after_fork()


os.register_at_fork(after_in_child=_drop_in_child)


def _holder(fd):
    text = os.pread(fd, 32, 0).strip()
    return int(text) if text.isdigit() else None


def _in_use(prefix, lock_path, pid):
    who = "process %d" % pid if pid else "another process"
    mine = (" (this one: close() its earlier watch first)" if pid == os.getpid() else "")
    return ("watch: snapshot_prefix %r (lock %s) is in use by %s%s: give this run its own "
            "snapshot_prefix" % (prefix, lock_path, who, mine))


def _open_lock(path, prefix):
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        why = "is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise ValueError("watch: the lock %s of snapshot_prefix %r %s: remove it, or give this run "
                         "its own snapshot_prefix" % (path, prefix, why)) from None


def _take_lock(path, prefix):
    """An open descriptor holding flock(LOCK_EX) on ``path``, our pid written in it; None
    where the file system has no locks. ValueError naming the holder when one holds it."""
    while True:
        fd = _open_lock(path, prefix)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError("watch: the lock %s of snapshot_prefix %r is not a file"
                                 % (path, prefix))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(_in_use(prefix, path, _holder(fd))) from None
            except OSError:
                os.close(fd)
                return None
            try:
                now = os.lstat(path)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)  # its last holder removed it as it let go: lock the new one
                continue
            text = os.pread(fd, 64, 0).strip()
            if text and not text.isdigit():
                raise ValueError("watch: %s (the lock of snapshot_prefix %r) holds something else "
                                 "than a process id: not ours to overwrite; give this run its "
                                 "own snapshot_prefix" % (path, prefix))
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"%d\n" % os.getpid(), 0)
            return fd
        except BaseException:
            os.close(fd)
            raise


def snapshot_name(prefix, path):
    """Whether ``path`` is a name Caffe's snapshot of ``prefix`` writes."""
    return re.fullmatch(re.escape(prefix) + r"_iter_\d+\.(caffemodel|solverstate)(\.h5)?",
                        path) is not None


class PrefixClaim:
    """One watch's hold on a snapshot_prefix: ``flock`` on ``<prefix>.safe_layers.lock``
    (the OS lets go when the process dies: kill -9 leaves no stale lock; ``fd`` None where
    the file system has no locks) and the manifest ``<prefix>.safe_layers.checkpoints`` of
    the snapshot files the watch wrote and keeps, so that the next watch of the prefix can
    remove what a killed one left (and nothing else)."""

    def __init__(self, prefix):
        self.prefix = prefix
        self.lock_path = prefix + LOCK_SUFFIX
        self.manifest_path = prefix + MANIFEST_SUFFIX
        self.fd = _take_lock(self.lock_path, prefix)
        self.pid = os.getpid()
        # A claim dropped without release() still lets go of its lock.
        self._close = weakref.finalize(self, os.close, self.fd) if self.fd is not None else None
        _claims.add(self)

    @property
    def ours(self):
        """Whether this process took the claim (a forked child has a copy, not the claim)."""
        return self.pid == os.getpid()

    def record(self, files, pending=()):
        """Write the manifest: ``files`` ({path: Digest}) kept, ``pending`` paths a
        snapshot is about to write. Raises OSError."""
        if not files and not pending:
            if os.path.lexists(self.manifest_path):
                os.remove(self.manifest_path)
            return
        now = time.time_ns()
        data = {"pid": self.pid, "prefix": self.prefix,
                "files": [[path, d.size, d.mtime_ns, d.sha256] for path, d in sorted(files.items())],
                "pending": [[path, now] for path in pending]}
        atomic.replace_file(self.manifest_path, json.dumps(data, sort_keys=True) + "\n")

    def leftovers(self):
        """(pid, paths): the snapshot files the manifest of an earlier watch of this prefix
        names (one that ended without closing: killed) and that are still as it left them."""
        try:
            with open(self.manifest_path, encoding="utf-8") as f:
                data = json.load(f)
            files, pending = list(data.get("files", [])), list(data.get("pending", []))
        except (OSError, ValueError, AttributeError, TypeError):
            return None, []
        found = []
        for entry in files:
            try:
                path, taken = entry[0], Digest(*entry[1:4])
            except (TypeError, IndexError):
                continue
            if (isinstance(path, str) and snapshot_name(self.prefix, path)
                    and same_write(path, taken) and change(path, taken) is None):
                found.append(path)
        for entry in pending:
            try:
                path, since = entry
                if not (isinstance(path, str) and isinstance(since, int)):
                    continue
                st = os.lstat(path)
            except (OSError, TypeError, ValueError):
                continue
            if (snapshot_name(self.prefix, path) and stat.S_ISREG(st.st_mode)
                    and since - CLOCK_MARGIN_NS <= st.st_mtime_ns <= since + PENDING_WINDOW_NS):
                found.append(path)
        pid = data.get("pid")
        return (pid if isinstance(pid, int) else None), sorted(set(found))

    def release(self):
        """Remove the manifest and the lock file, and let go of the lock."""
        if not self.ours:
            return
        remove_quietly(self.manifest_path)
        if self.fd is not None:
            try:
                if os.path.samestat(os.lstat(self.lock_path), os.fstat(self.fd)):
                    os.remove(self.lock_path)  # while held: a waiter then locks a new file
            except OSError:
                pass
            self._close()
            self.fd = None
        _claims.discard(self)

    def forget_after_fork(self):
        if self.fd is not None:
            self._close()
            self.fd = None
