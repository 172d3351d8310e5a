"""Streaming, read-only readers of the datasets Caffe's data layers read.

One small API for every tool that looks inside a data source (``scan`` checks every
record, ``lint`` reads the first one for shape inference):

    with open_database("train_lmdb") as db:            # LMDB or LevelDB of Datums
        for record in db.records(limit=1000):          # Record(position, key, value)
            datum = parse_datum(record.value)          # caffe_pb2.Datum (DatumError if not)
            array = datum_array(datum)                 # (C, H, W) uint8 or float32

    first_datum_shape("train_lmdb")                    # (C, H, W) of the first record

    for line, path in hdf5_list("train_h5.txt"):       # the HDF5Data `source` list file
        with HDF5File(path) as h5:
            h5.shape("data"); h5.rows("data")          # (first row, block) chunks

Records come in the order Caffe's ``Data`` layer reads them (byte order of the keys),
``position`` counting from 0. Nothing here loads a whole database: LMDB is memory-mapped
and walked with a cursor, LevelDB with an iterator, HDF5 in row chunks. Nothing here
writes into the source's data either: LMDB opens read-only with its reader lock, as Caffe's
``db_lmdb.cpp`` does (a reader outside the lock table can be handed pages a writer is
reusing: liblmdb aborts the process), and LevelDB (whose
``Open`` always writes: a lock, an info log, a new manifest, a compaction of its journal)
is opened through a private directory of symbolic links to the source's files (those its
MANIFEST accounts for: :mod:`.leveldb_files`), which LevelDB never writes into, only
replaces or unlinks, inside that private directory (a
journal LevelDB replays on open is written out there as a new table: temporary disk space
up to the journal's size).

Every failure to read is an :class:`~safe_layers.tools.findings.InputError` saying what
and where (the CLI exits 2 on it).
"""

import fcntl
import os
import re
import shutil
import struct

from safe_layers.core import scratch
from safe_layers.core.errors import InputError
from safe_layers.readers import leveldb_files, lmdb_keys
from safe_layers.readers.prototxt import caffe_pb2, resolve_reference

BACKENDS = ("lmdb", "leveldb", "hdf5")


class Record:
    """One database entry: ``position`` (0-based, in Caffe's read order), ``key`` and
    ``value`` (bytes)."""

    __slots__ = ("position", "key", "value")

    def __init__(self, position, key, value):
        self.position, self.key, self.value = position, key, value

    @property
    def key_text(self):
        return key_text(self.key)

    def __repr__(self):
        return "Record(%d, %s, %d bytes)" % (self.position, self.key_text, len(self.value))


def key_text(key):
    """A key as people read it: the text when it is printable ASCII (Caffe's convert
    tools write ``%08d`` and ``%08d_<file>``), else ``0x`` and hex."""
    if not key:
        return "(empty)"
    try:
        text = bytes(key).decode("ascii")
    except UnicodeDecodeError:
        return "0x" + bytes(key).hex()
    return text if text.isprintable() else "0x" + bytes(key).hex()


# ---------------------------------------------------------------------------------------
# What a path is.

def detect_backend(path):
    """'lmdb', 'leveldb' or 'hdf5' for a database directory or file; 'hdf5' also for an
    HDF5Data list file (a text file naming ``.h5`` files). InputError when it is none."""
    path = str(path)
    if not os.path.exists(path):
        raise InputError("%s: no such file or directory" % path)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "data.mdb")):
            return "lmdb"
        if os.path.exists(os.path.join(path, "CURRENT")):
            return "leveldb"
        raise InputError("%s: a directory that is neither an LMDB (no data.mdb) nor a LevelDB "
                         "(no CURRENT file)" % path)
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    if len(head) >= 20 and head[16:20] == _LMDB_MAGIC:
        return "lmdb"
    if _looks_like_hdf5_list(head):
        return "hdf5"
    raise InputError("%s: not a database Caffe reads (not an LMDB or LevelDB directory, an "
                     "HDF5 file, or a list of .h5 files); give --backend to say which" % path)


# LMDB's meta page starts with a page header (8-byte pgno, 2 pad, 2 flags, 4 lower/upper)
# followed by the magic 0xBEEFC0DE (little endian on the machines that write Caffe's data).
_LMDB_MAGIC = b"\xde\xc0\xef\xbe"


