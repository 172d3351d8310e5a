"""NaNGuard speed, as ratios measured in one run (these machines are noisy).

    .venv/bin/python bench/bench_nan_guard.py            # CPU check + LeNet overhead
    .venv/bin/python bench/bench_nan_guard.py --gpu-only # CuPy fused check vs bandwidth

1. The fast finiteness check on a 64 MB float32 array, against x.sum(),
   np.isfinite(x).all() and np.isnan(x).any(). Targets: >= 90 % of x.sum() throughput
   and >= 1.3x np.isfinite(x).all().
2. One CPU training iteration (caffe.SGDSolver.step) of a LeNet-size net, with a NaNGuard
   after every layer vs without. Target: <= 10 % added.
3. (--gpu / --gpu-only, needs CuPy and a GPU) the fused device check on blobs >= 64 MB
   against a device-to-device copy and the card's theoretical bandwidth. Target: >= 80 %.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from safe_layers.kernels import finite  # noqa: E402


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
    print("== CuPy fused check on %s (theoretical %s GB/s)" % (name, "%.0f" % peak if peak else "unknown"))

    def device_seconds(fn):
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

    for mb in megabytes:
        x = cupy.random.standard_normal(mb * 2**20 // 4, dtype=cupy.float32)
        y = cupy.empty_like(x)
        gb = x.nbytes / 1e9
        check = device_seconds(lambda: finite.all_finite(x))  # includes its one host scalar
        kernel = device_seconds(lambda: finite._device_max_abs(x))
        copy = device_seconds(lambda: y.__setitem__(Ellipsis, x))  # reads + writes 2x bytes
        total = device_seconds(lambda: x.sum())
        copy_bw = 2 * gb / copy
        of_peak = "%.0f %% of peak" % (100 * gb / check / peak) if peak else "peak unknown"
        print("  %5d MB: all_finite %.0f GB/s (%s, %.0f %% of a device copy's %.0f GB/s); "
              "kernel alone %.0f GB/s; cupy.sum %.0f GB/s (target >= 80 %%)"
              % (mb, gb / check, of_peak, 100 * gb / check / copy_bw, copy_bw, gb / kernel, gb / total))


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
    parser.add_argument("--gpu", action="store_true", help="also run the CuPy benchmark")
    parser.add_argument("--gpu-only", action="store_true", help="only the CuPy benchmark")
    args = parser.parse_args()
    if not args.gpu_only:
        bench_host_check()
        bench_lenet()
    if args.gpu or args.gpu_only:
        bench_device()


if __name__ == "__main__":
    main()
