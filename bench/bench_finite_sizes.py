"""The finite check against x.sum() and np.isfinite(x).all(), from 4 KB to 256 MB.

    .venv/bin/python bench/bench_finite_sizes.py [--plot bench/figures/finite_check_sizes.png]

For each size (float32, doubling from 4 KB to 256 MB) the three candidates run round by
round, interleaved (drift hits them alike), and each keeps its best time; the figures are
ratios within one size, measured in one run. Printed as a table (the lines BENCHMARKS.md
quotes) and, with --plot, drawn as throughput against size (log-log).
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from safe_layers.kernels import finite  # noqa: E402

CANDIDATES = ("x.sum()", "np.isfinite(x).all()", "finite.all_finite(x)")


def measure(nbytes, budget_seconds=0.4, min_rounds=5):
    """{candidate: best seconds} on an array of ``nbytes`` of float32 gaussian values."""
    x = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
    calls = {
        "x.sum()": lambda: x.sum(),
        "np.isfinite(x).all()": lambda: np.isfinite(x).all(),
        "finite.all_finite(x)": lambda: finite.all_finite(x),
    }
    assert finite.all_finite(x)
    # Small arrays: time a batch of calls per round so timer resolution does not dominate.
    start = time.perf_counter()
    calls["x.sum()"]()
    once = max(time.perf_counter() - start, 1e-7)
    number = max(1, int(1e-3 / once))
    best = {name: float("inf") for name in calls}
    deadline = time.perf_counter() + budget_seconds
    rounds = 0
    while rounds < min_rounds or time.perf_counter() < deadline:
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(number):
                call()
            best[name] = min(best[name], (time.perf_counter() - start) / number)
        rounds += 1
    return best


def human(nbytes):
    for unit, size in (("MB", 2**20), ("KB", 2**10)):
        if nbytes >= size:
            return "%d %s" % (nbytes // size, unit)
    return "%d B" % nbytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plot", metavar="PNG", help="draw throughput against size")
    parser.add_argument("--max-mb", type=int, default=256)
    args = parser.parse_args()
    sizes = []
    nbytes = 4 * 2**10
    while nbytes <= args.max_mb * 2**20:
        sizes.append(nbytes)
        nbytes *= 2
    rows = []
    print("%8s  %10s %10s %10s   %s   %s" % ("size", "sum GB/s", "isfin GB/s", "ours GB/s",
                                            "ours/sum", "isfinite/ours"))
    for nbytes in sizes:
        best = measure(nbytes)
        rate = {name: nbytes / 1e9 / seconds for name, seconds in best.items()}
        rows.append((nbytes, rate))
        print("%8s  %10.1f %10.1f %10.1f   %7.2f   %12.2f"
              % (human(nbytes), rate["x.sum()"], rate["np.isfinite(x).all()"],
                 rate["finite.all_finite(x)"], rate["finite.all_finite(x)"] / rate["x.sum()"],
                 best["np.isfinite(x).all()"] / best["finite.all_finite(x)"]), flush=True)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        figure, ax = plt.subplots(figsize=(6.4, 4))
        for name, style in zip(CANDIDATES, ("k--", "b-", "r-")):
            ax.plot([r[0] for r in rows], [r[1][name] for r in rows], style, marker=".", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes[::2])
        ax.set_xticklabels([human(s) for s in sizes[::2]], rotation=45)
        ax.set_xlabel("array size (float32)")
        ax.set_ylabel("throughput, GB/s (best of rounds)")
        ax.set_title("finite check on the CPU: finite.all_finite vs NumPy")
        ax.legend()
        figure.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        figure.savefig(args.plot, dpi=100)
        print("wrote %s" % args.plot)


if __name__ == "__main__":
    main()
