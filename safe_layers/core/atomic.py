"""Every file safe_layers writes, written one way: whole or not at all, never through a
symbolic link, never over anything that is not a plain file.

Two kinds of file, two functions:

* an **output the user named** (``harden -o``, ``--plot``, ``--events``):
  :func:`replace_file` writes a temporary file from ``mkstemp`` beside it, flushes it to
  disk and renames it over the name, which must be absent or a regular file. A device or
  a FIFO named as the output (``/dev/null``, ``/dev/stdout``, a pipe) is written into,
  never replaced; a symbolic link to a file, or a folder, is refused.
* a **record of ours** (flight records, a watch's fault records): written into
  :func:`temporary` files, then :func:`publish` links them into place under the first free
  name (``stem``, ``stem-2``, ...): an existing file is never overwritten and a planted
  link is never followed.

Errors are :class:`OSError` with ``filename`` set (the CLI prints the file and the reason
and exits 2); a refusal is an :class:`UnsafeOutput`.
"""

import errno
import os
import stat
import tempfile

# Names tried by publish() before it gives up: a folder with 1000 records of one stem is
# a folder to clean, not to fill.
MAX_SUFFIX = 1000


class UnsafeOutput(OSError):
    """An output name that cannot be written without harm (a link, a folder, a FIFO that
    no one reads); ``strerror`` says why and what to do."""


def _lstat(path):
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _umask():
    # os.umask is the only way to read it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _own_descriptor(path):
    """N when ``path`` names this process's open descriptor N (``/dev/stdout`` is a link
    to ``/proc/self/fd/1``; ``/dev/fd/N``), else None."""
    for name in (path, os.readlink(path) if os.path.islink(path) else ""):
        for prefix in ("/proc/self/fd/", "/dev/fd/"):
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                return int(name[len(prefix):])
    return None


def output_kind(path):
    """What writing ``path`` would meet: 'new', 'file' (a regular file, replaced),
    'descriptor' (``/dev/stdout``, ``/dev/fd/N``: written to that open descriptor, where
    the shell's redirection points), 'device' (a device, FIFO or socket: written into) or
    raises :class:`UnsafeOutput` (a link to a file or to nothing, a folder)."""
    path = os.fspath(path)
    if _own_descriptor(path) is not None:
        return "descriptor"
    st = _lstat(path)
    if st is None:
        return "new"
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        raise UnsafeOutput(errno.EISDIR, "it is a folder", path)
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.stat(path)
        except OSError:
            target = None
        # /dev/stdout is a link to the process's own descriptor: writing into what it
        # reaches replaces nothing. A link to a file would be written through.
        if target is not None and not stat.S_ISREG(target.st_mode) and not stat.S_ISDIR(target.st_mode):
            return "device"
        raise UnsafeOutput(errno.ELOOP, "it is a symbolic link (to %s); name the file itself, or "
                           "another name" % os.readlink(path), path)
    return "device"


def check_output(path):
    """Raise :class:`UnsafeOutput` or :class:`OSError` (naming ``path``) unless
    :func:`replace_file` could write it; called before any work, so a bad name costs
    nothing. Returns :func:`output_kind`."""
    path = os.fspath(path)
    kind = output_kind(path)
    if kind in ("device", "descriptor"):
        return kind
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UnsafeOutput(errno.ENOENT, "folder %s does not exist" % folder, path)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UnsafeOutput(errno.EACCES, "folder %s is not writable" % folder, path)
    return kind


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_into(path, data):
    """Write ``data`` into a device or FIFO (opened without creating or truncating)."""
    try:
        # O_NONBLOCK: a FIFO with no reader fails at once (ENXIO) instead of hanging.
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise UnsafeOutput(errno.ENXIO, "it is a FIFO that no process is reading", path) from None
        raise
    try:
        os.set_blocking(fd, True)
        _write_all(fd, data)
    except OSError as exc:
        exc.filename = exc.filename or path
        raise
    finally:
        os.close(fd)


def replace_file(path, data):
    """Write ``data`` (bytes, or str as UTF-8 exactly as given) to ``path``: whole or not
    at all, keeping the mode of the file it replaces (a new file gets the umask's)."""
    path = os.fspath(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    kind = output_kind(path)
    if kind == "descriptor":
        # The descriptor itself, so that its offset is shared with the shell's `>`/`>>`.
        try:
            _write_all(_own_descriptor(path), data)
        except OSError as exc:
            exc.filename = exc.filename or path
            raise
        return path
    if kind == "device":
        _write_into(path, data)
        return path
    folder = os.path.dirname(os.path.abspath(path))
    mode = os.lstat(path).st_mode & 0o7777 if kind == "file" else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        # Looked at again just before: whatever was put there meanwhile must still be a
        # regular file (or nothing) to be replaced.
        if output_kind(path) not in ("new", "file"):
            raise UnsafeOutput(errno.EEXIST, "changed into something that is not a file while "
                               "it was being written", path)
        os.replace(tmp, path)
    except BaseException as exc:
        _unlink_quietly(tmp)
        if isinstance(exc, OSError) and not exc.filename:
            exc.filename = path
        raise
    return path


def temporary(folder):
    """A new empty file in ``folder`` with an unguessable name and the umask's mode
    (``mkstemp`` makes 0600; records are for the team reading the run). The caller
    writes it, then :func:`publish`\\ es or removes it."""
    fd, path = tempfile.mkstemp(dir=folder, prefix=".safe_layers-", suffix=".tmp")
    os.close(fd)
    os.chmod(path, 0o666 & ~_umask())
    return path


def sync(path):
    """Flush a written file to disk (a record that a crash cuts short must not be
    published with a hole in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stems(stem):
    """The names :func:`publish` tries: ``stem``, ``stem-2``, ``stem-3``, ..."""
    yield stem
    for attempt in range(2, MAX_SUFFIX):
        yield "%s-%d" % (stem, attempt)


def publish(folder, stem, parts):
    """Link the temporary files ``parts`` ({suffix: temporary path}) into ``folder`` as
    ``stem + suffix`` each, under the first of :func:`stems` free for all of them. Never
    overwrites, never follows a link. Returns {suffix: final path}."""
    for name in stems(stem):
        try:
            return publish_exactly(folder, name, parts)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free file name for %r" % stem, folder)


def publish_exactly(folder, name, parts):
    """:func:`publish` under ``name`` alone: FileExistsError (nothing published) when any
    of its files is there (for a record whose files name each other)."""
    finals = {suffix: os.path.join(folder, name + suffix) for suffix in parts}
    try:
        return _link_all(parts, finals)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
    # A file system without hard links: rename is atomic too but replaces what is there,
    # so look first (racy only against another writer choosing this very name at once).
    if any(os.path.lexists(p) for p in finals.values()):
        raise FileExistsError(errno.EEXIST, "taken", folder)
    for suffix, final in finals.items():
        os.rename(parts[suffix], final)
    return finals


def _link_all(parts, finals):
    done = []
    try:
        for suffix, final in finals.items():
            os.link(parts[suffix], final)  # atomic, and fails instead of overwriting
            done.append(final)
    except BaseException:
        for final in done:
            _unlink_quietly(final)
        raise
    for path in parts.values():
        _unlink_quietly(path)
    return finals


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass
