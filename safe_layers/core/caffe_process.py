"""What kind of process the layers run in: a Python interpreter, or the `caffe` binary,
and what its command line says (flags such as -gpu, and the iteration a -snapshot resumes at)."""

import functools
import os
import re
import sys


@functools.lru_cache(maxsize=None)
def caffe_cli_argv():
    """The command line of the `caffe` binary when this process is one, else None.

    Inside `caffe train` the layers run in an interpreter embedded in the caffe process;
    its command line is the only trace, visible from Python, of flags such as -gpu.
    """
    try:
        with open("/proc/self/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if argv and os.path.basename(argv[0]) in ("caffe", "caffe.bin"):
        return tuple(argv)  # cached: a process's command line does not change
    return None


def cli_flag(argv, name):
    """The value of gflags flag ``name`` in ``argv`` (``-name V``, ``--name V``,
    ``-name=V``, ``--name=V``; the last one wins, as in gflags), or None."""
    value = None
    args = list(argv or ())
    for i, arg in enumerate(args):
        for dashes in ("-", "--"):
            flag = dashes + name
            if arg == flag and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(flag + "="):
                value = arg[len(flag) + 1:]
    return value


_SNAPSHOT_NAME = re.compile(r"_iter_(\d+)\.solverstate(\.h5)?$")


def solverstate_iteration(path):
    """The iteration a Caffe ``.solverstate`` (binary proto) or ``.solverstate.h5`` was
    saved at: what ``Solver::Restore`` sets ``iter`` to. Raises ValueError when the file
    cannot say.

    A binary SolverState holds ``iter`` as field 1 (``caffe.proto``), and protobuf
    writes fields in number order, so its first bytes answer without reading the
    history blobs (or importing caffe). HDF5 states need h5py; without it
    the iteration in Caffe's file name (``<prefix>_iter_N.solverstate.h5``) is used.
    """
    if path.endswith(".h5"):
        try:
            import h5py
        except ImportError:
            match = _SNAPSHOT_NAME.search(path)
            if match:
                return int(match.group(1))
            raise ValueError("%s: an HDF5 solverstate, and h5py is not installed to read its "
                             "iteration" % path) from None
        with h5py.File(path, "r") as f:
            # Caffe's hdf5_save_int writes iter as a one-element dataset.
            value = f["iter"][()]
            return int(value.reshape(-1)[0] if hasattr(value, "reshape") else value)
    with open(path, "rb") as f:
        head = f.read(4096)
    pos = 0
    while pos < len(head):
        key, pos = _varint(head, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(head, pos)
            if field == 1:
                return value if value < 1 << 31 else value - (1 << 64)
        elif wire == 2:
            length, pos = _varint(head, pos)
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            break
        if field >= 1:
            break  # past field 1 without a varint iter
    raise ValueError("%s: no iteration in its first bytes; not a Caffe solverstate" % path)


def _varint(data, pos):
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


@functools.lru_cache(maxsize=None)
def resumed_iteration():
    """The iteration `caffe train -snapshot X.solverstate` resumed at (0 when this
    process is not the caffe binary, or it did not resume).

    A Python layer counts its own calls from 1 in every process; under the binary after
    a resume, the solver's iteration is this plus the calls so far.
    """
    argv = caffe_cli_argv()
    state = cli_flag(argv, "snapshot") if argv else None
    if not state:
        return 0
    try:
        return solverstate_iteration(state)
    except (OSError, ValueError) as exc:
        sys.stderr.write("safe_layers: cannot read the resume iteration from -snapshot %s (%s); "
                         "reports count iterations from 0\n" % (state, exc))
        return 0
