"""Caffe's ``Solver::Solve`` in Python, one ``solver.step(1)`` at a time, under a watch:
the training process of `safe-layers train` (run as a child of the CLI, so that a Caffe
``LOG(FATAL)`` kills this process and never the tool; see safe_layers/tools/train.py).

    python -m safe_layers.tools.train.child CONFIG.json [PROGRESS_FD]

The solver it builds is the user's with ``display``, ``test_interval`` and ``snapshot``
set to 0 (CONFIG.json keeps the real values): this loop displays, tests and snapshots
itself, so that a skipped iteration is not tested twice and no snapshot is written
before the watch has checked the weights of the update. It prints Caffe's lines with
Caffe's own source tags (``solver.cpp:239] Iteration N (...), loss = L``, ...), the
loss smoothed over ``average_loss`` as ``Solver::UpdateSmoothedLoss`` does, in float32,
and writes one JSON line per event to the event log as it goes. It draws no progress bar:
it says where it is on PROGRESS_FD (``ready`` once its signal handlers are set, then
``start``, ``iter`` and ``end``), and the CLI, which owns the terminal, draws the bar
(safe_layers/tools/train/terminal.py). Its glog-style lines below ``minloglevel`` (the
config's) are dropped, as glog drops Caffe's.

Exit status: 0 done (also when stopped by a signal, as `caffe train`), 1 stopped by a
fault (the report is the last event), 2 bad input.
"""

import datetime
import errno
import io
import json
import os
import re
import signal
import sys
import time

import numpy

from safe_layers.anomaly.checkpoint_files import free_bytes
from safe_layers.anomaly.checkpoints import snapshot_space
from safe_layers.anomaly.reports import NonFiniteError
from safe_layers.anomaly.watcher import Watch
from safe_layers.core import backend
from safe_layers.core.float_text import caffe_text, jsonable
from safe_layers.readers.prototxt import read_solver_param

EXIT_DONE, EXIT_FAULT, EXIT_INPUT = 0, 1, 2


class CaffeLog:
    """Lines in glog's layout with the source tag of the Caffe line they stand for, so
    parsers of `caffe train` logs read them (caffe-internals.md section 4); written to
    ``stream``, else to whatever sys.stderr is at the time (the level filter of main)."""

    def __init__(self, stream=None):
        self.stream = stream

    def __call__(self, where, text, severity="I"):
        now = datetime.datetime.now()
        line = "%s%s %s %5d %s] %s" % (severity, now.strftime("%Y%m%d"), now.strftime("%H:%M:%S.%f"),
                                       os.getpid(), where, text)
        stream = self.stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()


# A glog line's prefix: severity letter, date, time, thread id, source tag
# (logging.cc's LogMessage::Init); ours have tags such as "safe_layers]" or "solver.cpp:239]".
_GLOG_LINE = re.compile(r"([IWEF])\d{4}(?:\d{4})? \d\d:\d\d:\d\d\.\d{6} +\d+ \S+\] ")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}


class LevelFilter(io.TextIOBase):
    """sys.stderr of the training process: whole lines to ``stream``, except glog lines
    whose severity is below ``level`` (GLOG_minloglevel's scale, 0 INFO .. 3 FATAL). It
    sees our Python's lines only: Caffe's C++ writes to the file descriptor itself, and
    glog filters those."""

    def __init__(self, stream, level):
        super().__init__()
        self.stream = stream
        self.level = level
        self.partial = ""

    def write(self, text):
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        for line in lines:
            match = _GLOG_LINE.match(line)
            if match is None or _SEVERITY[match.group(1)] >= self.level:
                self.stream.write(line + "\n")
        return len(text)

    def flush(self):
        self.stream.flush()

    def close_partial(self):
        """Write what is left of an unfinished line (at exit)."""
        if self.partial:
            self.stream.write(self.partial)
            self.partial = ""
        self.stream.flush()

    def fileno(self):
        return self.stream.fileno()

    def isatty(self):
        return self.stream.isatty()

    @property
    def encoding(self):
        return self.stream.encoding


class Progress:
    """The progress pipe to the CLI (terminal.py reads it), or nothing without one."""

    def __init__(self, fd=None):
        self.file = os.fdopen(fd, "w", buffering=1) if fd is not None else None

    def send(self, message):
        if self.file is None:
            return
        try:
            self.file.write(message + "\n")
        except (OSError, ValueError):
            self.file = None  # the CLI is gone: training goes on, its stderr is the record


