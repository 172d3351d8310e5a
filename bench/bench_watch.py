"""What a watch costs, as ratios measured in one run (these machines are noisy).

    .venv/bin/python bench/bench_watch.py        # LeNet, CIFAR-10 quick, ResNet-50, digits
    .venv/bin/python bench/bench_watch.py --nets lenet,digits --seconds 30

1. CPU training iterations of the published nets (tests/data; DummyData in place of
   their LMDBs) and of the demo's digits net (its LMDBs written by examples/digits.py;
   about a millisecond an iteration), seven ways, interleaved round by round: plain; a
   second plain solver (the A/A control: what the measurement itself cannot tell apart);
   ``safe_layers.watch`` as it comes (check_layers replay: the rate, the loss and every
   param diff in one host read, every weight after an update that could overflow and
   every 100 iterations; a layer probe only in the replay of a bad iteration); every
   layer checked on every iteration (check_layers always); the solver-level checks only
   (check_layers off); a NaNGuard after every layer; Caffe's ``debug_info: true`` in the
   SOLVER (with display: 1, the only way it runs every iteration; its log lines go to
   /dev/null). Targets: the default within 1 % of plain (5 % on the digits net) and
   below debug_info. ``--variants ...,reads_only`` adds callbacks that read only what
   the solver-level checks cannot do without (the rate, the loss tops, every param
   diff's sum of squares): the floor of the default's cost.
   One BLAS thread (see below). Timed in CPU seconds of this process
   (time.process_time). A round is one ``solver.step(n)`` of every variant, in a
   rotating order, n small (1 or 2 iterations; 10 of the digits net's): noise from the
   rest of the machine comes and goes over seconds, and short rounds pair each variant
   with a plain round run under the same conditions. Rounds run until ``--seconds`` (per
   net) are spent, or ``--rounds``. Printed per variant: the median round, the best
   round against the best plain round, the median of the per-round ratios (each against
   the plain round beside it) with its 95 % confidence interval (order statistics) and
   interquartile range, and the same of the extra time per iteration in microseconds.
2. The replay's own cost per fault: one bad iteration (a NaN put in the last layer's weights),
   the replay timed by the watch.
3. Rollback checkpoints: ``solver.snapshot()`` + ``solver.restore()`` (the only way stock
   pycaffe saves and restores the momentum history and iter), on disk and on /dev/shm,
   against a plain in-memory copy of the weights (which could restore neither).
"""

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

# One BLAS thread: OpenBLAS's idle threads spin, and how long they spin depends on what
# else runs on the machine, which made the CPU time of identical iterations vary by 20 %.
# With one thread, CPU time measures the work; every variant runs under the same setting.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from support.guarded import guard_every_layer  # noqa: E402  (the tests' helper: one definition)

NETS = {
    # name: (published net, published solver or None, batch, iterations per round)
    "lenet": ("lenet_train_test.prototxt", "lenet_solver.prototxt", 64, 2),
    "cifar10_quick": ("cifar10_quick_train_test.prototxt", "cifar10_quick_solver.prototxt", 100, 1),
    "resnet50": ("resnet50_train_val.prototxt", None, 4, 1),
    # The demo's digits net (conv 16 + conv 32 + ip 64 + ip 10, batch 50, LMDB written by
    # examples/digits.py): an iteration of about a millisecond, as on a GPU.
    "digits": (None, None, 50, 10),
}

# Iterations run by every variant before timing: past the default dead_after (20).
WARM_UP = 21

VARIANTS = ("plain", "plain_again", "replay", "always", "off", "nan_guards", "debug_info",
            "reads_only")
DEFAULT_VARIANTS = VARIANTS[:-1]  # reads_only: a decomposition, asked for by --variants
LABELS = {"plain": "plain", "plain_again": "plain, a second solver (A/A)",
          "replay": "watch (default: replay)", "always": "watch always", "off": "watch off",
          "nan_guards": "NaNGuard every layer", "debug_info": "debug_info",
          "reads_only": "the checks' reads alone"}


