"""What a watch costs, as ratios measured in one run (these machines are noisy).

    .venv/bin/python bench/bench_watch.py                    # LeNet, CIFAR-10 quick, ResNet-50
    .venv/bin/python bench/bench_watch.py --nets lenet --rounds 9

1. One CPU training iteration (`solver.step(1)`) of the published nets (tests/data;
   DummyData in place of their LMDBs), five ways, interleaved round by round:
   plain; `safe_layers.watch` as it comes (check_layers replay: the rate, the loss, every
   param diff and weight; a layer probe only in the replay of a bad iteration); the watch
   with every layer checked on every iteration (check_layers always: forward tops,
   backward bottom and param diffs); the solver-level checks only (check_layers off); a NaNGuard after every layer; Caffe's
   `debug_info: true` in the SOLVER (with display: 1, the only way it runs every
   iteration; its log lines go to /dev/null). Target: the watch costs less than debug_info.
   One BLAS thread (see below).
   Timed in CPU seconds of this process (time.process_time), rounds interleaved in a
   rotating order; ratios are the best round of each against the best plain round, and
   the median over rounds of each against the plain round beside it.
2. Rollback checkpoints: `solver.snapshot()` + `solver.restore()` (the only way stock
   pycaffe saves and restores the momentum history and iter), on disk and on /dev/shm,
   against a plain in-memory copy of the weights (which could restore neither).
"""

import argparse
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
    "lenet": ("lenet_train_test.prototxt", "lenet_solver.prototxt", 64, 5),
    "cifar10_quick": ("cifar10_quick_train_test.prototxt", "cifar10_quick_solver.prototxt", 100, 5),
    "resnet50": ("resnet50_train_val.prototxt", None, 4, 1),
}

VARIANTS = ("plain", "watch", "watch_always", "watch_solver_only", "nan_guards", "debug_info")


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


def bench_net(name, rounds, folder):
    import caffe
    import safe_layers
    from support.published import published_net, published_solver_fields
    net_file, solver_file, batch, iterations = NETS[name]
    text = published_net(net_file, data="dummy", batch=batch, phase_only="TRAIN")
    fields = published_solver_fields(solver_file) if solver_file else {
        "base_lr": 0.1, "lr_policy": '"step"', "stepsize": 100000, "gamma": 0.1, "momentum": 0.9,
        "weight_decay": 0.0001}
    plain_net = os.path.join(folder, name + ".prototxt")
    with open(plain_net, "w") as f:
        f.write(text)
    guarded_text, guards = guard_every_layer(text)
    guarded_net = os.path.join(folder, name + "_guarded.prototxt")
    with open(guarded_net, "w") as f:
        f.write(guarded_text)
    solvers = {}
    for variant in VARIANTS:
        net_path = guarded_net if variant == "nan_guards" else plain_net
        path = write_solver(folder, "%s_%s" % (name, variant), net_path, fields,
                            variant == "debug_info")
        with Quiet():
            solver = caffe.get_solver(path)
        if variant == "watch":  # the default: check_layers replay
            safe_layers.watch(solver, solver_file=path, on_nonfinite="skip")
        elif variant == "watch_always":
            safe_layers.watch(solver, solver_file=path, on_nonfinite="skip", check_layers="always")
        elif variant == "watch_solver_only":
            safe_layers.watch(solver, solver_file=path, on_nonfinite="skip", check_layers="off")
        with Quiet():
            solver.step(2)  # warm up: allocations, BLAS threads
        solvers[variant] = solver
    times = {variant: [] for variant in VARIANTS}
    for r in range(rounds):
        # Interleaved, in a rotating order, so drift and position hit every variant alike.
        # CPU time of this process (all its threads): what other processes on the machine
        # do inflates wall time, much less this.
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for variant in order:
            solver = solvers[variant]
            with Quiet():
                start = time.process_time()
                for _ in range(iterations):
                    solver.step(1)
                times[variant].append((time.process_time() - start) / iterations)
    layers = len(solvers["plain"].net.layers)
    print("== %s (batch %d, %d layers in TRAIN, %d NaNGuards), CPU seconds (process time) per "
          "iteration, %d interleaved rounds x %d iterations" % (name, batch, layers, guards, rounds, iterations))
    print("  %-18s %10s %12s %14s" % ("", "best s/it", "best/plain", "paired median"))
    plain = min(times["plain"])
    result = {}
    for variant in VARIANTS:
        best = min(times[variant])
        paired = statistics.median(t / p for t, p in zip(times[variant], times["plain"]))
        result[variant] = (best / plain, paired)
        print("  %-18s %10.4f %11.3fx %13.3fx" % (variant, best, best / plain, paired))
    print("  watch / debug_info: %.3f best, %.3f paired median (target < 1)"
          % (result["watch"][0] / result["debug_info"][0],
             result["watch"][1] / result["debug_info"][1]))
    checkpoints(name, plain_net, fields, plain, folder)
    return result


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
    parser.add_argument("--nets", default="lenet,cifar10_quick,resnet50")
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    os.environ.setdefault("GLOG_minloglevel", "0")  # debug_info's lines are really written
    import caffe
    caffe.set_mode_cpu()
    import platform
    print("machine: %s, %d cores, Python %s" % (platform.processor() or platform.machine(),
                                                os.cpu_count(), platform.python_version()))
    with tempfile.TemporaryDirectory() as folder:
        for name in args.nets.split(","):
            rounds = args.rounds if name != "resnet50" else max(3, args.rounds // 2)
            bench_net(name, rounds, folder)


if __name__ == "__main__":
    main()
