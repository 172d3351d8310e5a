"""NaNGuard speed, as ratios measured in one run (these machines are noisy).

    .venv/bin/python bench/bench_nan_guard.py            # CPU check + LeNet overhead
    .venv/bin/python bench/bench_nan_guard.py --gpu-only # the GPU figures (ci/gpu-check runs it)
    ... --layers-cpu                                     # the layer comparison in CPU mode
    ... --json PATH                                      # also write the figures as JSON

1. The fast finiteness check on a 64 MB float32 array, against x.sum(),
   np.isfinite(x).all() and np.isnan(x).any(). Targets: >= 90 % of x.sum() throughput
   and >= 1.3x np.isfinite(x).all().
2. One CPU training iteration (caffe.SGDSolver.step) of a LeNet-size net, with a NaNGuard
   after every layer vs without. Target: <= 10 % added.
3. (--gpu / --gpu-only, needs CuPy, a GPU and a CUDA build of Caffe)
   a. the fused device check on blobs >= 64 MB against a device-to-device copy and the
      card's theoretical bandwidth. Target: >= 80 %;
   b. a NaNGuard on a big blob in a real net: zero-copy CuPy arrays against the host
      round trip (the fallback: pycaffe's .data, i.e. device->host->device);
   c. each layer against the Caffe CUDA layer it replaces, in one net each, forward +
      backward: StableBatchNorm vs BatchNorm, SafeInfogainLoss vs Softmax+InfogainLoss,
      GradientClip and NaNGuard vs the same net without them.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from safe_layers.kernels import finite  # noqa: E402

#: Every line printed, and the figures by name, for --json (ci/gpu-check's report).
FIGURES = {"text": []}


def out(line):
    print(line, flush=True)
    FIGURES["text"].append(line)


def best_seconds(fn, repeat, number=1):
    """Best wall time of `number` calls, over `repeat` rounds (the least disturbed round)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def bench_host_check(megabytes=64, repeat=30):
    x = np.random.default_rng(0).standard_normal(megabytes * 2**20 // 4).astype(np.float32)
    gb = x.nbytes / 1e9
    candidates = {
        "x.sum()": lambda: x.sum(),
        "np.isfinite(x).all()": lambda: np.isfinite(x).all(),
        "np.isnan(x).any()": lambda: np.isnan(x).any(),
        "finite.all_finite(x)": lambda: finite.all_finite(x),
        "finite.all_finite(x, max_abs)": lambda: finite.all_finite(x, max_abs=1e4),
    }
    # Interleave the candidates round by round so drift hits them all alike.
    best = {name: float("inf") for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            best[name] = min(best[name], best_seconds(fn, 1))
    print("== fast check, %d MB float32 (best of %d, GB/s)" % (megabytes, repeat))
    for name, seconds in best.items():
        print("  %-32s %6.1f GB/s" % (name, gb / seconds))
    fast = best["finite.all_finite(x)"]
    print("  all_finite vs x.sum():              %.2f of its throughput (target >= 0.90)"
          % (best["x.sum()"] / fast))
    print("  all_finite vs np.isfinite(x).all(): %.2fx faster (target >= 1.3)"
          % (best["np.isfinite(x).all()"] / fast))
    print("  all_finite vs np.isnan(x).any():    %.2fx faster" % (best["np.isnan(x).any()"] / fast))
    print("  with max_abs=1e4 (dot pre-check):   %.2f of x.sum() throughput"
          % (best["x.sum()"] / best["finite.all_finite(x, max_abs)"]))


LENET = """
name: "LeNet"
layer { name: "mnist" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 64 dim: 1 dim: 28 dim: 28 } shape { dim: 64 }
    data_filler { type: "uniform" min: 0 max: 1 } data_filler { type: "constant" value: 3 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 20 kernel_size: 5 weight_filler { type: "xavier" } } }
G:conv1
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
G:pool1
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 50 kernel_size: 5 weight_filler { type: "xavier" } } }
G:conv2
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
G:pool2
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } } }
G:ip1
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
G:ip1
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
G:ip2
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def _lenet(guarded):
    lines, n = [], 0
    for line in LENET.splitlines():
        if line.startswith("G:"):
            if guarded:
                blob = line[2:]
                n += 1
                lines.append('layer { name: "g%d" type: "Python" bottom: "%s" top: "%s" '
                             'python_param { module: "safe_layers" layer: "NaNGuard" '
                             'param_str: "{name: g%d, action: abort}" } }' % (n, blob, blob, n))
            continue
        lines.append(line)
    return "\n".join(lines), n


def bench_lenet(rounds=15, iters=10):
    os.environ.setdefault("GLOG_minloglevel", "2")
    import caffe
    caffe.set_mode_cpu()
    tmp = tempfile.mkdtemp(prefix="bench_nan_guard_")
    solvers, guards = {}, 0
    for label, guarded in (("plain", False), ("guarded", True)):
        text, n = _lenet(guarded)
        guards = max(guards, n)
        net_path = os.path.join(tmp, label + ".prototxt")
        with open(net_path, "w") as f:
            f.write(text)
        solver_path = os.path.join(tmp, label + "_solver.prototxt")
        with open(solver_path, "w") as f:
            f.write('net: "%s"\nbase_lr: 0.01\nmomentum: 0.9\nlr_policy: "fixed"\n'
                    'max_iter: 100000\ndisplay: 0\nrandom_seed: 1\nsolver_mode: CPU\n' % net_path)
        solvers[label] = caffe.SGDSolver(solver_path)
        solvers[label].step(3)  # warm-up: allocations, BLAS threads
    times = {"plain": [], "guarded": []}
    for round_ in range(rounds):
        # Alternate which net goes first, so neither always runs on a warmer machine.
        for label in (("plain", "guarded") if round_ % 2 == 0 else ("guarded", "plain")):
            start = time.perf_counter()
            solvers[label].step(iters)
            times[label].append((time.perf_counter() - start) / iters)
    plain, guarded = min(times["plain"]), min(times["guarded"])
    ratios = [g / p for p, g in zip(times["plain"], times["guarded"])]
    print("== LeNet (batch 64) CPU training iteration, %d NaNGuards (forward + backward checks)" % guards)
    print("  plain   %.2f ms/iter (best of %d x %d iterations)" % (plain * 1e3, rounds, iters))
    print("  guarded %.2f ms/iter" % (guarded * 1e3))
    print("  added: %+.1f %% best vs best, %+.1f %% median of paired rounds (target <= 10 %%)"
          % ((guarded / plain - 1) * 100, (statistics.median(ratios) - 1) * 100))


def bench_device(megabytes=(64, 256, 1024), repeat=20):
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    peak = _theoretical_bandwidth(cupy, props)
    FIGURES["device"] = name
    out("== CuPy fused check on %s (theoretical %s GB/s)" % (name, "%.0f" % peak if peak else "unknown"))

    for mb in megabytes:
        x = cupy.random.standard_normal(mb * 2**20 // 4, dtype=cupy.float32)
        y = cupy.empty_like(x)
        gb = x.nbytes / 1e9
        check = _device_seconds(cupy, lambda: finite.all_finite(x), repeat)  # with its host scalar
        kernel = _device_seconds(cupy, lambda: finite._device_max_abs(x), repeat)
        copy = _device_seconds(cupy, lambda: y.__setitem__(Ellipsis, x), repeat)  # reads + writes 2x
        total = _device_seconds(cupy, lambda: x.sum(), repeat)
        copy_bw = 2 * gb / copy
        FIGURES["check_%dMB" % mb] = {
            "all_finite_GBps": gb / check, "kernel_GBps": gb / kernel, "copy_GBps": copy_bw,
            "sum_GBps": gb / total, "of_peak": gb / check / peak if peak else None,
            "of_copy": gb / check / copy_bw}
        of_peak = "%.0f %% of peak" % (100 * gb / check / peak) if peak else "peak unknown"
        out("  %5d MB: all_finite %.0f GB/s (%s, %.0f %% of a device copy's %.0f GB/s); "
            "kernel alone %.0f GB/s; cupy.sum %.0f GB/s (target >= 80 %%)"
            % (mb, gb / check, of_peak, 100 * gb / check / copy_bw, copy_bw, gb / kernel, gb / total))


def _device_seconds(cupy, fn, repeat):
    """Best time of ``fn`` between two CUDA events (after one warm-up call)."""
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    fn()
    best = float("inf")
    for _ in range(repeat):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return best


BIG_GUARD = """
name: "zero_copy"
force_backward: true
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: %d dim: 1024 } } }
layer { name: "g" type: "Python" bottom: "x" top: "x"
  python_param { module: "safe_layers" layer: "NaNGuard" param_str: "{name: g, action: clamp}" } }