def _looks_like_hdf5_list(head):
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    tokens = text.split()
    return bool(tokens) and all(t.lower().endswith((".h5", ".hdf5", ".he5", ".hdf")) or os.path.exists(t)
                                for t in tokens[:20])


# ---------------------------------------------------------------------------------------
# Key-value databases of Datums.

class Database:
    """Common interface of :class:`LMDBDatabase` and :class:`LevelDBDatabase`:
    ``records(limit=None)``, ``first()``, ``count`` (number of entries when the backend
    knows it cheaply, else None), ``close()``; also a context manager."""

    backend = None

    def __init__(self, path):
        self.path = str(path)
        self.count = None

    def records(self, limit=None):
        raise NotImplementedError

    def first(self):
        """The first Record, or None for an empty database."""
        for record in self.records(limit=1):
            return record
        return None

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class LMDBDatabase(Database):
    backend = "lmdb"

    def __init__(self, path):
        super().__init__(path)
        try:
            import lmdb
        except ImportError as exc:
            raise InputError("%s: reading LMDB needs the 'lmdb' package (%s); pip install 'safe_layers[tools]'"
                             % (path, exc)) from None
        self._lmdb = lmdb
        subdir = os.path.isdir(self.path)
        _check_lmdb_size(os.path.join(self.path, "data.mdb") if subdir else self.path)
        try:
            self._env = lmdb_keys.open_readonly(lmdb, self.path, subdir)
            self.count = self._env.stat()["entries"]
        except lmdb.Error as exc:
            raise InputError("%s: not a readable LMDB: %s" % (self.path, _lmdb_message(exc))) from None

    def records(self, limit=None):
        broken = lmdb_keys.walk_apart(self.path, os.path.isdir(self.path), limit)
        if broken is not None:
            position, last_key, why = broken
            if position is None:
                raise InputError("%s: LMDB corrupt: %s" % (self.path, why))
            raise self._corrupt(position, last_key, why)
        position = 0
        last_key = None
        try:
            with self._env.begin(buffers=False) as txn:
                cursor = txn.cursor()
                for key, value in cursor:
                    if limit is not None and position >= limit:
                        return
                    yield Record(position, key, value)
                    last_key = key
                    position += 1
        except self._lmdb.Error as exc:
            raise self._corrupt(position, last_key, _lmdb_message(exc)) from None

    def _corrupt(self, position, last_key, why):
        """The error of a database found corrupt after ``position`` good records."""
        return InputError("%s: LMDB corrupt after %d records (last good key %s): %s"
                          % (self.path, position, key_text(last_key) if last_key is not None
                             else "none", why))

    def close(self):
        self._env.close()


def _check_lmdb_size(data_path):
    """InputError when ``data_path`` is shorter than its meta page says.

    LMDB memory-maps the file and trusts its meta page: reading a page past the end of a
    truncated file (a copy cut short, a full disk) is a SIGBUS that kills the process,
    not an error Python could catch. The meta page (64-bit layout: magic at byte 16,
    page size at 40, last page number at 136, transaction id at 144; two copies, pages 0
    and 1, the newer one current) tells how long the file must be.
    """
    import struct
    try:
        size = os.path.getsize(data_path)
        with open(data_path, "rb") as f:
            head = f.read(160)
            if len(head) < 160 or head[16:20] != _LMDB_MAGIC:
                return  # not this layout: let LMDB itself judge the file
            psize = struct.unpack_from("<I", head, 40)[0]
            metas = [struct.unpack_from("<QQ", head, 136)]
            if 4096 <= psize <= 65536 and size >= psize + 160:
                f.seek(psize)
                second = f.read(160)
                if second[16:20] == _LMDB_MAGIC:
                    metas.append(struct.unpack_from("<QQ", second, 136))
    except OSError as exc:
        raise InputError("%s: cannot read: %s" % (data_path, exc.strerror or exc)) from None
    last_page, _ = max(metas, key=lambda meta: meta[1])
    needed = (last_page + 1) * psize
    if size < needed:
        raise InputError("%s: truncated LMDB: the file has %d bytes, its meta page says %d (%d pages "
                         "of %d bytes); the copy was cut short" % (data_path, size, needed,
                                                                  last_page + 1, psize))


