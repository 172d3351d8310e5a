"""Train like `caffe train`, under a watch (safe_layers.watch): the same flags and log
lines, plus skip, rollback and a report naming the layer, the iteration and the cause.

    safe-layers train -solver lenet_solver.prototxt
    safe-layers train -solver solver.prototxt -snapshot snap_iter_500.solverstate \\
        --on-nonfinite skip --rollback-after 3 --lr-factor 0.1
    safe-layers train -solver solver.prototxt -weights a.caffemodel,b.caffemodel -gpu 0

Caffe's flags are spelled as `caffe train` spells them (-solver X, --solver=X ...). The
training runs in a child process (pycaffe, one `solver.step(1)` at a time): a Caffe
`LOG(FATAL)` or `CHECK` there (a bad net, an unreadable database, a GPU out of memory)
ends that process, and this one reports it. At the end: a JSON-lines event log and a PNG
of the loss and the rate with the skipped and rolled-back iterations marked.

Exit status: 0 done (also when stopped by -sigint_effect/-sighup_effect stop, as caffe);
1 stopped by a fault (the report is printed last), or ended with a net found dead (on_dead
warn: "ended dead"); 2 bad input (unreadable solver, bad
flags, a net Caffe refuses to build).
"""

import json
import os
import signal
import sys

from safe_layers import reporting
from safe_layers.anomaly.options import OPTIONS, WatchOptions
from safe_layers.core import caffe_process, lr_policy, scratch
from safe_layers.core.errors import InputError
from safe_layers.readers import prototxt
from safe_layers.readers.net_state import layers_in_state
from safe_layers.readers.prototxt import read_solver, resolve_snapshot_prefix, solver_nets
from safe_layers.tools.findings import EXIT_CLEAN, EXIT_FOUND, EXIT_INPUT, check_output_path
from safe_layers.tools.lint import command as lint
from safe_layers.tools.scan.net_targets import targets_from_prototxt
from safe_layers.tools.train import run_files
from safe_layers.tools.train.plot import write_plot
from safe_layers.tools.train.terminal import ERROR, INFO, WARNING, Terminal, minloglevel, supervise

HELP = "train like `caffe train`, under a watch: skip, rollback, reports naming layer and iteration"

EFFECTS = ("stop", "snapshot", "none")

# The watch options that are flags of this command, in --help's order, with their
# metavars. Their types, defaults, choices and help are OPTIONS' (safe_layers.anomaly); the
# options left out keep their defaults.
WATCH_FLAGS = {"on_nonfinite": None, "rollback_after": "K", "checkpoint_every": "N",
               "keep_checkpoints": "N", "checkpoint_loss_ratio": "R", "lr_factor": "F",
               "max_rollbacks": "M", "max_skips": "M", "on_dead": None, "dead_after": "K",
               "dead_update_ratio": "R", "chance_band": "F", "chance_after": "N",
               "warn_growth": "F", "clip_gradients": "C", "record_dir": "DIR", "check_layers": None}


