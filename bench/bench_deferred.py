"""What the deferred checks save and cost, as ratios measured in one run (machines are noisy).

    .venv/bin/python bench/bench_deferred.py               # CPU (make bench)
    .venv/bin/python bench/bench_deferred.py --gpu         # GPU (ci/gpu-check runs it)
    ... --batch N --rounds R --json PATH

One training iteration (``solver.step(1)``) of ResNet-50 (tests/data, DummyData in place
of its LMDB) with an in-place NaNGuard (warn, both passes) after every layer but data and
loss (227 guards), against the same net without them, variants interleaved round by
round in a rotating order, each timed alone:

* ``plain``: no guard;
* ``guards, deferred``: checks deferred (``SAFE_LAYERS_CHECKS=deferred``; the GPU
  default): fault flags stay on the device, read twice per iteration;
* ``guards, at once``: checks answered at once (the CPU default): one host read per
  check, 454 per iteration (on a GPU each one drains the stream);
* CPU only, ``guards, at once, bare``: the same with the deferred machinery switched off
  (the board's pass bookkeeping around each layer call and the read counter), which is
  what every guard cost before it existed: the ratio of the two is what the machinery
  costs the CPU default.

CPU: CPU seconds of this process (time.process_time) with one BLAS thread, as
bench/bench_watch.py measures (idle OpenBLAS threads spin for a time that depends on the
machine's load). GPU: wall time with the device synchronised before and after each step.
Each variant also reports its host reads per iteration (safe_layers.kernels.xp.HOST_READS).
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

if "--gpu" not in sys.argv:
    for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(_name, "1")
os.environ.setdefault("GLOG_minloglevel", "2")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

#: Every line printed, and the figures by name, for --json (ci/gpu-check's report).
FIGURES = {"text": []}


def out(line):
    print(line, flush=True)
    FIGURES["text"].append(line)


@contextlib.contextmanager
def bare_guards():
    """The guards without the deferred machinery: no board bookkeeping, no read counting,
    every check at once (what a guard did before deferred checks existed)."""
    from safe_layers.core import backend
    from safe_layers import reporting
    from safe_layers.kernels import xp
    saved = reporting.FaultLog.running, xp.HOST_READS.add, backend.deferred_checks
    reporting.FaultLog.running = lambda self, kind: contextlib.nullcontext()
    xp.HOST_READS.add = lambda: None
    backend.deferred_checks = lambda array: False
    try:
        yield
    finally:
        reporting.FaultLog.running, xp.HOST_READS.add, backend.deferred_checks = saved


def machinery_per_call(number=200000):
    """Seconds per guard call of what the deferred machinery adds to a check at once: the
    policy lookup, the board's context around the call, the read counter."""
    import timeit
    import numpy
    from safe_layers.core import backend
    from safe_layers import reporting
    from safe_layers.kernels import xp
    log = reporting.FaultLog("NaNGuard", "bench")
    array = numpy.zeros(4, numpy.float32)

    def added():
        backend.deferred_checks(array)
        with log.running("forward"):
            xp.HOST_READS.add()
    return min(timeit.repeat(added, number=number, repeat=5)) / number


def build(gpu, batch, folder):
    import caffe
    from support.guarded import guard_every_layer
    from support.published import published_net
    text = published_net("resnet50_train_val.prototxt", data="dummy", batch=batch, phase_only="TRAIN")
    guarded, guards = guard_every_layer(text)
    variants = [("plain", text, None), ("guards, deferred", guarded, "deferred"),
                ("guards, at once", guarded, "immediate")]
    if not gpu:
        variants.append(("guards, at once, bare", guarded, "bare"))
    solvers = {}
    for label, net_text, _ in variants:
        tag = label.replace(", ", "_").replace(" ", "_")
        net_path = os.path.join(folder, tag + ".prototxt")
        with open(net_path, "w") as f:
            f.write(net_text)
        solver_path = os.path.join(folder, tag + "_solver.prototxt")
        with open(solver_path, "w") as f:
            f.write('net: "%s"\nbase_lr: 0.01\nmomentum: 0.9\nweight_decay: 0.0001\nlr_policy: "fixed"\n'
                    'max_iter: 1000000\ndisplay: 0\nrandom_seed: 1\nsolver_mode: %s\n'
                    % (net_path, "GPU" if gpu else "CPU"))
        solvers[label] = caffe.get_solver(solver_path)
    return variants, solvers, guards


