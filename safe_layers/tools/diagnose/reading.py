"""A log file read into a :class:`~safe_layers.tools.diagnose.diagnosis.Diagnosis`:
plain, gzipped or standard input, in one streaming pass, the last of several runs."""

import os
import sys
import zlib

from safe_layers import reporting
from safe_layers.core.errors import InputError
from safe_layers.readers.caffe_log import LogReader
from safe_layers.tools.diagnose.csv_tables import ParseLogTables
from safe_layers.tools.diagnose.diagnosis import Diagnosis
from safe_layers.tools.diagnose.series import RunStarts
from safe_layers.tools.diagnose.timeline import LogClock, Timeline, log_year


# The events the timeline and parse_log.py's tables read (the bulk of a debug_info log,
# forward / backward, is none of them).
TIMED = frozenset(("solving", "policy", "loss", "lr", "testing", "multistep", "output"))


def report_parser():
    """The parser of our layers' (and a watch's) report lines, from the module that
    writes them."""
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
        handle = Gunzip(handle)  # a rotated train.log.gz, read as it streams
    return handle


class Gunzip:
    """A gzip stream decompressed as it is read that keeps what came before a cut: at
    a stream cut short (a log rotated while written, a copy interrupted) or corrupt,
    reading ends there with ``problem`` saying what and at which compressed byte (the
    standard ``gzip`` module raises and the decompressed data of that read is lost).
    Concatenated members (``cat a.gz b.gz``) are read one after the other."""

    CHUNK = 1 << 20

    def __init__(self, raw):
        self.raw = raw
        self.offset = 0          # compressed bytes consumed
        self.problem = None
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def read(self, size=-1):
        while self.problem is None:
            compressed = self.raw.read(self.CHUNK)
            if not compressed:
                if not self._inflate.eof:
                    self.problem = "the gzip stream is cut short at byte %d" % self.offset
                return b""
            self.offset += len(compressed)
            try:
                data = self._inflate.decompress(compressed)
            except zlib.error as exc:
                self.problem = "the gzip stream is corrupt near byte %d (%s)" % (self.offset, exc)
                return b""
            while self._inflate.eof and self._inflate.unused_data:
                rest = self._inflate.unused_data
                self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                try:
                    data += self._inflate.decompress(rest)
                except zlib.error as exc:
                    self.problem = "the gzip stream is corrupt near byte %d (%s)" % (self.offset, exc)
                    return data
            if data:
                return data
        return b""

    def close(self):
        self.raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_log(path, tables=False):
    """A :class:`Diagnosis` of the log at ``path`` (InputError when unreadable), with its
    ``timeline`` (seconds, test outputs) and, with ``tables``, ``tables``: parse_log.py's
    train and test tables of the whole file (:class:`ParseLogTables`)."""
    handle = open_log(path)
    diagnosis = Diagnosis(path)
    earlier_runs = RunStarts()  # first lines of the runs before the one diagnosed
    reader = LogReader(handle, report_parser())
    clock = LogClock(log_year(path))
    timeline = Timeline(clock)
    whole = ParseLogTables(clock) if tables else None
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
                    timeline = Timeline(clock)
                diagnosis.feed(event)
                if event.kind in TIMED:
                    timeline.feed(event)
                    if whole is not None:
                        whole.feed(event)
        except OSError as exc:
            raise InputError("%s: read error after line %d: %s" % (path, reader.lines, exc)) from None
    problem = getattr(handle, "problem", None)
    if problem is not None:
        if reader.lines == 0:
            raise InputError("%s: %s, before its first line" % (path, problem))
        # What was read is diagnosed; where it ends is said once, on stderr.
        sys.stderr.write("safe-layers diagnose: warning: %s: %s, after line %d: diagnosed "
                         "the %d lines before it\n" % (path, problem, reader.lines, reader.lines))
    diagnosis.finish(reader.lines)
    if reader.lines == 0 and diagnosis.incomplete is None:
        raise InputError("%s: empty log" % path)
    if reader.glog_lines == 0 and reader.events == 0:
        raise InputError("%s: not a Caffe log: none of its %d lines is a glog line or a line Caffe's "
                         "solver writes" % (path, max(reader.lines, 1)))
    diagnosis.earlier_runs = earlier_runs
    timeline.finish()
    diagnosis.timeline = timeline
    diagnosis.tables = whole
    return diagnosis