def _lmdb_message(exc):
    return str(exc).strip() or type(exc).__name__


class LevelDBDatabase(Database):
    backend = "leveldb"

    def __init__(self, path):
        super().__init__(path)
        try:
            import plyvel
        except ImportError as exc:
            raise InputError("%s: reading LevelDB needs the 'plyvel' package (%s); pip install 'safe_layers[tools]'"
                             % (path, exc)) from None
        self._plyvel = plyvel
        self._shadow = _shadow_directory(self.path)
        try:
            self._db = plyvel.DB(self._shadow, create_if_missing=False, paranoid_checks=True)
        except (plyvel.Error, OSError) as exc:
            shutil.rmtree(self._shadow, ignore_errors=True)
            raise InputError("%s: not a readable LevelDB: %s%s" % (
                self.path, self._message(exc), _held_note(self.path))) from None

    def records(self, limit=None):
        position = 0
        last_key = None
        try:
            with self._db.iterator(fill_cache=False, verify_checksums=True) as iterator:
                for key, value in iterator:
                    if limit is not None and position >= limit:
                        return
                    yield Record(position, key, value)
                    last_key = key
                    position += 1
        except (self._plyvel.Error, OSError) as exc:
            raise InputError("%s: LevelDB corrupt after %d records (last good key %s): %s%s"
                             % (self.path, position, key_text(last_key) if last_key is not None
                                else "none", self._message(exc), _held_note(self.path))) from None

    def _message(self, exc):
        """LevelDB's error with the private folder it was opened through named as the
        source (the user knows no other)."""
        return _leveldb_message(exc).replace(self._shadow, os.path.abspath(self.path))

    def close(self):
        try:
            self._db.close()
        finally:
            shutil.rmtree(self._shadow, ignore_errors=True)


def _leveldb_message(exc):
    return str(exc).strip() or type(exc).__name__


def _held_note(path):
    """'; ...' when another process holds the LevelDB's LOCK (it has the database open,
    and may be writing it: what looks corrupt may be a file it is replacing), else ''."""
    lock = os.path.join(path, "LOCK")
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        # F_GETLK asks who holds a write lock without taking one (LevelDB locks LOCK
        # with fcntl); struct flock: l_type, l_whence, l_start, l_len, l_pid.
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        kind, _, _, _, pid = struct.unpack("hhqqi4x", answer)
    except OSError:
        return ""
    finally:
        os.close(fd)
    if kind == fcntl.F_UNLCK:
        return ""
    return ("; process %d has this LevelDB open (its LOCK is held) and may be writing it: scan "
            "it again once that process has closed it" % pid)


def _shadow_directory(path):
    """A private directory holding a symbolic link to each file of the LevelDB at
    ``path`` (LOCK and LOG excepted: those LevelDB creates afresh; and every file
    numbered at or past the next file number its MANIFEST has logged, see
    :mod:`.leveldb_files`).

    LevelDB opens every existing file read-only; what it writes (its lock, info log, a
    new manifest and journal, compaction output) it creates as new files, under numbers
    from that counter, which no link bears, and what it retires it unlinks — the link,
    never the source file.
    """
    try:
        names = os.listdir(path)
    except OSError as exc:
        raise InputError("%s: cannot list the LevelDB directory: %s" % (path, exc.strerror)) from None
    if "CURRENT" not in names:
        raise InputError("%s: not a LevelDB (no CURRENT file)" % path)
    # LevelDB's own open reads the counter later, never smaller: no name it creates is a
    # link made here.
    unaccounted = leveldb_files.next_file_number(path)
    shadow = scratch.make("leveldb")
    source = os.path.abspath(path)
    for name in names:
        number = leveldb_files.file_number(name)
        if name in ("LOCK", "LOG", "LOG.old") or (number is not None and number >= unaccounted):
            continue
        os.symlink(os.path.join(source, name), os.path.join(shadow, name))
    return shadow