def write_solver(folder, tag, net_path, solver_fields, debug_info):
    lines = ['net: "%s"' % net_path, "max_iter: 100000", "random_seed: 1", "solver_mode: CPU",
             'snapshot_prefix: "%s"' % os.path.join(folder, tag)]
    for key, value in solver_fields.items():
        lines.append("%s: %s" % (key, value))
    lines.append("display: %d" % (1 if debug_info else 0))
    if debug_info:
        lines.append("debug_info: true")
    path = os.path.join(folder, tag + "_solver.prototxt")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


class Quiet:
    """fd 2 to /dev/null while timing: debug_info's (and Caffe's) log lines are written
    and formatted, as in a real run, but not shown."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)


def net_text(name, folder):
    """(the TRAIN net's prototxt text, its solver fields)."""
    from support.published import published_net, published_solver_fields
    net_file, solver_file, batch, _ = NETS[name]
    if name == "digits":
        import importlib.util
        spec = importlib.util.spec_from_file_location(
            "digits", os.path.join(ROOT, "examples", "digits.py"))
        digits = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(digits)
        digits.write_digits(folder)
        with open(os.path.join(ROOT, "examples", "demo", "digits_train_test.prototxt")) as f:
            text = f.read().replace('source: "digits_', 'source: "%s/digits_' % folder)
        return text, {"base_lr": 0.1, "lr_policy": '"fixed"', "momentum": 0.9,
                      "weight_decay": 0.0005}
    text = published_net(net_file, data="dummy", batch=batch, phase_only="TRAIN")
    fields = published_solver_fields(solver_file) if solver_file else {
        "base_lr": 0.1, "lr_policy": '"step"', "stepsize": 100000, "gamma": 0.1, "momentum": 0.9,
        "weight_decay": 0.0001}
    return text, fields


def attach(variant, solver, path):
    import safe_layers
    modes = {"replay": "replay", "always": "always", "off": "off"}
    if variant in modes:
        return safe_layers.watch(solver, solver_file=path, on_nonfinite="skip",
                                 check_layers=modes[variant])
    if variant == "reads_only":
        reads_only(solver)
    return None


def reads_only(solver):
    """Callbacks that read only what the solver-level checks cannot do without: the rate
    before the forward; the loss tops and every param diff's sum of squares before the
    update (the floor of the default mode's cost)."""
    import numpy
    net = solver.net
    blobs = [blob for layer in net.layers for blob in layer.blobs]
    weights = list(net._blob_loss_weights)
    tops = [net._blobs[j] for j in range(len(weights)) if weights[j] != 0]
    seen = {}

    def on_start():
        seen["lr"] = float(solver.lr)

    def on_gradients_ready():
        loss = sum(top.data.item() for top in tops)
        seen["read"] = loss, sum(float(numpy.vdot(d, d)) for d in [b.diff for b in blobs])
    solver.add_callback(on_start, on_gradients_ready)


def quartiles(values):
    """(first quartile, median, third quartile)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def median_interval(values):
    """A 95 % confidence interval of the median of ``values`` (independent rounds): the
    order statistics n/2 -+ 0.98 sqrt(n), from the binomial distribution's normal
    approximation; the whole range where there are too few values for it."""
    ordered = sorted(values)
    n = len(ordered)
    half = 0.98 * n ** 0.5
    low, high = int(n / 2 - half), int(math.ceil(n / 2 + half))
    if low < 0 or high > n - 1:
        return ordered[0], ordered[-1]
    return ordered[low], ordered[high]


def bench_net(name, rounds, seconds, folder, variants=DEFAULT_VARIANTS):
    import caffe
    _, _, batch, iterations = NETS[name]
    text, fields = net_text(name, folder)
    plain_net = os.path.join(folder, name + ".prototxt")
    with open(plain_net, "w") as f:
        f.write(text)
    guarded_text, guards = guard_every_layer(text)
    guarded_net = os.path.join(folder, name + "_guarded.prototxt")
    with open(guarded_net, "w") as f:
        f.write(guarded_text)
    solvers = {}
    warm = {}
    for variant in variants:
        net_path = guarded_net if variant == "nan_guards" else plain_net
        path = write_solver(folder, "%s_%s" % (name, variant), net_path, fields,
                            variant == "debug_info")
        with Quiet():
            solver = caffe.get_solver(path)
        attach(variant, solver, path)
        # Warm up, every variant alike: allocations, caches, and the default mode past
        # its first dead_after iterations, in which a param with a zero diff (one not
        # frozen) has the iteration replayed to look for a dead layer (a start-up cost,
        # not one of every iteration: see replay_fault.FaultReplay.zeros).
        with Quiet():
            start = time.process_time()
            solver.step(WARM_UP)
            warm[variant] = time.process_time() - start
        solvers[variant] = solver
    if rounds is None:
        per_round = sum(warm.values()) / WARM_UP * iterations
        rounds = max(5, int(seconds / per_round))
    times = {variant: [] for variant in variants}
    for r in range(rounds):
        # Interleaved, in a rotating order, so drift and position hit every variant alike.
        # CPU time of this process (all its threads): what other processes on the machine
        # do inflates wall time, much less this.
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for variant in order:
            solver = solvers[variant]
            with Quiet():
                start = time.process_time()
                solver.step(iterations)
                times[variant].append((time.process_time() - start) / iterations)
    layers = len(solvers["plain"].net.layers)
    print("== %s (batch %d, %d layers in TRAIN, %d NaNGuards), CPU seconds (process time) per "
          "iteration, %d interleaved rounds x %d iteration%s"
          % (name, batch, layers, guards, rounds, iterations, "" if iterations == 1 else "s"))
    print("  %-30s %10s %9s %36s %26s" % ("", "median s/it", "best/plain",
                                         "paired ratio: median (95% CI) [IQR]",
                                         "extra us/it: median (CI)"))
    plain = times["plain"]
    result = {}
    for variant in variants:
        ratios = [t / p for t, p in zip(times[variant], plain)]
        extra = [(t - p) * 1e6 for t, p in zip(times[variant], plain)]
        r1, r2, r3 = quartiles(ratios)
        c1, c2 = median_interval(ratios)
        e2 = statistics.median(extra)
        x1, x2 = median_interval(extra)
        result[variant] = (min(times[variant]) / min(plain), r2, c1, c2, e2)
        print("  %-30s %10.5f %9.3fx %9.4fx (%.4f, %.4f) [%.3f, %.3f] %9.0f (%.0f, %.0f)"
              % (LABELS[variant], statistics.median(times[variant]), result[variant][0],
                 r2, c1, c2, r1, r3, e2, x1, x2))
    if "replay" in result and "debug_info" in result:
        print("  default / debug_info: %.3f (paired medians; target < 1)"
              % (result["replay"][1] / result["debug_info"][1]))
    replay_cost(name, plain_net, fields, statistics.median(plain), folder)
    if name != "digits":
        checkpoints(name, plain_net, fields, statistics.median(plain), folder)
    return result


def replay_cost(name, net_path, fields, step_seconds, folder, repeat=3):
    """What one fault costs the default mode: its replay (one more forward and backward,
    every layer checked), timed by the watch itself (FaultReplay.last['seconds']). The
    fault: a NaN put into the first param blob (every blob after it non-finite: the most
    the probes have to describe)."""
    import caffe
    import numpy
    import safe_layers
    path = write_solver(folder, name + "_fault", net_path, fields, False)
    with Quiet():
        solver = caffe.get_solver(path)
        solver.step(1)
    with open(os.devnull, "w") as null:
        w = safe_layers.watch(solver, solver_file=path, on_nonfinite="warn", stream=null)
        last = list(solver.net.params.values())[-1][0]
        weights = {key: [b.data.copy() for b in blobs] for key, blobs in solver.net.params.items()}
        seconds = []
        for _ in range(repeat):
            for key, blobs in solver.net.params.items():
                for b, saved in zip(blobs, weights[key]):
                    b.data[...] = saved
            last.data.flat[0] = numpy.nan
            with Quiet():
                solver.step(1)
            seconds.append(w.replay.last["seconds"])
        w.close()
    best = min(seconds)
    print("  replay of one bad iteration: %.4f s = %.2f plain iterations (best of %d; "
          "reproduced: %s)" % (best, best / step_seconds, repeat, w.replay.last["reproduced"]))


def checkpoints(name, net_path, fields, step_seconds, folder, repeat=3):
    """snapshot() + restore() with the snapshot_prefix on disk and on /dev/shm (tmpfs),
    against a copy of the weights in memory."""
    import caffe
    rows = []
    for label, where in (("disk", folder), ("/dev/shm", "/dev/shm")):
        if not os.path.isdir(where):
            continue
        place = tempfile.mkdtemp(dir=where)
        path = write_solver(place, name + "_ck", net_path, fields, False)
        with Quiet():
            solver = caffe.get_solver(path)
            solver.step(1)
        net = solver.net
        if not rows:
            size = sum(blob.count for blobs in net.params.values() for blob in blobs) * 4
            start = time.perf_counter()
            for _ in range(repeat):
                [blob.data.copy() for blobs in net.params.values() for blob in blobs]
            rows.append(("weights copied in memory (restores no momentum, no iter)",
                         (time.perf_counter() - start) / repeat))
        state = os.path.join(place, "%s_ck_iter_%d.solverstate" % (name, solver.iter))
        saves, loads = [], []
        with Quiet():
            for _ in range(repeat):
                start = time.perf_counter()
                solver.snapshot()
                middle = time.perf_counter()
                solver.restore(state)
                saves.append(middle - start)
                loads.append(time.perf_counter() - middle)
        rows.append(("snapshot() on %s" % label, min(saves)))
        rows.append(("restore() from %s" % label, min(loads)))
        shutil_rm(place)
    print("  rollback checkpoint, %.1f MB of weights (+ as much momentum history), best of %d:"
          % (size / 1e6, repeat))
    for label, seconds in rows:
        print("    %-58s %8.4f s = %6.2f iterations" % (label, seconds, seconds / step_seconds))


def shutil_rm(path):
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default="lenet,cifar10_quick,resnet50,digits")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="which of %s (plain is always timed)" % ", ".join(VARIANTS))
    parser.add_argument("--seconds", type=float, default=60,
                        help="CPU seconds of timed rounds per net (default 60; ResNet-50 twice "
                             "as many)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="a fixed number of rounds per net instead of --seconds")
    parser.add_argument("--resnet-rounds", type=int, default=None,
                        help="with --rounds: the rounds of ResNet-50 (default: half of --rounds, "
                             "at least 3)")
    args = parser.parse_args()
    variants = ("plain",) + tuple(v for v in args.variants.split(",") if v != "plain")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error("unknown variants %s; allowed: %s" % (", ".join(unknown), ", ".join(VARIANTS)))
    os.environ.setdefault("GLOG_minloglevel", "0")  # debug_info's lines are really written
    import caffe
    caffe.set_mode_cpu()
    import platform
    print("machine: %s, %d cores, Python %s" % (platform.processor() or platform.machine(),
                                                os.cpu_count(), platform.python_version()))
    with tempfile.TemporaryDirectory() as folder:
        for name in args.nets.split(","):
            rounds, seconds = args.rounds, args.seconds
            if name == "resnet50":
                seconds *= 2
                if rounds is not None:
                    rounds = args.resnet_rounds or max(3, rounds // 2)
            bench_net(name, rounds, seconds, folder, variants)


if __name__ == "__main__":
    main()