class EventLog:
    """The JSON-lines event log of this run, flushed line by line (a crash loses nothing
    before it), written to two files:

    * ``private``, in the tool's own working folder: what ``safe-layers train`` reads
      back at the end (the summary, the stop, this run's plot), whatever the user's path is;
    * ``path``, the user's: appended to, never truncated (a resumed run adds to the log of
      the run it resumes), and opened only once the solver is built (a run that fails
      before then touches nothing). It starts with a ``run`` record. A link, a FIFO no
      one reads, a full disk: said once on stderr, and training goes on.
    """

    def __init__(self, path, private):
        self.path = path
        self.lost = 0        # records that could not be written to the user's log
        self.file = None
        self.waiting = []    # records before the user's log is opened
        self.private = open(private, "a") if private else None

    def open(self, run_record):
        """Open the user's log (the solver is built) and write what came before."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW |
                         os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
            os.set_blocking(fd, True)
            self.file = os.fdopen(fd, "a")
        except OSError as exc:
            why = ("a FIFO that no process is reading" if exc.errno == errno.ENXIO else
                   "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or exc)
            self._failed(why)
            self.waiting = None
            return
        waiting, self.waiting = self.waiting, None
        for record in [run_record] + waiting:
            self._to_user(record)

    def write(self, record):
        """Append one record; a failure to write (a full disk) is said once, on stderr, and
        training goes on: the event log never kills a run."""
        line = json.dumps(jsonable(record), sort_keys=True) + "\n"
        if self.private is not None:
            self.private.write(line)
            self.private.flush()
        if self.waiting is not None:
            self.waiting.append(record)
        else:
            self._to_user(record, line)

    def _to_user(self, record, line=None):
        if self.file is None:
            self.lost += 1
            return
        try:
            self.file.write(line or json.dumps(jsonable(record), sort_keys=True) + "\n")
            self.file.flush()
        except (OSError, ValueError) as exc:
            self.lost += 1
            if self.lost == 1:
                self._failed(getattr(exc, "strerror", None) or exc)

    def _failed(self, why):
        sys.stderr.write("safe-layers train: cannot write the event log %s (%s): training goes on; "
                         "the log lines on stderr are the record\n" % (self.path, why))

    def watch_listener(self, item):
        record = item.as_dict()
        record["event"] = "fault" if hasattr(item, "action") else "watch"
        self.write(record)


class Signals:
    """SIGINT / SIGHUP with `caffe train`'s -sigint_effect / -sighup_effect: 'stop'
    (after the current iteration, then the final snapshot), 'snapshot' or 'none'."""

    def __init__(self, sigint, sighup):
        self.effects = {signal.SIGINT: sigint, signal.SIGHUP: sighup}
        self.pending = []
        for number, effect in self.effects.items():
            signal.signal(number, signal.SIG_IGN if effect == "none" else self._handle)
        # Blocked since before this process existed (terminal.supervise): one sent in
        # the meantime is taken now, as the effect it asks for.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, list(self.effects))

    def _handle(self, number, frame):
        self.pending.append(self.effects[number])

    def take(self):
        actions, self.pending = self.pending, []
        return actions


class SmoothedLoss:
    """``Solver::UpdateSmoothedLoss``, in float32 like Caffe's Dtype."""

    def __init__(self, average_loss, start_iter):
        self.average_loss = average_loss
        self.start_iter = start_iter
        self.losses = []
        self.value = numpy.float32(0)

    def update(self, loss, iteration):
        loss = numpy.float32(loss)
        if len(self.losses) < self.average_loss:
            self.losses.append(loss)
            size = numpy.float32(len(self.losses))
            self.value = numpy.float32((self.value * (size - 1) + loss) / size)
        else:
            idx = (iteration - self.start_iter) % self.average_loss
            self.value = numpy.float32(self.value + (loss - self.losses[idx]) /
                                       numpy.float32(self.average_loss))
            self.losses[idx] = loss
        return float(self.value)


def _output_lines(net, label):
    """'    Train net output #k: name = v (* w = w·v loss)' for every output element."""
    weights = dict(zip(net._blob_names, net._blob_loss_weights))
    lines, values, k = [], {}, 0
    for name in net.outputs:
        data = net.blobs[name].data.reshape(-1)
        weight = numpy.float32(weights.get(name, 0))
        for v in data:
            v = numpy.float32(v)
            tail = (" (* %s = %s loss)" % (caffe_text(weight), caffe_text(weight * v))
                    if weight else "")
            lines.append("    %s net output #%d: %s = %s%s" % (label, k, name, caffe_text(v), tail))
            values.setdefault(name, []).append(float(v))
            k += 1
    return lines, values


