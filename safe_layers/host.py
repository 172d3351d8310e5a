"""What kind of process the layers run in: a Python interpreter, or the `caffe` binary."""

import functools
import os


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