def bench_resnet50(gpu, batch, rounds):
    from safe_layers.core import backend
    from safe_layers.kernels import xp
    sync = lambda: None  # noqa: E731
    clock = time.process_time
    if gpu:
        import cupy
        sync = cupy.cuda.Device().synchronize
        clock = time.perf_counter
    folder = tempfile.mkdtemp(prefix="bench_deferred_")
    variants, solvers, guards = build(gpu, batch, folder)
    policies = {label: policy for label, _, policy in variants}

    def step(label):
        policy = policies[label]
        backend.set_checks("immediate" if policy == "bare" else policy)
        with bare_guards() if policy == "bare" else contextlib.nullcontext():
            sync()
            start = clock()
            solvers[label].step(1)
            sync()
            return clock() - start

    reads = {}
    for label in policies:
        for _ in range(3):  # warm-up; a deferred board learns its passes in two iterations
            step(label)
        before = xp.HOST_READS.count
        step(label)
        reads[label] = xp.HOST_READS.count - before
    times = {label: [] for label in policies}
    labels = list(policies)
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            times[label].append(step(label))
    backend.set_checks(None)
    device = "GPU" if gpu else "CPU"
    unit = "ms wall, device synchronised" if gpu else "ms of CPU time, 1 BLAS thread"
    out("== ResNet-50 training iteration on %s (batch %d, %d NaNGuards), best of %d rounds (%s)"
        % (device, batch, guards, rounds, unit))
    plain = times["plain"]
    for label in labels:
        best = min(times[label])
        paired = statistics.median(t / p for t, p in zip(times[label], plain))
        FIGURES["resnet50 %s %s" % (device, label)] = {
            "best_ms": best * 1e3, "vs_plain_best": best / min(plain), "vs_plain_median": paired,
            "host_reads_per_iteration": reads[label]}
        out("  %-24s %9.1f ms  %+6.1f %% best vs best, %+6.1f %% median of rounds; %4d host reads/iteration"
            % (label, best * 1e3, (best / min(plain) - 1) * 100, (paired - 1) * 100, reads[label]))
    if "guards, at once, bare" in times:
        bare, shipped = times["guards, at once, bare"], times["guards, at once"]
        ratio = statistics.median(s / b for s, b in zip(shipped, bare))
        FIGURES["resnet50 CPU machinery"] = {"at_once_vs_bare_median": ratio,
                                             "at_once_vs_bare_best": min(shipped) / min(bare)}
        out("  the deferred machinery on the CPU default (at once vs at once, bare): %+.1f %% best vs "
            "best, %+.1f %% median of rounds" % ((min(shipped) / min(bare) - 1) * 100, (ratio - 1) * 100))
        per_call = machinery_per_call()
        calls = reads["guards, at once"]  # one check per guard and pass
        FIGURES["resnet50 CPU machinery per call"] = {"microseconds": per_call * 1e6,
                                                      "of_plain_iteration": per_call * calls / min(plain)}
        out("  the machinery alone, timed per guard call: %.2f us; x %d calls = %.2f ms, %.2f %% of "
            "the plain iteration" % (per_call * 1e6, calls, per_call * calls * 1e3,
                                     100 * per_call * calls / min(plain)))
    deferred, at_once = times["guards, deferred"], times["guards, at once"]
    ratio = statistics.median(d / a for d, a in zip(deferred, at_once))
    FIGURES["resnet50 %s deferred vs at once" % device] = {"median": ratio,
                                                          "best": min(deferred) / min(at_once)}
    out("  deferred vs at once: %.3f best vs best, %.3f median of rounds" % (min(deferred) / min(at_once),
                                                                            ratio))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="Caffe and the layers on the GPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on GPU, 2 on CPU")
    parser.add_argument("--rounds", type=int, default=None, help="default: 7 on GPU, 5 on CPU")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args()
    if args.gpu:
        from safe_layers.core import backend
        count, reason = backend.gpu_devices()
        if not count:
            sys.exit("bench: no GPU figures: %s" % reason)
        backend.set_mode_gpu(0)
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(0)
        FIGURES["device"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    bench_resnet50(args.gpu, args.batch or (32 if args.gpu else 2), args.rounds or (7 if args.gpu else 5))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(FIGURES, f, indent=2)


if __name__ == "__main__":
    main()