def add_arguments(parser):
    caffe = parser.add_argument_group("caffe train's flags")
    caffe.add_argument("-solver", "--solver", required=True, metavar="PROTOTXT",
                       help="the solver definition protocol buffer text file")
    caffe.add_argument("-weights", "--weights", default="", metavar="MODELS",
                       help="pretrained weights to initialize finetuning, separated by ','; "
                            "not with -snapshot")
    caffe.add_argument("-snapshot", "--snapshot", default="", metavar="SOLVERSTATE",
                       help="the snapshot solver state to resume training from")
    caffe.add_argument("-gpu", "--gpu", default="", metavar="ID",
                       help="run in GPU mode on this device (one device: multi-GPU needs NCCL "
                            "and Caffe's python/train.py)")
    caffe.add_argument("-level", "--level", type=int, default=0, help="network level")
    caffe.add_argument("-stage", "--stage", default="", help="network stages, separated by ','")
    caffe.add_argument("-sigint_effect", "--sigint_effect", default="stop", choices=EFFECTS,
                       help="what SIGINT does (default stop: after this iteration, then the final "
                            "snapshot)")
    caffe.add_argument("-sighup_effect", "--sighup_effect", default="snapshot", choices=EFFECTS,
                       help="what SIGHUP does (default snapshot)")
    watch_flags = parser.add_argument_group("the watch (see safe_layers.watch)")
    _add_watch_flags(watch_flags)
    # The flag of the days check_layers was a boolean, so that older command lines still run.
    watch_flags.add_argument("--no-layer-checks", dest="check_layers", action="store_const",
                             const="off", help="the same as --check-layers off")
    tool = parser.add_argument_group("this tool")
    tool.add_argument("--no-lint", action="store_true",
                      help="train even when `safe-layers lint` finds errors in the solver or net")
    tool.add_argument("--events", metavar="JSONL",
                      help="the event log (default: <snapshot_prefix>_events.jsonl)")
    tool.add_argument("--plot", metavar="PNG",
                      help="loss and lr over iterations (default: <snapshot_prefix>_train.png)")
    tool.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                      help="a progress bar, and a status line while the run starts (auto: only "
                           "when stderr is a terminal, and not with -q)")
    tool.add_argument("-q", "--quiet", action="store_true",
                      help="of our lines, only errors and the final summary (Caffe's own: "
                           "GLOG_minloglevel, 2 when unset); without -q ours follow "
                           "GLOG_minloglevel as Caffe's do (0 INFO, 1 WARNING, 2 ERROR)")


def _add_watch_flags(group):
    """One flag per WATCH_FLAGS option, as OPTIONS describes it (dest: the option's name)."""
    fields = {field.name: field for field in OPTIONS}
    for name, metavar in WATCH_FLAGS.items():
        field = fields[name]
        doc = field.doc.replace("%", "%%")
        if field.default is not None:
            doc += " (default %s)" % field.default
        # None when not given: the watch applies the default. It must see which were
        # given: it refuses an option given without the one it acts beside (WatchOptions),
        # and tells a default it cannot honour on an older pycaffe from a flag the user gave.
        group.add_argument("--" + name.replace("_", "-"), type=field.kind, default=None,
                           choices=field.choices, metavar=metavar, help=doc)


def _watch_options(args):
    return {name: getattr(args, name) for name in WATCH_FLAGS}


def _train_net(nets):
    """The Prototxt of the net the solver trains (None when it names none)."""
    return next((net for field, net in nets
                 if field in ("net", "train_net", "net_param", "train_net_param")), None)