"""


def bench_zero_copy(megabytes=(64, 256), rounds=10):
    """A NaNGuard on a big blob: device arrays vs pycaffe's host arrays (device->host->device)."""
    import caffe
    from safe_layers.core import backend
    for mb in megabytes:
        times = {}
        for label in ("zero-copy", "host round trip"):
            net = _net_from_text(caffe, BIG_GUARD % (mb * 2**20 // 4 // 1024))
            original = backend._device_array
            if label == "host round trip":
                backend._device_array = lambda blob, attr: None
            try:
                net.forward()
                times[label] = _timed(lambda: net.forward(), rounds, gpu=True)
            finally:
                backend._device_array = original
        ratio = times["host round trip"] / times["zero-copy"]
        FIGURES["zero_copy_%dMB" % mb] = {"zero_copy_ms": times["zero-copy"] * 1e3,
                                           "host_round_trip_ms": times["host round trip"] * 1e3,
                                           "speedup": ratio}
        out("== NaNGuard forward on a %d MB blob: zero-copy %.2f ms, host round trip %.2f ms: %.1fx"
            % (mb, times["zero-copy"] * 1e3, times["host round trip"] * 1e3, ratio))


# Each pair: (name, Caffe's net, ours) over xs, a learnably scaled N x C x H x W input (so
# backward reaches it without force_backward, which would send InfogainLoss a gradient
# for H and abort).
LAYER_PAIRS = [
    ("StableBatchNorm vs BatchNorm", """
layer { name: "bn" type: "BatchNorm" bottom: "xs" top: "y" }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "xs" top: "l" }""", """
layer { name: "bn" type: "Python" bottom: "xs" top: "y"
  param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 }
  python_param { module: "safe_layers" layer: "StableBatchNorm" param_str: "{name: bn}" } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "xs" top: "l" }"""),
    ("SafeInfogainLoss vs Softmax + InfogainLoss", """
layer { name: "p" type: "Softmax" bottom: "xs" top: "p" }
layer { name: "loss" type: "InfogainLoss" bottom: "p" bottom: "label" bottom: "H" top: "l"
  propagate_down: true propagate_down: false propagate_down: false }""", """
layer { name: "loss" type: "Python" bottom: "xs" bottom: "label" bottom: "H" top: "l" loss_weight: 1
  propagate_down: true propagate_down: false propagate_down: false
  python_param { module: "safe_layers" layer: "SafeInfogainLoss" param_str: "{name: loss}" } }"""),
    ("GradientClip vs none", """
layer { name: "loss" type: "EuclideanLoss" bottom: "xs" bottom: "x2" top: "l" }""", """
layer { name: "clip" type: "Python" bottom: "xs" top: "xs"
  python_param { module: "safe_layers" layer: "GradientClip" param_str: "{name: clip, max_norm: 10}" } }
layer { name: "loss" type: "EuclideanLoss" bottom: "xs" bottom: "x2" top: "l" }"""),
    ("NaNGuard vs none", """
layer { name: "loss" type: "EuclideanLoss" bottom: "xs" bottom: "x2" top: "l" }""", """
layer { name: "g" type: "Python" bottom: "xs" top: "xs"
  python_param { module: "safe_layers" layer: "NaNGuard" param_str: "{name: g, action: clamp}" } }
layer { name: "loss" type: "EuclideanLoss" bottom: "xs" bottom: "x2" top: "l" }"""),
]


def _layer_net(body, n, c, hw):
    return """name: "pair"
layer { name: "in" type: "Input" top: "x" top: "x2" top: "label" top: "H"
  input_param { shape { dim: %d dim: %d dim: %d dim: %d } shape { dim: %d dim: %d dim: %d dim: %d }
                shape { dim: %d dim: 1 dim: %d dim: %d } shape { dim: 1 dim: 1 dim: %d dim: %d } } }
layer { name: "scale" type: "Scale" bottom: "x" top: "xs" scale_param { axis: 0 num_axes: 0 } }
""" % (n, c, hw, hw, n, c, hw, hw, n, hw, hw, c, c) + body


def bench_layers(gpu, n=32, c=64, hw=28, rounds=10):
    """Forward + backward of each of our layers against the Caffe layer it replaces."""
    import caffe
    import numpy as np
    out("== layers vs the Caffe %s layers they replace (N x C x H x W = %d x %d x %d x %d, forward + backward)"
        % ("CUDA" if gpu else "CPU", n, c, hw, hw))
    rng = np.random.default_rng(0)
    for name, theirs, ours in LAYER_PAIRS:
        times = {}
        for label, body in (("caffe", theirs), ("ours", ours)):
            net = _net_from_text(caffe, _layer_net(body, n, c, hw))
            net.blobs["x"].data[...] = rng.standard_normal(net.blobs["x"].shape)
            net.blobs["x2"].data[...] = rng.standard_normal(net.blobs["x2"].shape)
            net.blobs["label"].data[...] = rng.integers(0, c, net.blobs["label"].shape)
            net.blobs["H"].data[...] = np.eye(c)

            def step():
                net.forward()
                net.backward()
            step()
            times[label] = _timed(step, rounds, gpu=gpu)
        ratio = times["ours"] / times["caffe"]
        FIGURES["layer " + name] = {"caffe_ms": times["caffe"] * 1e3, "ours_ms": times["ours"] * 1e3,
                                    "ratio": ratio}
        out("  %-42s Caffe %7.2f ms, ours %7.2f ms: %.2fx" % (name, times["caffe"] * 1e3,
                                                             times["ours"] * 1e3, ratio))


def _net_from_text(caffe, text):
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
        f.write(text)
    try:
        return caffe.Net(f.name, caffe.TRAIN)
    finally:
        os.unlink(f.name)


def _timed(fn, rounds, gpu):
    """Best wall time of ``fn`` over ``rounds`` (the device synchronised after each)."""
    sync = (lambda: None)
    if gpu:
        import cupy
        sync = cupy.cuda.Device().synchronize
    best = float("inf")
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _theoretical_bandwidth(cupy, props):
    """GB/s from the memory clock (kHz, double data rate) and bus width (bits), or None.

    CUDA 13 dropped memoryClockRate from cudaDeviceProp; the device attribute
    (cudaDevAttrMemoryClockRate = 36, cudaDevAttrGlobalMemoryBusWidth = 37) may remain.
    """
    clock, width = props.get("memoryClockRate"), props.get("memoryBusWidth")
    try:
        clock = clock or cupy.cuda.runtime.deviceGetAttribute(36, 0)
        width = width or cupy.cuda.runtime.deviceGetAttribute(37, 0)
    except Exception:  # noqa: BLE001 - an attribute this CUDA no longer has
        return None
    return 2 * clock * 1e3 * width / 8 / 1e9 if clock and width else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="also run the GPU benchmarks")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU benchmarks")
    parser.add_argument("--layers-cpu", action="store_true",
                        help="only the layer comparison, with Caffe in CPU mode")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args()
    os.environ.setdefault("GLOG_minloglevel", "2")
    if args.layers_cpu:
        bench_layers(gpu=False, rounds=3)
    elif not args.gpu_only:
        bench_host_check()
        bench_lenet()
    if args.gpu or args.gpu_only:
        from safe_layers.core import backend
        count, reason = backend.gpu_devices()
        if not count:
            sys.exit("bench: no GPU figures: %s" % reason)
        backend.set_mode_gpu(0)
        bench_device()
        bench_zero_copy()
        bench_layers(gpu=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(FIGURES, f, indent=2)


if __name__ == "__main__":
    main()
