"""The steps of ``ci/gpu-check``, run by the bundle's Python once ci/gpu-check has wired
it to this machine's CUDA libraries and CuPy.

    python ci/gpu_check.py OUTDIR                 (a GPU machine)
    python ci/gpu_check.py --cpu-smoke OUTDIR     (no GPU: the bundle's pycaffe, CPU mode)

Steps, each with its own time limit, all run even when one fails:
1. ``gpu-tests``: every test marked gpu (``pytest -m gpu``, SAFE_LAYERS_REQUIRE_GPU=1:
   a skipped GPU test fails the run);
2. ``suite-gpu-mode``: the whole suite with Caffe in GPU mode (SAFE_LAYERS_TEST_MODE=gpu:
   the layers on device blobs, and no host copy by a Python layer);
3. ``caffe-train``: ``caffe train -gpu 0`` on the demo net (examples/pooling_nan):
   unguarded, NaNGuard abort, NaNGuard clamp, and clamp with ``solver_mode: GPU`` and
   no -gpu flag;
4. ``bench``: bench/bench_nan_guard.py --gpu-only (fused check vs device bandwidth,
   zero-copy vs host round trip, each layer vs the Caffe CUDA layer it replaces);
5. ``bench-deferred``: bench/bench_deferred.py --gpu (a ResNet-50 training step with a
   NaNGuard after every layer against the plain net, checks deferred and at once, with
   the host reads of each).

``GPU_CHECK_STEPS`` (comma-separated names from above) runs only those steps, for a
machine that gives one command less time than all of them take (their limits add up to
12 minutes); the report then covers those steps only.

Writes OUTDIR/gpu-report.json and OUTDIR/BENCHMARKS-gpu.md; exit 0 only if every step
passed and at least one GPU test ran.
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "pooling_nan"
GUARD = re.compile(r'layer \{\n  name: "pool1_guard".*?\n\}\n', re.S)
CAFFE = Path(sys.executable).parent / "caffe"
# Seconds per step: the GPU machines give one command 10 minutes.
LIMITS = {"gpu-tests": 150, "suite-gpu-mode": 240, "caffe-train": 60, "bench": 120,
          "bench-deferred": 150, "cpu-smoke": 1200}
STEPS = ("gpu-tests", "suite-gpu-mode", "caffe-train", "bench", "bench-deferred")


def say(text):
    print("gpu-check: " + text, flush=True)


def junit_counts(path):
    """tests/passed/failed/errors/skipped from a pytest junit XML file."""
    if not path.exists():
        return None
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [("%s::%s" % (case.get("classname"), case.get("name")))
              for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"run": counts["tests"] - counts["skipped"], "passed": counts["tests"] - counts["skipped"]
            - counts["failures"] - counts["errors"], "failed": counts["failures"] + counts["errors"],
            "skipped": counts["skipped"], "failed_tests": failed[:50]}


def run_pytest(name, outdir, args, env_extra):
    xml = outdir / ("%s.xml" % name)
    env = dict(os.environ, **env_extra)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(xml)] + args
    say("%s: %s (%s)" % (name, " ".join(command[2:]), " ".join("%s=%s" % kv for kv in env_extra.items())))
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, timeout=LIMITS.get(name, 300))
        status = result.returncode
    except subprocess.TimeoutExpired:
        status = "timeout after %d s" % LIMITS.get(name, 300)
    counts = junit_counts(xml) or {"run": 0, "passed": 0, "failed": 0, "skipped": 0, "failed_tests": []}
    ok = status == 0 and counts["run"] > 0 and counts["failed"] == 0
    return {"name": name, "ok": ok, "exit": status, "seconds": round(time.perf_counter() - start, 1), **counts}


def caffe_train(workdir, label, action, gpu_flag=True, solver_mode="CPU"):
    net = (DEMO / "train.prototxt").read_text()
    net = GUARD.sub("", net) if action is None else net.replace("action: clamp}", "action: %s}" % action)
    net_path = workdir / ("%s.prototxt" % label)
    net_path.write_text(net)
    solver = (DEMO / "solver.prototxt").read_text().replace("examples/pooling_nan/train.prototxt",
                                                         str(net_path))
    solver = solver.replace("solver_mode: CPU", "solver_mode: %s" % solver_mode)
    solver_path = workdir / ("%s_solver.prototxt" % label)
    solver_path.write_text(solver)
    command = [str(CAFFE), "train", "-solver", str(solver_path)] + (["-gpu", "0"] if gpu_flag else [])
    result = subprocess.run(command, capture_output=True, text=True, timeout=LIMITS["caffe-train"],
                            env=dict(os.environ, GLOG_minloglevel="0"))
    lines = result.stderr.splitlines()
    losses = [line.split("loss = ")[1] for line in lines if "solver.cpp" in line and ", loss = " in line]
    reports = [line for line in lines if "safe_layers]" in line]
    on_gpu = any("Using GPUs 0" in line or "GPU device" in line for line in lines)
    fallback = any("falling back to NumPy" in line for line in lines)
    return result.returncode, losses, reports, on_gpu, fallback, result.stderr[-1500:]


def step_caffe_train():
    start = time.perf_counter()
    checks, details = [], {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_train_") as tmp:
        workdir = Path(tmp)
        runs = {
            "unguarded": caffe_train(workdir, "unguarded", None),
            "abort": caffe_train(workdir, "abort", "abort"),
            "clamp": caffe_train(workdir, "clamp", "clamp"),
            "clamp, solver_mode GPU, no -gpu": caffe_train(workdir, "clamp_solver", "clamp", gpu_flag=False,
                                                           solver_mode="GPU"),
        }
    for label, (rc, losses, reports, on_gpu, fallback, tail) in runs.items():
        say("caffe train %s: exit %s, GPU %s, losses %s%s" % (label, rc, on_gpu, ", ".join(losses[:4]),
                                                              "; " + reports[0] if reports else ""))
        details[label] = {"exit": rc, "on_gpu": on_gpu, "host_fallback": fallback, "losses": losses,
                          "first_report": reports[0] if reports else None}
        if rc not in (0, 1) or not on_gpu or fallback:
            details[label]["tail"] = tail
    rc, losses, reports, *_ = runs["unguarded"]
    checks.append(("unguarded run trains with nan losses", rc == 0 and losses and all("nan" in x for x in losses)))
    rc, losses, reports, *_ = runs["abort"]
    checks.append(("abort stops at iteration 0 naming the guard", rc != 0 and any(
        "NaNGuard pool1_guard (after pool1)" in r and "iteration 0" in r for r in reports)))
    for label in ("clamp", "clamp, solver_mode GPU, no -gpu"):
        rc, losses, reports, *_ = runs[label]
        checks.append(("%s: finite losses" % label,
                       rc == 0 and losses and not any("nan" in x or "inf" in x for x in losses)))
    for label, (rc, losses, reports, on_gpu, fallback, tail) in runs.items():
        checks.append(("%s: Caffe on the GPU, layers on device arrays" % label, on_gpu and not fallback))
    for text, ok in checks:
        say("  %s %s" % ("ok  " if ok else "FAIL", text))
    return {"name": "caffe-train", "ok": all(ok for _, ok in checks), "run": len(checks),
            "passed": sum(bool(ok) for _, ok in checks), "failed": sum(not ok for _, ok in checks),
            "skipped": 0, "checks": [{"check": t, "ok": bool(ok)} for t, ok in checks], "runs": details,
            "seconds": round(time.perf_counter() - start, 1)}


def step_bench(outdir, name="bench", script="bench_nan_guard.py", args=("--gpu-only",)):
    path = outdir / ("%s-gpu.json" % name)
    command = [sys.executable, str(ROOT / "bench" / script)] + list(args) + ["--json", str(path)]
    say("%s: %s" % (name, " ".join(command[1:])))
    start = time.perf_counter()
    try:
        status = subprocess.run(command, cwd=ROOT, timeout=LIMITS[name]).returncode
    except subprocess.TimeoutExpired:
        status = "timeout after %d s" % LIMITS[name]
    figures = json.loads(path.read_text()) if path.exists() else {}
    return {"name": name, "ok": status == 0 and bool(figures), "exit": status, "figures": figures,
            "seconds": round(time.perf_counter() - start, 1)}


def selected_steps():
    """The steps GPU_CHECK_STEPS names (all by default); an unknown name is an error."""
    names = [n.strip() for n in os.environ.get("GPU_CHECK_STEPS", "").split(",") if n.strip()]
    unknown = sorted(set(names) - set(STEPS))
    if unknown:
        raise SystemExit("gpu-check: GPU_CHECK_STEPS names %s; allowed: %s"
                         % (", ".join(unknown), ", ".join(STEPS)))
    return names or list(STEPS)


def device_description():
    import cupy
    count = cupy.cuda.runtime.getDeviceCount()
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return {"count": count, "name": name, "compute_capability": "%d.%d" % (props["major"], props["minor"]),
            "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
            "driver": cupy.cuda.runtime.driverGetVersion(), "runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cupy": cupy.__version__}


def benchmarks_markdown(report):
    device = report.get("device") or {}
    text = []
    for name in ("bench", "bench-deferred"):
        step = next((s for s in report["steps"] if s["name"] == name), None)
        if step is not None:
            text += (step.get("figures") or {}).get("text", ["(no figures: the %s step did not finish)"
                                                             % name])
    lines = ["## GPU (ci/gpu-check)", "",
             "Machine: %s (sm %s, %s GiB), driver %s, CUDA runtime %s, CuPy %s; bundle commit %s; run of %s."
             % (device.get("name"), device.get("compute_capability"), device.get("memory_gib"),
                device.get("driver"), device.get("runtime"), device.get("cupy"), report["bundle_commit"][:12],
                report["date"]),
             "Reproduce: `make gpu-bundle` (a machine with registries), then `ci/gpu-check OUTDIR` on the GPU machine.",
             "", "```"] + (text or ["(no bench step ran)"]) + ["```", ""]
    tests = [s for s in report["steps"] if "run" in s]
    lines += ["| step | run | passed | failed | skipped |", "|---|---|---|---|---|"]
    lines += ["| %s | %d | %d | %d | %d |" % (s["name"], s["run"], s["passed"], s["failed"], s["skipped"])
              for s in tests]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="no GPU: check that the bundle's pycaffe runs (CPU mode); never a GPU result")
    args = parser.parse_args(argv)
    outdir = args.outdir.resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((Path(os.environ.get("PYTHONHOME", "")) .parent / "MANIFEST.json").read_text()) \
        if os.environ.get("PYTHONHOME") else {}
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "bundle_commit": manifest.get("commit", "unknown"), "python": sys.version.split()[0],
              "device": None, "steps": []}
    if args.cpu_smoke:
        report["mode"] = "cpu-smoke (no GPU: nothing here is a GPU result)"
        # The whole suite, Caffe in CPU mode: every package and library of the bundle used.
        report["steps"].append(run_pytest("cpu-smoke", outdir, [], {}))
    else:
        report["mode"] = "gpu"
        try:
            report["device"] = device_description()
        except Exception as exc:  # noqa: BLE001 - no driver, no device: the same answer
            report["device"] = {"count": 0, "error": "%s: %s" % (type(exc).__name__, exc)}
        if not report["device"].get("count"):
            report["status"] = "fail"
            report["reason"] = "no usable GPU here (%s): nothing was checked" % report["device"].get("error", "0 devices")
            (outdir / "gpu-report.json").write_text(json.dumps(report, indent=2) + "\n")
            say("FAIL: " + report["reason"])
            return 1
        say("device: %s" % json.dumps(report["device"]))
        gate = {"SAFE_LAYERS_REQUIRE_GPU": "1", "CI": "true"}
        steps = {
            "gpu-tests": lambda: run_pytest("gpu-tests", outdir, ["-m", "gpu"], gate),
            "suite-gpu-mode": lambda: run_pytest("suite-gpu-mode", outdir, [],
                                                 dict(gate, SAFE_LAYERS_TEST_MODE="gpu")),
            "caffe-train": step_caffe_train,
            "bench": lambda: step_bench(outdir),
            "bench-deferred": lambda: step_bench(outdir, "bench-deferred", "bench_deferred.py", ("--gpu",)),
        }
        for name in selected_steps():
            report["steps"].append(steps[name]())
    ok = all(step["ok"] for step in report["steps"])
    report["status"] = "pass" if ok else "fail"
    report["tests"] = {key: sum(step.get(key, 0) for step in report["steps"])
                       for key in ("run", "passed", "failed", "skipped")}
    (outdir / "gpu-report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    if not args.cpu_smoke:
        (outdir / "BENCHMARKS-gpu.md").write_text(benchmarks_markdown(report))
    for step in report["steps"]:
        say("%-15s %s  run %s, passed %s, failed %s, skipped %s (%s s)"
            % (step["name"], "ok  " if step["ok"] else "FAIL", step.get("run", "-"), step.get("passed", "-"),
               step.get("failed", "-"), step.get("skipped", "-"), step.get("seconds")))
    say("%s: %s" % (report["status"].upper(), outdir / "gpu-report.json"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