def prepare(args, workdir, terminal=None):
    """Check the command line and the solver as `caffe train` would (InputError where it
    would abort), and write the solver the training process builds. Returns the config;
    warnings go to ``terminal`` (a Terminal; stderr without one)."""
    from google.protobuf import text_format
    if args.snapshot and args.weights:
        raise InputError("give a snapshot to resume training or weights to finetune but not both "
                         "(-snapshot %s, -weights %s)" % (args.snapshot, args.weights))
    try:
        WatchOptions(**_watch_options(args))
    except ValueError as exc:
        raise InputError(str(exc)) from None
    # The solver and its nets are read once here; every check below works on them.
    solver = read_solver(args.solver)
    nets = solver_nets(solver)
    param = type(solver.message)()
    param.CopyFrom(solver.message)
    resolve_snapshot_prefix(param, args.solver)
    problem = lr_policy.fatal_problem(param)
    if problem:
        raise InputError("%s: %s" % (args.solver, problem))
    if param.average_loss < 1:
        raise InputError("%s: average_loss must be >= 1 (it is %d); Caffe aborts"
                         % (args.solver, param.average_loss))
    if param.max_iter <= 0:
        raise InputError("%s: max_iter is %d: there is nothing to train (caffe train runs zero "
                         "iterations)" % (args.solver, param.max_iter))
    for path in [args.snapshot] + [w.strip() for w in args.weights.split(",") if w.strip()]:
        if path and not os.path.isfile(path):
            raise InputError("%s: no such file" % path)
    gpu = _device(args, param)
    if args.snapshot:
        try:
            caffe_process.solverstate_iteration(args.snapshot)
        except (OSError, ValueError) as exc:
            raise InputError("-snapshot %s: %s" % (args.snapshot, exc)) from None
        run_files.check_snapshot(args.snapshot)
    train_net = _train_net(nets)
    if args.weights and train_net is not None:
        for warning in run_files.weights_warnings(args.weights, train_net):
            (terminal or Terminal(False, INFO)).line("safe-layers train: warning: " + warning,
                                                     WARNING)
    real = {"display": param.display, "test_interval": param.test_interval,
            "snapshot": param.snapshot, "test_initialization": param.test_initialization}
    # What caffe.cpp does to the solver before it builds it, and what this tool does
    # itself instead of Solver::Step (display, test, snapshot).
    param.train_state.level = args.level
    for stage in [s for s in args.stage.split(",") if s]:
        param.train_state.stage.append(stage)
    if args.weights:
        del param.weights[:]
        param.weights.append(args.weights)
    elif args.snapshot:
        del param.weights[:]
    param.display = 0
    # Caffe CHECKs test_interval > 0 when there are test nets: one it never reaches
    # (iter % it == 0 only at 0, where test_initialization false keeps Step from testing).
    param.test_interval = 2 ** 31 - 1
    param.test_initialization = False
    param.snapshot = 0
    solver_path = os.path.join(workdir, "solver.prototxt")
    with open(solver_path, "w") as f:
        f.write(text_format.MessageToString(param))
    prefix = param.snapshot_prefix
    events = args.events or prefix + "_events.jsonl"
    plot = args.plot or prefix + "_train.png"
    run_files.check_outputs({events: "the event log", plot: "the plot"},
                            run_files.run_inputs(solver, nets, args.snapshot, args.weights))
    if real["snapshot"] or param.snapshot_after_train or args.rollback_after:
        # Caffe checks this only when `snapshot` is set, and then aborts; the final
        # snapshot and the watch's checkpoints would fail at the end or at the first fault.
        check_output_path(prefix + "_iter_0.solverstate",
                          "snapshots (snapshot_prefix %r of %s)" % (prefix, args.solver))
    _check_sources(args.solver, param)
    return {"solver": solver_path, "solver_file": args.solver, "snapshot": args.snapshot or None,
            "minloglevel": minloglevel(args.quiet),
            "gpu": gpu, "sigint_effect": args.sigint_effect, "sighup_effect": args.sighup_effect,
            "watch": _watch_options(args), "events": events, "plot": plot, "real": real,
            "net_name": train_net.message.name if train_net is not None else "",
            "private_events": os.path.join(workdir, "events.jsonl")}


def _device(args, param):
    """The GPU to train on (-gpu, else the solver's GPU mode and device_id), or None."""
    if args.gpu:
        if "," in args.gpu or args.gpu == "all":
            raise InputError("-gpu %s: one device only; multi-GPU training of Python layers needs "
                             "NCCL and Caffe's python/train.py" % args.gpu)
        try:
            return int(args.gpu)
        except ValueError:
            raise InputError("-gpu %r: a device number" % args.gpu) from None
    if param.HasField("solver_mode") and param.solver_mode == param.GPU:
        return param.device_id
    return None