def open_database(path, backend="auto"):
    """An open :class:`Database` (LMDB or LevelDB) at ``path``; ``backend`` 'lmdb',
    'leveldb' or 'auto' (from what is on disk)."""
    path = str(path)
    if backend == "auto":
        backend = detect_backend(path)
    if backend == "lmdb":
        if not os.path.exists(path):
            raise InputError("%s: no such LMDB" % path)
        return LMDBDatabase(path)
    if backend == "leveldb":
        if not os.path.isdir(path):
            raise InputError("%s: no such LevelDB directory" % path)
        return LevelDBDatabase(path)
    raise InputError("%s: a %s source is not a key-value database of Datums" % (path, backend))


# ---------------------------------------------------------------------------------------
# Datums.

class DatumError(ValueError):
    """A value that is not a Datum, or a Datum whose arrays cannot be read."""


def parse_datum(value):
    """``value`` (bytes) parsed as a ``caffe_pb2.Datum``; DatumError when it is not one."""
    from google.protobuf.message import DecodeError
    datum = caffe_pb2().Datum()
    try:
        datum.ParseFromString(value)
    except DecodeError as exc:
        raise DatumError("not a Datum (protobuf: %s)" % exc) from None
    return datum


def datum_shape(datum):
    """(channels, height, width) as the Datum declares them."""
    return (datum.channels, datum.height, datum.width)


def datum_array(datum):
    """The Datum's values as an array shaped (C, H, W): uint8 from ``data`` when it is
    non-empty (as Caffe's transformer prefers it), else float32 from ``float_data``.

    ``caffe.io.datum_to_array`` uses ``np.fromstring``, which NumPy 2 removed; this reads
    the bytes with ``np.frombuffer`` (no copy for ``data``). Raises DatumError when the
    number of values is not C*H*W, or for an encoded Datum (see :func:`decode_image`).
    """
    import numpy
    if datum.encoded:
        raise DatumError("encoded Datum: decode its image with decode_image()")
    shape = datum_shape(datum)
    expected = shape[0] * shape[1] * shape[2]
    if len(datum.data):
        array = numpy.frombuffer(datum.data, numpy.uint8)
        source = "data"
    else:
        array = numpy.asarray(datum.float_data, dtype=numpy.float32)
        source = "float_data"
    if array.size != expected:
        raise DatumError("%s holds %d values, channels x height x width = %dx%dx%d = %d"
                         % (source, array.size, shape[0], shape[1], shape[2], expected))
    return array.reshape(shape)


def image_library():
    """The module that decodes encoded Datums here (PIL), or None."""
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def decode_image(datum):
    """An encoded Datum's image as a (C, H, W) uint8 array (C 1 or 3), decoded with PIL.
    Returns None when no image library is installed; DatumError when the bytes do not
    decode. Caffe itself decodes with OpenCV (BGR); only shapes and values are compared
    here, so the channel order does not matter."""
    import io
    import numpy
    image_module = image_library()
    if image_module is None:
        return None
    try:
        with image_module.open(io.BytesIO(datum.data)) as image:
            image.load()
            if image.mode not in ("L", "RGB"):
                image = image.convert("RGB")
            array = numpy.asarray(image)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
        # PIL names the in-memory file it read (<_io.BytesIO object at 0x...>): noise here.
        text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
        raise DatumError("encoded image does not decode (%s: %s)" % (type(exc).__name__, text)) from None
    if array.ndim == 2:
        return array[numpy.newaxis]
    return array.transpose(2, 0, 1)


def first_datum_shape(path, backend="auto"):
    """(C, H, W) of the first record of an LMDB/LevelDB, as Caffe's Data layer shapes its
    top from it (an encoded record: its decoded image's shape). InputError when the
    database is empty, unreadable, or its first record is not a readable Datum."""
    with open_database(path, backend) as db:
        record = db.first()
    if record is None:
        raise InputError("%s: the database is empty" % path)
    try:
        datum = parse_datum(record.value)
        if datum.encoded:
            image = decode_image(datum)
            if image is None:
                raise InputError("%s: the first record (%s) is an encoded image and no image "
                                 "library (Pillow) is installed to decode it" % (path, record.key_text))
            return tuple(int(d) for d in image.shape)
        return tuple(int(d) for d in datum_array(datum).shape)
    except DatumError as exc:
        raise InputError("%s: the first record (%s): %s" % (path, record.key_text, exc)) from None


# ---------------------------------------------------------------------------------------
# HDF5, as HDF5Data reads it.

