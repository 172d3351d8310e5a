"""Speed and memory of `safe-layers diagnose` and `safe-layers scan`, on inputs made here
(in a temporary directory, removed afterwards).

    .venv/bin/python bench/bench_tools.py                  # 1 GB log, 100k-record LMDB
    .venv/bin/python bench/bench_tools.py --log-mb 100 --records 10000   # quicker

1. diagnose on a generated Caffe log with debug_info (a 20-layer net's Forward/Backward
   lines every iteration, train outputs, lr, a test pass every 500 iterations; the loss
   explodes near the end): MB/s, and peak memory of the process for the full log
   against a log 1/100 of its size (flat memory: the ratio stays near 1). The floor is
   Python reading the same file line by line.
2. scan on an LMDB of N CIFAR-size Datums (3x32x32 uint8, keys %08d, as Caffe's convert
   tools write them): records/s, and peak memory for N records against N/10. The floor
   is a bare LMDB cursor walk in Python. LMDB is memory-mapped: pages read count in the
   process's resident set as file cache (RssFile), which the kernel drops at will; what
   the scan itself holds is RssAnon.

Every figure is one process run as a child, timed by wall clock; peak memory is the
child's ru_maxrss and the largest RssAnon/RssFile sampled from /proc every 20 ms.
"""

import argparse
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ---------------------------------------------------------------------------------------
# Inputs.

LAYERS = ["data", "conv1", "bn1", "relu1", "pool1", "conv2", "bn2", "relu2", "pool2", "conv3",
          "bn3", "relu3", "pool3", "fc4", "relu4", "drop4", "fc5", "relu5", "fc6", "loss"]
PARAM_LAYERS = {"conv1", "conv2", "conv3", "fc4", "fc5", "fc6", "bn1", "bn2", "bn3"}


