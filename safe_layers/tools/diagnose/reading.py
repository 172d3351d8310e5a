"""A log file read into a :class:`~safe_layers.tools.diagnose.diagnosis.Diagnosis`:
plain, gzipped or standard input, in one streaming pass, the last of several runs."""

import os
import sys
import zlib

from safe_layers.core.errors import InputError
from safe_layers.readers.caffe_log import LogReader
from safe_layers.tools.diagnose.diagnosis import Diagnosis


def report_parser():
    """The parser of our layers' (and a watch's) report lines, from the module that
    writes them."""
    # Deferred: safe_layers.reporting (the layers' runtime: kernels, the live layer
    # registry) is kept out of `safe-layers --help`.
    from safe_layers import reporting
    return reporting.parse_line


def open_log(path):
    """A binary handle on the log at ``path`` ('-': standard input), gunzipped as it
    streams when gzipped (InputError when it cannot be read)."""
    if path == "-":
        handle = os.fdopen(os.dup(sys.stdin.fileno()), "rb")  # `... | safe-layers diagnose -`
    else:
        if os.path.isdir(path):
            raise InputError("%s: is a directory, not a log" % path)
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            raise InputError("%s: no such file" % path) from None
        except OSError as exc:
            raise InputError("%s: cannot read: %s" % (path, exc.strerror or exc)) from None
    if handle.peek(2)[:2] == b"\x1f\x8b" if hasattr(handle, "peek") else False:
        import gzip
        handle = gzip.GzipFile(fileobj=handle)  # a rotated train.log.gz, read as it streams
    return handle


def read_log(path):
    """A :class:`Diagnosis` of the log at ``path`` (InputError when unreadable)."""
    handle = open_log(path)
    diagnosis = Diagnosis(path)
    earlier_runs = []  # first lines of the runs before the one diagnosed
    reader = LogReader(handle, report_parser())
    with handle:
        try:
            for event in reader:
                if event.kind == "solver" and diagnosis.iteration is not None:
                    # A second "Initializing solver" after training lines: another run
                    # appended to the same file (people do `caffe train ... 2>> train.log`).
                    # Each run's cause, settings and records are its own: the last is read.
                    earlier_runs.append(diagnosis.run_start)
                    diagnosis = Diagnosis(path)
                    diagnosis.run_start = event.line
                diagnosis.feed(event)
        except OSError as exc:  # gzip.BadGzipFile is one
            raise InputError("%s: read error after line %d: %s" % (path, reader.lines, exc)) from None
        except (EOFError, zlib.error) as exc:
            raise InputError("%s: the gzip stream is cut short or corrupt after line %d (%s); "
                             "`zcat` what is there into a file and diagnose that"
                             % (path, reader.lines, exc)) from None
    diagnosis.finish(reader.lines)
    if reader.lines == 0 and diagnosis.incomplete is None:
        raise InputError("%s: empty log" % path)
    if reader.glog_lines == 0 and reader.events == 0:
        raise InputError("%s: not a Caffe log: none of its %d lines is a glog line or a line Caffe's "
                         "solver writes" % (path, max(reader.lines, 1)))
    diagnosis.earlier_runs = earlier_runs
    return diagnosis