def _check_sources(solver_path, param):
    """A data layer whose source does not exist makes Caffe abort while it builds the net,
    with `mdb_status == 0 (2 vs. 0) No such file or directory` and no path: name the layer
    and the path here instead (InputError, exit 2). Only layers Caffe will build count:
    those of the states this run uses (``param``: the solver as prepared, with -level and
    -stage; a test net only where there is a test_iter for it)."""
    try:
        _, notes = targets_from_prototxt(solver_path)
    except InputError:
        return  # no Data / HDF5Data layer with a source: nothing to check
    missing = [f for f in notes if f.severity == "error"]
    if not missing:
        return
    pb2 = prototxt.caffe_pb2()
    train = (pb2.TRAIN, param.train_state.level, tuple(param.train_state.stage))
    tests = []
    for k in range(len(param.test_iter)):
        state = param.test_state[k] if k < len(param.test_state) else pb2.NetState()
        tests.append((pb2.TEST, state.level, tuple(state.stage)))
    built = set()
    nets = prototxt.solver_nets(prototxt.read_prototxt(solver_path))
    test_nets = [n for field, n in nets if field.startswith("test_net")]
    for field, net in nets:
        if field.startswith("test_net"):
            k = test_nets.index(net)
            states = tests[k:k + 1]
        elif test_nets:
            states = [train]  # the test nets are named on their own
        else:
            states = [train] + tests  # `net`: the training net and every test net
        for phase, level, stages in states:
            built.update((net.path, layer.name)
                         for layer, _ in layers_in_state(net.layers(), phase, level, stages))
    missing = [f for f in missing if (f.path, f.layer) in built]
    if missing:
        raise InputError("\n".join(f.text() for f in missing))


def _lint(args):
    """`safe-layers lint` on the solver (and the nets it names): its findings."""
    linter = lint.Linter()
    linter.lint_file(args.solver)
    return linter.findings()


def _lint_verdict(args, found, terminal):
    """Print the lint findings (at their severity's level); their errors stop the run
    (exit 2) unless --no-lint. Returns an exit status, or None to go on."""
    levels = {"error": ERROR, "warning": WARNING}
    for finding in found:
        terminal.line(finding.text(), levels.get(finding.severity, INFO))
    errors = [f for f in found if f.severity == "error"]
    if errors and not args.no_lint:
        terminal.line("safe-layers train: lint found %d error%s in %s; fix them or pass --no-lint"
                      % (len(errors), "" if len(errors) == 1 else "s", args.solver), ERROR)
        return EXIT_INPUT
    return None


class StopBeforeTraining(Exception):
    """A stop signal while the run was checked (EarlySignals.interruptible)."""


class EarlySignals:
    """-sigint_effect / -sighup_effect from the first instant, as `caffe train` installs
    its handler before it builds anything: while the run is checked, linted and its
    training process started, 'stop' is noted (the run then ends before training, exit 0,
    its temporary folder removed), 'snapshot' and 'none' have nothing to act on. Without
    this, SIGINT printed a traceback and SIGHUP killed the tool silently (exit 129)."""

    def __init__(self, sigint_effect, sighup_effect):
        self.effects = {signal.SIGINT: sigint_effect, signal.SIGHUP: sighup_effect}
        self.stop = None
        self.interrupting = False  # a stop raises StopBeforeTraining (while lint runs)
        self.previous = {number: signal.signal(number, self._note) for number in self.effects}

    def _note(self, number, frame):
        if self.effects[number] == "stop" and self.stop is None:
            self.stop = signal.Signals(number).name
            self.number = number
            if self.interrupting:
                raise StopBeforeTraining()

    def interruptible(self, work):
        """``work()``'s result, or None where a stop came first or cut it short: lint
        builds the net in Caffe processes of its own, one per phase, each as slow as the
        net's setup, and a Ctrl-C must not wait for them all."""
        if self.stop is not None:
            return None
        self.interrupting = True
        try:
            return work()
        except StopBeforeTraining:
            return None
        finally:
            self.interrupting = False

    def restore(self):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def run(args):
    early = EarlySignals(args.sigint_effect, args.sighup_effect)
    terminal = Terminal(_wants_bar(args), minloglevel(args.quiet))
    try:
        with scratch.folder("train") as workdir:
            try:
                terminal.status("checking %s" % args.solver)
                config = prepare(args, workdir, terminal)
                terminal.status("linting %s" % args.solver)
                found = early.interruptible(lambda: _lint(args))
            finally:
                terminal.close()
            if early.stop is not None:
                # Lint's Caffe processes share the terminal: a Ctrl-C reached them too, and
                # lint was cut short; what it found is no finding.
                sys.stderr.write("safe-layers train: stopped by %s (-%s_effect stop) before "
                                 "training started\n" % (early.stop, early.stop.lower()))
                return EXIT_CLEAN
            status = _lint_verdict(args, found, terminal)
            if status is not None:
                return status
            config_path = os.path.join(workdir, "config.json")
            with open(config_path, "w") as f:
                json.dump(config, f)
            terminal.status("building the net (%s)" % args.solver)
            returncode, tail = supervise([sys.executable, "-m", "safe_layers.tools.train.child",
                                          config_path], terminal, early, _child_env(args))
            events = _read_events(config["private_events"])
        # Still under EarlySignals: a Ctrl-C while the plot is drawn lets it finish.
        return _finish(config, events, returncode, tail)
    finally:
        early.restore()