def _prefix(severity, second, micro, source):
    return "%s20261125 %02d:%02d:%02d.%06d  4242 %s] " % (
        severity, (second // 3600) % 24, (second // 60) % 60, second % 60, micro, source)


def write_log(path, megabytes, explode_at_fraction=0.97, seed=0):
    """A Caffe training log of about ``megabytes`` MB with debug_info on every iteration;
    the loss grows tenfold per iteration over the last ~3 % and then turns inf/nan.
    Returns the number of iterations written."""
    rng = random.Random(seed)
    target = megabytes * 1_000_000
    iteration, written = 0, 0
    header = ("I20261125 00:00:00.000001  4242 solver.cpp:45] Initializing solver from parameters: \n"
              "base_lr: 0.1\ndisplay: 1\nmax_iter: 10000000\nlr_policy: \"fixed\"\ndebug_info: true\n"
              "net: \"bench.prototxt\"\n"
              "I20261125 00:00:00.000002  4242 solver.cpp:289] Solving bench\n")
    explode = None   # the iteration the loss starts to explode: once 97 % is written
    with open(path, "w", buffering=1 << 20) as f:
        f.write(header)
        written += len(header)
        scale = 1.0
        while written < target:
            second = iteration // 10
            lines = []
            if iteration % 500 == 0:
                lines.append(_prefix("I", second, 1, "solver.cpp:347") +
                             "Iteration %d, Testing net (#0)" % iteration)
                lines.append(_prefix("I", second, 2, "solver.cpp:414") +
                             "    Test net output #0: accuracy = %.6g" % rng.random())
                lines.append(_prefix("I", second, 3, "solver.cpp:414") +
                             "    Test net output #1: loss = %.6g (* 1 = %.6g loss)" % (2.0, 2.0))
            if explode is None and written > explode_at_fraction * target:
                explode = iteration
            if explode is not None:
                scale *= 10.0
            for layer in LAYERS:
                value = scale * rng.uniform(0.1, 2.0)
                text = "%.6g" % value if value < 3e38 else "inf"
                lines.append(_prefix("I", second, 100, "net.cpp:593") +
                             "    [Forward] Layer %s, top blob %s data: %s" % (layer, layer, text))
                if layer in PARAM_LAYERS:
                    lines.append(_prefix("I", second, 101, "net.cpp:605") +
                                 "    [Forward] Layer %s, param blob 0 data: %.6g" % (layer, rng.random()))
            for layer in reversed(LAYERS[1:]):
                value = scale * rng.uniform(1e-4, 1e-2)
                text = "%.6g" % value if value < 3e38 else "nan"
                lines.append(_prefix("I", second, 200, "net.cpp:621") +
                             "    [Backward] Layer %s, bottom blob %s diff: %s" % (layer, layer, text))
                if layer in PARAM_LAYERS:
                    lines.append(_prefix("I", second, 201, "net.cpp:632") +
                                 "    [Backward] Layer %s, param blob 0 diff: %s" % (layer, text))
            lines.append(_prefix("E", second, 300, "net.cpp:721") +
                         "    [Backward] All net params (data, diff): L1 norm = (%.6g, %.6g); "
                         "L2 norm = (%.6g, %.6g)" % (1e3, scale, 10.0, scale))
            loss = 2.3 * (0.999 ** min(iteration, explode if explode is not None else iteration)) * scale
            loss_text = "%.6g" % loss if loss < 3e38 else "-nan"
            lines.append(_prefix("I", second, 400, "solver.cpp:239") +
                         "Iteration %d (12.5 iter/s, 0.08s/1 iters), loss = %s" % (iteration, loss_text))
            lines.append(_prefix("I", second, 401, "solver.cpp:258") +
                         "    Train net output #0: loss = %s (* 1 = %s loss)" % (loss_text, loss_text))
            lines.append(_prefix("I", second, 402, "sgd_solver.cpp:112") + "Iteration %d, lr = 0.1" % iteration)
            chunk = "\n".join(lines) + "\n"
            f.write(chunk)
            written += len(chunk)
            iteration += 1
    return iteration


def write_lmdb(path, records, seed=0):
    import lmdb
    from caffe.proto import caffe_pb2
    rng = random.Random(seed)
    env = lmdb.open(path, map_size=1 << 34)
    payload = os.urandom(3 * 32 * 32 * 64)
    txn = env.begin(write=True)
    for i in range(records):
        d = caffe_pb2.Datum(channels=3, height=32, width=32, label=rng.randrange(10))
        offset = rng.randrange(0, len(payload) - 3072)
        d.data = payload[offset:offset + 3072]
        txn.put(b"%08d" % i, d.SerializeToString())
        if i % 10000 == 9999:
            txn.commit()
            txn = env.begin(write=True)
    txn.commit()
    env.close()


# ---------------------------------------------------------------------------------------
# Measuring a child process.

def _status_kb(pid, field):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(command, cwd=None):
    """(wall seconds, peak RSS MB, peak RssAnon MB, peak RssFile MB, returncode, CPU
    seconds) of a child. CPU seconds (user + system) tell the work done when other
    processes share the cores."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for field in peaks:
                value = _status_kb(proc.pid, field)
                if value:
                    peaks[field] = max(peaks[field], value)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    stderr = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    # os.waitstatus_to_exitcode is Python 3.9's.
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
    if code not in (0, 1):
        raise SystemExit("%s failed (%d):\n%s" % (" ".join(command), code, stderr[-2000:]))
    return (seconds, usage.ru_maxrss / 1024, peaks["RssAnon"] / 1024, peaks["RssFile"] / 1024, code,
            usage.ru_utime + usage.ru_stime)


def python_read_floor(path):
    code = ("import sys\nn = 0\nwith open(sys.argv[1], 'rb') as f:\n    for line in f:\n        n += 1\n")
    return measure([sys.executable, "-c", code, path])


def lmdb_walk_floor(path):
    code = ("import sys, lmdb\nenv = lmdb.open(sys.argv[1], readonly=True, lock=False)\nn = 0\n"
            "with env.begin() as txn:\n    for key, value in txn.cursor():\n        n += 1\n")
    return measure([sys.executable, "-c", code, path])


def cli(*args):
    return [sys.executable, "-m", "safe_layers.tools.cli", *args]


# ---------------------------------------------------------------------------------------

def bench_diagnose(work, megabytes):
    big = os.path.join(work, "big.log")
    small = os.path.join(work, "small.log")
    t0 = time.perf_counter()
    iterations = write_log(big, megabytes)
    write_log(small, max(1, megabytes // 100))
    size = os.path.getsize(big) / 1e6
    print("== diagnose: generated a %.0f MB log (%d iterations, debug_info on, %.0f s to write)"
          % (size, iterations, time.perf_counter() - t0))
    floor = python_read_floor(big)
    seconds, rss, anon, _, code, cpu = measure(cli("diagnose", big, "--format", "json"))
    _, rss_small, anon_small, _, _, _ = measure(cli("diagnose", small, "--format", "json"))
    print("  python line-by-line read (floor)  %7.1f MB/s  (%.1f s wall, %.1f s CPU)"
          % (size / floor[0], floor[0], floor[5]))
    print("  safe-layers diagnose              %7.1f MB/s  (%.1f s wall, exit %d); %.1f MB per CPU second"
          % (size / seconds, seconds, code, size / cpu))
    print("  diagnose / floor speed            %7.2f" % (floor[0] / seconds))
    print("  peak RSS: %.0f MB on %.0f MB, %.0f MB on %.0f MB (ratio %.2f)"
          % (rss, size, rss_small, os.path.getsize(small) / 1e6, rss / rss_small))
    print("  peak RssAnon: %.0f MB vs %.0f MB" % (anon, anon_small))
    return {"mb": size, "mb_s": size / seconds, "floor_mb_s": size / floor[0], "rss": rss,
            "rss_small": rss_small}


def bench_scan(work, records):
    big = os.path.join(work, "big_lmdb")
    small = os.path.join(work, "small_lmdb")
    t0 = time.perf_counter()
    write_lmdb(big, records)
    write_lmdb(small, max(1, records // 10))
    size = sum(os.path.getsize(os.path.join(big, n)) for n in os.listdir(big)) / 1e6
    print("== scan: an LMDB of %d Datums 3x32x32 uint8 (%.0f MB, %.0f s to write)"
          % (records, size, time.perf_counter() - t0))
    floor = lmdb_walk_floor(big)
    # Start-up (imports: pycaffe's caffe_pb2 brings in caffe, skimage, scipy) is paid once.
    startup = measure(cli("scan", big, "--format", "json", "--limit", "1"))
    seconds, rss, anon, rss_file, code, cpu = measure(cli("scan", big, "--format", "json",
                                                          "--num-classes", "10", "--batch-size", "64"))
    _, rss_small, anon_small, file_small, _, _ = measure(cli("scan", small, "--format", "json",
                                                             "--num-classes", "10", "--batch-size", "64"))
    print("  bare LMDB cursor walk (floor)     %9.0f records/s (%.2f s)" % (records / floor[0], floor[0]))
    print("  safe-layers scan                  %9.0f records/s (%.2f s wall, %.2f s CPU, exit %d)"
          % (records / seconds, seconds, cpu, code))
    print("  start-up alone (--limit 1)        %.2f s wall, %.2f s CPU" % (startup[0], startup[5]))
    if cpu - startup[5] > 0.2 * cpu:
        print("  scan without its start-up         %9.0f records per CPU second"
              % (records / (cpu - startup[5])))
    else:
        print("  scan without its start-up         n/a (start-up is most of the run: use more records)")
    print("  scan / floor speed                %9.2f" % (floor[0] / seconds))
    print("  peak RssAnon (what scan holds): %.0f MB for %d records, %.0f MB for %d (ratio %.2f)"
          % (anon, records, anon_small, max(1, records // 10), anon / anon_small))
    print("  peak RSS incl. mapped file pages: %.0f MB (RssFile %.0f MB) vs %.0f MB (RssFile %.0f MB)"
          % (rss, rss_file, rss_small, file_small))
    return {"records_s": records / seconds, "startup": startup[0], "anon": anon, "anon_small": anon_small}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-mb", type=int, default=1000, help="size of the generated log (MB)")
    parser.add_argument("--records", type=int, default=100000, help="records in the LMDB")
    parser.add_argument("--skip-diagnose", action="store_true")
    parser.add_argument("--skip-scan", action="store_true")
    args = parser.parse_args()
    print("machine: %s, %d cores, Python %s" % (platform.processor() or platform.machine(),
                                                 os.cpu_count(), platform.python_version()))
    work = tempfile.mkdtemp(prefix="bench-tools-")
    try:
        if not args.skip_diagnose:
            bench_diagnose(work, args.log_mb)
        if not args.skip_scan:
            bench_scan(work, args.records)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