class Trainer:
    def __init__(self, config, signals=None, progress=None):
        self.config = config
        self.events = EventLog(config["events"], config.get("private_events"))
        self.signals = signals
        self.progress = progress or Progress()
        self.log = CaffeLog()
        self.stop_requested = False
        self.snapshot_bytes = None  # the size of this run's last snapshot

    def run(self):
        cfg = self.config
        if self.signals is None:
            self.signals = Signals(cfg["sigint_effect"], cfg["sighup_effect"])
        import caffe  # the child's first import of Caffe: after its signal handlers are set
        real = cfg["real"]  # display, test_interval, snapshot of the user's solver
        self.events.write({"event": "building", "solver": cfg["solver_file"]})
        try:
            if cfg.get("gpu") is not None:
                self.log("caffe.cpp:204", "Using GPUs %d" % cfg["gpu"])
                backend.set_mode_gpu(cfg["gpu"])
            else:
                self.log("caffe.cpp:197", "Use CPU.")
                caffe.set_mode_cpu()
            solver = caffe.get_solver(cfg["solver"])
            param = read_solver_param(cfg["solver"])
            # Caffe printed the solver it was given; these fields of it are this tool's,
            # which displays, tests and snapshots itself (no snapshot before the watch has
            # checked the weights; a skipped iteration not tested twice).
            self.log("safe_layers", "display, test_interval, test_initialization and snapshot above "
                     "are safe-layers train's; %s's own: %s" % (cfg["solver_file"], ", ".join(
                         "%s: %s" % (k, str(real[k]).lower() if isinstance(real[k], bool) else real[k])
                         for k in ("display", "test_interval", "test_initialization", "snapshot"))))
            if cfg.get("snapshot"):
                self.log("caffe.cpp:235", "Resuming from %s" % cfg["snapshot"])
                solver.restore(cfg["snapshot"])
            self.watch = Watch(solver=solver, solver_param=param,
                               listener=self.events.watch_listener,
                               resumed_from=cfg.get("snapshot"), **cfg["watch"])
        except Exception as exc:  # noqa: BLE001 - a net or solver Caffe (or a layer) refused
            sys.stderr.write("safe-layers train: error: cannot build the solver %s: %s: %s\n"
                             % (cfg["solver_file"], type(exc).__name__, exc))
            return EXIT_INPUT
        self.solver, self.param = solver, param
        max_iter = param.max_iter
        start = int(solver.iter)
        self.events.open({"event": "run", "pid": os.getpid(), "solver": cfg["solver_file"],
                          "snapshot": cfg.get("snapshot"),
                          "time": datetime.datetime.now().isoformat(timespec="seconds")})
        self.events.write({"event": "start", "iteration": start, "max_iter": max_iter,
                           "net": cfg.get("net_name"), "lr_policy": param.lr_policy,
                           "watch": self.watch.options.as_dict()})
        self.progress.send("start %d %d" % (start, max_iter))
        self.log("caffe.cpp:239", "Starting Optimization")
        self.log("solver.cpp:289", "Solving %s" % cfg.get("net_name", ""))
        self.log("solver.cpp:290", "Learning Rate Policy: %s" % param.lr_policy)
        try:
            self._solve(real, start, max_iter)
        except NonFiniteError as exc:
            self.events.write({"event": "stopped", "iteration": int(solver.iter),
                               "report": exc.report.as_dict(), "line": exc.report.line()})
            self._close()
            return EXIT_FAULT
        except Exception as exc:  # noqa: BLE001 - e.g. a NaNGuard with action abort
            line = "%s: %s" % (type(exc).__name__, exc)
            self.events.write({"event": "stopped", "iteration": int(solver.iter), "line": line})
            self._close()
            import traceback
            traceback.print_exc()
            return EXIT_FAULT
        self._close()
        self.log("caffe.cpp:250", "Optimization Done.")
        return EXIT_DONE

    def _close(self):
        self.progress.send("end")
        summary = self.watch.summary()
        dead = self.watch.dead
        self.events.write({"event": "summary", "line": summary, "skipped": self.watch.skipped,
                           "rolled_back": self.watch.rolled_back, "rollbacks": self.watch.rollbacks,
                           "counts": dict(self.watch.counts),
                           "dead": dict(dead.details(), iteration=dead.iteration,
                                        message=dead.message()) if dead is not None else None})
        self.watch.close()

    def _solve(self, real, start, max_iter):
        solver, param, watch = self.solver, self.param, self.watch
        display, test_interval, snapshot = real["display"], real["test_interval"], real["snapshot"]
        smoothed = SmoothedLoss(max(1, param.average_loss), start)
        timer, iterations_last = time.time(), start
        tested_at = None
        while solver.iter < max_iter and not self.stop_requested:
            it = int(solver.iter)
            if (test_interval and it % test_interval == 0 and (it > 0 or real["test_initialization"])
                    and tested_at != it):
                tested_at = it
                self._test_all(it)
                if self.stop_requested:
                    break
            rollbacks = watch.rollbacks
            # No scheduled or final snapshot of weights the watch has not read (it reads
            # them after an update only where one could have gone non-finite; a snapshot a
            # signal asks for relies on that bound, as every iteration does).
            ends = it + 1
            snapshots = (snapshot and ends % snapshot == 0) or (
                ends >= max_iter and param.snapshot_after_train)
            watch.step(1, until_rollback=True, check_weights=bool(snapshots))
            if watch.rollbacks != rollbacks:
                # Back at a checkpoint: the smoothing starts over, as a new Step() would.
                smoothed = SmoothedLoss(max(1, param.average_loss), int(solver.iter))
                tested_at = None
                self._signals()
                continue
            done = int(solver.iter) - 1
            value = smoothed.update(watch.loss, done)
            self.events.write({"event": "iteration", "iteration": done, "loss": watch.loss,
                               "smoothed_loss": value, "lr": watch.lr,
                               "grad_norm": watch.grad_norm})
            if display and done % display == 0:
                lapse = time.time() - timer
                per_s = (done - iterations_last) / (lapse or 1)
                self.log("solver.cpp:239", "Iteration %d (%s iter/s, %ss/%d iters), loss = %s"
                         % (done, caffe_text(per_s), caffe_text(lapse), display,
                            caffe_text(value)))
                timer, iterations_last = time.time(), done
                lines, _ = _output_lines(solver.net, "Train")
                for line in lines:
                    self.log("solver.cpp:258", line)
                self.log("sgd_solver.cpp:112", "Iteration %d, lr = %s" % (done, caffe_text(
                    numpy.float32(watch.lr))))
            self.progress.send("iter %d %r %d" % (solver.iter, value, len(watch.skipped)))
            if snapshot and solver.iter % snapshot == 0:
                self._snapshot()
            self._signals()
        if param.snapshot_after_train and (not snapshot or solver.iter % snapshot != 0):
            self._snapshot()
        if self.stop_requested:
            self.log("solver.cpp:311", "Optimization stopped early.")
            return
        if display and solver.iter % display == 0:
            solver.net.forward()
            value = smoothed.update(watch.forward_loss(), int(solver.iter))
            self.log("solver.cpp:327", "Iteration %d, loss = %s" % (solver.iter, caffe_text(value)))
        if test_interval and solver.iter % test_interval == 0:
            self._test_all(int(solver.iter))
        self.log("solver.cpp:332", "Optimization Done.")
        self.events.write({"event": "done", "iteration": int(solver.iter)})

    def _signals(self):
        for action in self.signals.take():
            if action == "snapshot":
                self._snapshot()
            elif action == "stop":
                self.stop_requested = True

    def _snapshot(self):
        """Caffe's snapshot (solver.cpp's Snapshot), skipped with a warning naming the file
        where the disk cannot hold it: Caffe would abort the process on the failed write,
        and the run with it. A snapshot is a copy; training goes on without it."""
        folder = os.path.dirname(os.path.abspath(self.param.snapshot_prefix))
        need = snapshot_space(self.solver, self.param, self.snapshot_bytes)
        try:
            free = free_bytes(folder)
        except OSError:
            free = None
        iteration = int(self.solver.iter)
        if free is not None and free < need:
            path = "%s_iter_%d.solverstate" % (self.param.snapshot_prefix, iteration)
            self.log("safe_layers", "snapshot of iteration %d skipped: %s would not fit (ENOSPC: "
                     "%s has %d bytes free, a snapshot takes about %d); training goes on"
                     % (iteration, path, folder, free, need), severity="W")
            self.events.write({"event": "snapshot_skipped", "iteration": iteration, "path": path,
                               "free": free, "needed": need})
            return
        self.solver.snapshot()
        stem = "%s_iter_%d" % (self.param.snapshot_prefix, iteration)
        self.snapshot_bytes = sum(os.path.getsize(stem + suffix) for suffix in
                                  (".caffemodel", ".solverstate", ".caffemodel.h5", ".solverstate.h5")
                                  if os.path.exists(stem + suffix)) or None
        self.events.write({"event": "snapshot", "iteration": iteration})

    def _test_all(self, iteration):
        for i, net in enumerate(self.solver.test_nets):
            if self.stop_requested:
                return
            self._test(iteration, i, net)

    def _share_weights(self, net):
        """The training net's weights in test net ``net``, as Solver::Test does
        (``ShareTrainedLayersWith``): through pycaffe's ``share_weights``, or where a pycaffe
        older than March 2017 lacks it, copied layer by layer (by name, as Caffe matches
        them) before each test."""
        if hasattr(self.solver, "share_weights"):
            self.solver.share_weights(net)
            return
        trained = self.solver.net.params
        for name, blobs in net.params.items():
            if name in trained:
                for blob, source in zip(blobs, trained[name]):
                    blob.data[...] = source.data

    def _test(self, iteration, index, net):
        """``Solver::Test``: test_iter forwards, each output element averaged in float32."""
        self.log("solver.cpp:347", "Iteration %d, Testing net (#%d)" % (iteration, index))
        self._share_weights(net)
        test_iter = self.param.test_iter[index]
        weights = dict(zip(net._blob_names, net._blob_loss_weights))
        scores, loss = None, numpy.float32(0)
        for _ in range(test_iter):
            self._signals()
            if self.stop_requested:
                self.log("solver.cpp:396", "Test interrupted.")
                return
            net.forward()
            values = [numpy.float32(v) for name in net.outputs for v in net.blobs[name].data.reshape(-1)]
            if self.param.test_compute_loss:
                for name in net.outputs:
                    w = numpy.float32(weights.get(name, 0))
                    if w:
                        loss = numpy.float32(loss + numpy.float32(
                            float(net.blobs[name].data.sum()) * w))
            scores = values if scores is None else [numpy.float32(a + b) for a, b in zip(scores, values)]
        if self.param.test_compute_loss:
            self.log("solver.cpp:401", "Test loss: %s" % caffe_text(loss / numpy.float32(test_iter)))
        k, outputs = 0, {}
        for name in net.outputs:
            weight = numpy.float32(weights.get(name, 0))
            for _ in range(net.blobs[name].count):
                mean = numpy.float32(scores[k] / numpy.float32(test_iter))
                tail = (" (* %s = %s loss)" % (caffe_text(weight), caffe_text(weight * mean))
                        if weight else "")
                self.log("solver.cpp:414", "    Test net output #%d: %s = %s%s"
                         % (k, name, caffe_text(mean), tail))
                outputs.setdefault(name, []).append(float(mean))
                k += 1
        self.events.write({"event": "test", "iteration": iteration, "net": index, "outputs": outputs})


def _die_with_parent():
    """Ask Linux to send SIGTERM when the CLI process dies, so no training is orphaned."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the child simply outlives a killed parent
        pass


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    with open(argv[0]) as f:
        config = json.load(f)
    # The CLI holds a SIGINT/SIGHUP back until it reads "ready": from here on, they are
    # -sigint_effect / -sighup_effect, never a KeyboardInterrupt.
    signals = Signals(config["sigint_effect"], config["sighup_effect"])
    progress = Progress(int(argv[1]) if len(argv) > 1 else None)
    progress.send("ready")
    stderr = sys.stderr = LevelFilter(sys.stderr, config.get("minloglevel", 0))
    try:
        return Trainer(config, signals, progress).run()
    finally:
        # The run is over: a SIGINT now (the user's Ctrl-C, forwarded while the CLI writes
        # the plot) has nothing to stop, and must not kill the interpreter as it exits,
        # once it has put back SIGINT's default action.
        for number in signals.effects:
            signal.signal(number, signal.SIG_IGN)
        stderr.close_partial()


if __name__ == "__main__":
    sys.exit(main())
