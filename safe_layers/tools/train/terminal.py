"""What `safe-layers train` prints, and the training process it supervises.

The terminal is this process's alone: it draws the progress bar (and the status line
while the run starts), and every line that reaches stderr while the bar is up, its own
and the training process's (Caffe's glog lines, written by Caffe's C++ straight to the
process's stderr, and ours), is printed through tqdm's ``write``, which takes the bar
off its line first and draws it again below. The training process draws nothing: it
says where it is on a pipe of its own (``ready``, ``start I MAX``, ``iter N LOSS
SKIPPED``, ``end``), and its stderr comes here whole lines at a time.

Our lines have glog's severities (0 INFO, 1 WARNING, 2 ERROR) and are printed from
``GLOG_minloglevel`` up, as Caffe prints its own (glog's ``FLAGS_minloglevel``, read
from that variable); ``-q`` prints ERROR only.
"""

import os
import selectors
import signal
import subprocess
import sys

INFO, WARNING, ERROR = 0, 1, 2
# The signals a training process takes as -sigint_effect / -sighup_effect: held until it
# says it has its handlers (Python's own would print a KeyboardInterrupt traceback).
HELD = (signal.SIGINT, signal.SIGHUP)


def minloglevel(quiet, environ=None):
    """The least severity of our lines that is printed: ERROR with -q, else glog's
    GLOG_minloglevel (as glog reads it: a number, 0 when unset or not one)."""
    if quiet:
        return ERROR
    value = (os.environ if environ is None else environ).get("GLOG_minloglevel", "")
    try:
        return max(0, int(value))
    except ValueError:
        return INFO


class Terminal:
    """stderr for `safe-layers train`: lines at or above ``level``; with ``bar``, a
    status line while the run starts and tqdm's bar while it trains, every line printed
    above them."""

    def __init__(self, bar, level, stream=None):
        self.stream = stream or sys.stderr
        self.level = level
        self.wants_bar = bar
        self.bar = None        # the tqdm showing: the status line or the progress bar
        self.progressing = False

    def status(self, text):
        """A transient line saying what the run is doing ("linting ..."); only with a bar."""
        if not self.wants_bar:
            return
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=None, file=self.stream, bar_format="{desc}", leave=False,
                            dynamic_ncols=True)
        self.bar.set_description_str("safe-layers train: " + text)

    def line(self, text, level=INFO):
        """One of our lines, printed when its severity is at least the level."""
        if level >= self.level:
            self.write(text)

    def write(self, text):
        """One line (no newline), above the bar when it is showing."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def progress(self, message):
        """A message of the training process's progress pipe."""
        kind, _, rest = message.partition(" ")
        if not self.wants_bar:
            return
        if kind == "start":
            initial, total = (int(v) for v in rest.split())
            self.close()
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, file=self.stream, unit="iter",
                            dynamic_ncols=True, leave=False)
            self.progressing = True
        elif kind == "iter" and self.progressing:
            n, loss, skipped = rest.split()
            self.bar.n = int(n)
            self.bar.set_postfix(loss="%.4g" % float(loss), skipped=int(skipped), refresh=False)
            self.bar.refresh()
        elif kind == "end":
            self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.progressing = False


def supervise(command, terminal, early=None, env=None):
    """Run the training process ``command`` (to which a progress pipe's fd is appended);
    print its stderr through ``terminal`` and keep its last lines; forward
    SIGINT/SIGHUP/SIGTERM to it once each time (SIGINT/SIGHUP, and a stop ``early``
    noted before, once it has its handlers). Returns (returncode, tail)."""
    progress_read, progress_write = os.pipe()
    # Its own process group, so that a Ctrl-C at the terminal reaches it only through
    # this process (forwarded below); Popen's process_group is Python 3.11's.
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    # A Ctrl-C sent to the terminal's process group while the child is forked but not yet
    # in its own group would reach it with SIGINT's default action (CPython's vfork path
    # resets handlers before setpgid) and kill it. Blocked here, the signals are blocked
    # in the child too (the mask survives fork and exec) until it has its handlers
    # (child.Signals unblocks them); this process gets them as soon as Popen returns.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        child = subprocess.Popen(command + [str(progress_write)], stderr=subprocess.PIPE,
                                 pass_fds=(progress_write,), env=env, **group)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(progress_write)
    held, ready = [], [False]

    def send(number):
        try:
            child.send_signal(number)
        except ProcessLookupError:
            pass

    def forward(number, frame):
        if number in HELD and not ready[0]:
            held.append(number)
        else:
            send(number)

    forwarded = {number: signal.signal(number, forward)
                 for number in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)}
    if early is not None and early.stop is not None:
        held.append(early.number)
    try:
        tail = _pass_through(child, progress_read, terminal, held, ready, send)
        child.wait()
    finally:
        for number, handler in forwarded.items():
            signal.signal(number, handler)
        os.close(progress_read)
        terminal.close()
    return child.returncode, tail


def _pass_through(child, progress_read, terminal, held, ready, send):
    """Read the training process's stderr and progress pipe to their ends: its stderr
    printed through ``terminal`` line by line, its progress drawn; on ``ready``, the
    signals ``held`` are sent. Returns its last 200 stderr lines."""
    selector = selectors.DefaultSelector()
    selector.register(child.stderr.fileno(), selectors.EVENT_READ, "stderr")
    selector.register(progress_read, selectors.EVENT_READ, "progress")
    tail, partial = [], {"stderr": b"", "progress": b""}
    raw = getattr(terminal.stream, "buffer", None)
    while selector.get_map():
        for key, _ in selector.select():
            chunk = os.read(key.fd, 65536)
            if not chunk:
                selector.unregister(key.fd)
                lines = [partial[key.data]] if partial[key.data] else []
            else:
                lines = (partial[key.data] + chunk).split(b"\n")
                partial[key.data] = lines.pop()
            if key.data == "progress":
                for line in lines:
                    message = line.decode("ascii", "replace")
                    if message == "ready":
                        ready[0] = True
                        while held:
                            send(held.pop(0))
                    else:
                        terminal.progress(message)
                continue
            for line in lines:
                text = line.decode("utf-8", "replace")
                tail = (tail + [text])[-200:]
                if terminal.bar is None and raw is not None:
                    raw.write(line + b"\n")  # bytes as they came: no bar to keep clear of
                    raw.flush()
                else:
                    terminal.write(text)
    return tail