def hdf5_list(list_path):
    """[(line, path)] of the files an HDF5Data ``source`` list names.

    Caffe reads the list with ``source_file >> line``: whitespace-separated tokens, so a
    path with a space in it becomes two paths. Paths are returned as written; resolve
    them with :func:`safe_layers.readers.prototxt.resolve_reference` (Caffe opens them
    relative to the working directory). InputError when the list cannot be read.
    """
    try:
        with open(list_path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise InputError("%s: no such HDF5 list file" % list_path) from None
    except OSError as exc:
        raise InputError("%s: cannot read: %s" % (list_path, exc.strerror or exc)) from None
    if raw.startswith(b"\x89HDF"):
        raise InputError("%s: an HDF5 file, not the text list of .h5 files HDF5Data's source names"
                         % list_path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError("%s: not a text list of .h5 files (byte %d is not UTF-8)"
                         % (list_path, exc.start)) from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        entries.extend((number, token) for token in line.split())
    return entries


class HDF5File:
    """One ``.h5`` file opened read-only, its datasets read as HDF5Data reads them.

    HDF5Data loads each dataset named by a top (FLOAT or INTEGER class only) and converts
    it to float32; :meth:`rows` yields the same values in row chunks of at most
    ``chunk_bytes``, so a file larger than memory is scanned too.
    """

    def __init__(self, path):
        self.path = str(path)
        try:
            import h5py
        except ImportError as exc:
            raise InputError("%s: reading HDF5 needs the 'h5py' package (%s); pip install 'safe_layers[tools]'"
                             % (path, exc)) from None
        try:
            self._file = h5py.File(self.path, "r")
        except FileNotFoundError:
            raise InputError("%s: no such HDF5 file" % self.path) from None
        except OSError as exc:
            raise InputError("%s: not a readable HDF5 file: %s" % (self.path, exc)) from None

    def names(self):
        """Dataset names at the file's top level (HDF5Data looks names up there)."""
        import h5py
        return [name for name, item in self._file.items() if isinstance(item, h5py.Dataset)]

    def has(self, name):
        import h5py
        return isinstance(self._file.get(name), h5py.Dataset)

    def shape(self, name):
        return tuple(int(d) for d in self._file[name].shape)

    def kind(self, name):
        """'float', 'integer' or another numpy dtype kind name (which HDF5Data rejects)."""
        dtype = self._file[name].dtype
        return {"f": "float", "i": "integer", "u": "integer"}.get(dtype.kind, str(dtype))

    def rows(self, name, chunk_bytes=32 << 20):
        """Yield (first_row, block) over the dataset's dimension 0, each block at most
        ``chunk_bytes`` (at least one row), in the file's own dtype; HDF5Data converts
        the values to float32 (``numpy.asarray(block, numpy.float32)`` gives what it sees)."""
        import numpy
        dataset = self._file[name]
        if dataset.ndim == 0:
            yield 0, numpy.asarray(dataset[()]).reshape(1)
            return
        row_bytes = max(1, int(numpy.prod(dataset.shape[1:], dtype=numpy.int64)) * dataset.dtype.itemsize)
        step = max(1, chunk_bytes // row_bytes)
        start = 0
        try:
            for start in range(0, dataset.shape[0], step):
                yield start, dataset[start:start + step]
        except OSError as exc:
            raise InputError("%s: dataset '%s' unreadable near row %d: %s"
                             % (self.path, name, start, exc)) from None

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def hdf5_first_shapes(list_path, tops):
    """{top: shape} of the datasets the first file of an HDF5Data list holds: the shapes
    Caffe's HDF5Data gives its tops (batch dimension = the file's dim 0)."""
    entries = hdf5_list(list_path)
    if not entries:
        raise InputError("%s: the HDF5 list names no file" % list_path)
    line, name = entries[0]
    path, note = resolve_reference(name, list_path)
    if note == "does not exist":
        raise InputError("%s:%d: %s does not exist" % (list_path, line, name))
    with HDF5File(path) as h5:
        missing = [top for top in tops if not h5.has(top)]
        if missing:
            raise InputError("%s: no dataset named %s (it has: %s)"
                             % (path, ", ".join(missing), ", ".join(h5.names()) or "none"))
        return {top: h5.shape(top) for top in tops}
