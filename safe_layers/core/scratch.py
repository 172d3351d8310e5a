"""The tool's own temporary folders: named with the process that made them, so that a
folder a killed process (``kill -9``, an OOM kill) could not remove is found and removed
by the next one.

    with scratch.folder("train") as path:     # /tmp/safe-layers-train-<pid>-XXXXXX
        ...
"""

import contextlib
import os
import re
import shutil
import tempfile

_NAME = re.compile(r"^safe-layers-(?P<kind>[a-z]+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def make(kind):
    """A new private folder ``safe-layers-<kind>-<pid>-XXXXXX`` in the temporary
    directory (the caller removes it); stale ones of dead processes are swept first."""
    sweep()
    return tempfile.mkdtemp(prefix="safe-layers-%s-%d-" % (kind, os.getpid()))


@contextlib.contextmanager
def folder(kind):
    """:func:`make`, removed at the end of the ``with`` block whatever happens."""
    path = make(kind)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def sweep(directory=None):
    """Remove this tool's folders whose process is gone (and which this user owns);
    returns the paths removed. A folder of a live process is never touched."""
    directory = directory or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _NAME.match(name)
        if match is None or _alive(int(match.group("pid"))):
            continue
        path = os.path.join(directory, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if not os.path.isdir(path) or os.path.islink(path) or info.st_uid != os.getuid():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
