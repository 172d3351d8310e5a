"""Reading, linting and hardening very large nets: the cost must grow with the file, not
with its square (the position index once counted newlines from the start for every field).

    python bench/bench_big_nets.py [--layers 8000 16000 32000]

Writes nets of N layers (Convolution + ReLU pairs after an Input), then times, each in its
own process: `safe-layers lint --no-shapes` and `safe-layers harden -o /dev/null`.
Prints one row per size, and the ratio of each time to the smallest size's (linear: the
ratio of the sizes).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time


def write_net(path, layers):
    with open(path, "w") as f:
        f.write('name: "big"\nlayer { name: "data" type: "Input" top: "data"\n'
                '  input_param { shape { dim: 1 dim: 1 dim: 8 dim: 8 } } }\n')
        previous = "data"
        for i in range((layers - 1) // 2):
            f.write('layer {\n  name: "conv%d"\n  type: "Convolution"\n  bottom: "%s"\n'
                    '  top: "conv%d"\n  convolution_param { num_output: 1 kernel_size: 1 }\n}\n'
                    % (i, previous, i))
            f.write('layer { name: "relu%d" type: "ReLU" bottom: "conv%d" top: "conv%d" }\n'
                    % (i, i, i))
            previous = "conv%d" % i


def timed(command):
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode not in (0, 1):
        raise SystemExit("%s failed (%d): %s" % (" ".join(command), result.returncode,
                                                 result.stderr[-2000:]))
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8000, 16000, 32000])
    args = parser.parse_args()
    cli = [sys.executable, "-m", "safe_layers.tools.cli"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for layers in args.layers:
            net = os.path.join(folder, "net%d.prototxt" % layers)
            write_net(net, layers)
            size = os.path.getsize(net)
            lint = timed(cli + ["lint", "--no-shapes", net])
            harden = timed(cli + ["harden", net, "-o", "/dev/null"])
            rows.append((layers, size, lint, harden))
    base = rows[0]
    print("%8s %9s %9s %7s %9s %7s" % ("layers", "MB", "lint s", "x", "harden s", "x"))
    for layers, size, lint, harden in rows:
        print("%8d %9.1f %9.2f %7.2f %9.2f %7.2f" % (layers, size / 1e6, lint, lint / base[2],
                                                      harden, harden / base[3]))


if __name__ == "__main__":
    main()