def _wants_bar(args):
    """The progress bar and the status line: --progress always, or auto on a terminal
    without -q."""
    return args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty()
                                         and not args.quiet)


def _child_env(args):
    """The training process's environment: with -q and no GLOG_minloglevel of the user's,
    Caffe's own INFO and WARNING lines are left out too (GLOG_minloglevel=2)."""
    if not args.quiet or "GLOG_minloglevel" in os.environ:
        return None
    env = dict(os.environ)
    env["GLOG_minloglevel"] = str(ERROR)
    return env


def _read_events(path):
    events = []
    if not os.path.isfile(path):
        return events  # never written, or a device (/dev/null; /dev/full reads endless zeros)
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        events.append(json.loads(line))
                    except ValueError:
                        break  # a process killed mid-line: keep what was whole
    except OSError:
        pass
    return events


def _history(config, events):
    """The events to plot: the user's event log when it is a file this run wrote into
    (every run appended to it, so a resumed run is drawn with the one it resumed), else
    this run's own."""
    path = config["events"]
    if events and os.path.isfile(path):
        history = _read_events(path)
        if any(e.get("event") == "run" for e in history):
            return history
    return events


def _finish(config, events, returncode, tail):
    """Say how the run ended (from this run's own events, kept in the tool's folder: they
    never depend on where the user's event log went) and draw the plot."""
    kinds = [e.get("event") for e in events]
    started = "start" in kinds
    stopped = next((e for e in reversed(events) if e.get("event") == "stopped"), None)
    summary = next((e for e in reversed(events) if e.get("event") == "summary"), None)
    plot = None
    if started:
        try:
            plot = write_plot(_history(config, events), config["plot"])
        except Exception as exc:  # noqa: BLE001 - a plot never hides the outcome
            sys.stderr.write("safe-layers train: could not write the plot %s: %s\n"
                             % (config["plot"], exc))
    out = sys.stderr
    if summary:
        out.write("safe-layers train: %s\n" % summary["line"])
    written = ["events %s" % config["events"]] if events and os.path.isfile(config["events"]) else []
    if plot:
        written.append("plot %s" % plot)
    if written:
        out.write("safe-layers train: %s\n" % "; ".join(written))
    dead = summary.get("dead") if summary else None
    if returncode == 0 and dead:
        # A run that ends with a net that learns nothing is no success (on_dead warn).
        out.write("safe-layers train: ended dead: %s\n" % dead["message"])
        return EXIT_FOUND
    if returncode == 0:
        return EXIT_CLEAN
    if returncode < 0:
        fatal = [l for l in tail if l[:1] == "F" and "] " in l]
        why = fatal[-1].split("] ", 1)[1] if fatal else "killed by signal %d" % -returncode
        last = next((e["iteration"] for e in reversed(events) if "iteration" in e), None)
        if not started:
            out.write("safe-layers train: Caffe aborted while building the solver and its nets "
                      "(%s): %s\n" % (config["solver_file"], why))
            return EXIT_INPUT
        out.write("safe-layers train: the training process died at iteration %s: %s\n" % (last, why))
        return EXIT_FOUND
    if returncode == EXIT_INPUT:
        return EXIT_INPUT
    if stopped:
        out.write("safe-layers train: stopped at iteration %d by a fault:\n%s%s\n"
                  % (stopped["iteration"], reporting.glog_prefix("E"), stopped["line"]))
    return EXIT_FOUND
