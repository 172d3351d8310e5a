"""The main job (`make demo`): four ways Caffe training dies of NaN, and safe_layers at work.

On scikit-learn's 8x8 digits (shipped with the package, turned into Caffe LMDBs here), a
small conv net trains to ~97 % test accuracy in a second. The demo breaks it the four ways
users meet most of the six known causes, each through the real ``caffe`` binary:

  high_lr   base_lr 10 instead of 0.1: the loss climbs, then NaN (cause 1)
  pooling   AVE pooling, kernel 2, stride 4 on an 8x8 map: NaN from iteration 0 (cause 5)
  poly      lr_policy "poly" without max_iter: training silently does nothing (cause 2)
  poisoned  one record of the training LMDB holds a NaN pixel (cause 4)

then answers each with the tools, as a user would: ``safe-layers lint`` before training,
``safe-layers scan`` on the data, ``safe-layers diagnose`` on the dead run's log,
``safe-layers harden`` on the net and ``safe-layers train`` to train it protected (with
the default rollback settings: high_lr's rollbacks lower base_lr by the default lr_factor,
and a net found dead is rolled back too). It
prints one line per scenario (cause, caught by, outcome) and writes ``demo.png`` with the
loss curves of the dead and the protected runs. Everything lands in ``out/demo/`` (each
scenario's prototxts, logs, event logs), which the next run replaces.

Exit status 0 when every scenario behaved as described, 1 otherwise.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import digits  # noqa: E402  (the demo's dataset, beside this file)

BIN = Path(sys.executable).parent
CAFFE = BIN / "caffe"
SAFE_LAYERS = BIN / "safe-layers"
POISONED_RECORD = 737  # in the 15th batch of 50: iteration 14

NET = (HERE / "demo" / "digits_train_test.prototxt").read_text()
# The shipped solver names the net by its path from the checkout's root; each scenario's
# copy names the net.prototxt written beside it.
SOLVER = (HERE / "demo" / "solver.prototxt").read_text().replace(
    'net: "examples/demo/digits_train_test.prototxt"', 'net: "net.prototxt"')

# What each scenario changes in the healthy net and solver (plain text edits, so the
# files in out/demo/<scenario>/ read like a user's own).
HEALTHY_POOL = "pooling_param { pool: MAX kernel_size: 2 stride: 2 }"
SCENARIOS = {
    "high_lr": {"solver": [("base_lr: 0.1", "base_lr: 10")],
                "cause": "base_lr 10 (meant 0.1)", "cause_number": 1},
    "pooling": {"net": [(HEALTHY_POOL, "pooling_param { pool: AVE kernel_size: 2 stride: 4 }")],
                "cause": "AVE pool k2 s4 on 8x8", "cause_number": 5,
                # lint's first fix for its SL201 finding
                "lint_fix": {"net": [("stride: 4 }", "stride: 4 round_mode: FLOOR }")]}},
    "poly": {"solver": [('lr_policy: "fixed"', 'lr_policy: "poly"\npower: 0.9'),
                        ("max_iter: 300\n", "")],
             "cause": "poly without max_iter", "cause_number": 2,
             "lint_fix": {"solver": [("power: 0.9", "power: 0.9\nmax_iter: 300")]}},
    "poisoned": {"data": "poisoned",
                 "cause": "NaN pixel in LMDB record %08d" % POISONED_RECORD, "cause_number": 4},
}


class Step:
    """Progress lines: '[3/6] lint ... 2.1 s'."""

    def __init__(self, total):
        self.total, self.number, self.started = total, 0, time.time()

    def __call__(self, text):
        self.number += 1
        print("[%d/%d] %s" % (self.number, self.total, text), flush=True)


def run(command, log=None, cwd=None):
    """Run a command; its stdout+stderr go to ``log`` (a path) or are returned."""
    env = dict(os.environ, GLOG_minloglevel="0")
    if log is None:
        done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True,
                              text=True)
        return done.returncode, done.stdout, done.stderr
    with open(log, "w") as out:
        done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, stdout=out,
                              stderr=subprocess.STDOUT, text=True)
    return done.returncode, None, None


def edit(text, replacements):
    for old, new in replacements:
        if old not in text:
            raise RuntimeError("demo: %r is not in the healthy prototxt" % old)
        text = text.replace(old, new)
    return text


def scenario_dir(out, name, spec):
    """out/<name>/ with net.prototxt, solver.prototxt and the data the net reads."""
    where = out / name
    where.mkdir()
    (where / "net.prototxt").write_text(edit(NET, spec.get("net", [])))
    (where / "solver.prototxt").write_text(edit(SOLVER, spec.get("solver", [])))
    data = out / "data" / spec.get("data", "clean")
    for lmdb_name in ("digits_train_lmdb", "digits_test_lmdb"):
        os.symlink(data / lmdb_name, where / lmdb_name)
    return where


def losses_of(log):
    """[(iteration, loss)] and the last test accuracy of a training log, read with the
    same parser `safe-layers diagnose` uses."""
    from safe_layers.readers.caffe_log import read_log
    curve, accuracy = [], None
    for event in read_log(str(log)):
        if event.kind == "loss":
            curve.append((event.iteration, event.value))
        elif event.kind == "output" and event.phase == "TEST" and event.name == "accuracy":
            accuracy = event.value
    return curve, accuracy


def watch_summary(log):
    """The watch's own account of a `safe-layers train` log (its summary, dead and rollback
    lines, read by the watch's parser): {"skipped": n, "rollbacks": [details], "dead":
    [details]}; each rollback's details with the dead layers that caused it, if any."""
    from safe_layers.anomaly import parse_line
    from safe_layers.reporting.watch_lines import dead_details, event_details
    found = {"skipped": 0, "rollbacks": [], "dead": []}
    for line in open(log, errors="replace"):
        at = line.find("WATCH ")
        fields = parse_line(line[at:].rstrip("\n")) if at >= 0 else None
        if fields and fields["kind"] == "summary":
            found["skipped"] = fields["skipped"]
        elif fields and fields["kind"] == "dead":
            found["dead"].append(dict(dead_details(fields), iteration=fields["iteration"]))
        elif fields and fields["kind"] == "rollback":
            details = event_details(fields)
            if details.get("cause") == "dead" and found["dead"]:
                details["layers"] = [l["layer"] for l in found["dead"][-1]["layers"]]
            found["rollbacks"].append(details)
    return found


def findings(command, cwd):
    """(exit status, findings) of a safe-layers subcommand run with --format json."""
    status, stdout, stderr = run(list(command) + ["--format", "json"], cwd=cwd)
    try:
        return status, json.loads(stdout)["findings"]
    except (ValueError, KeyError):
        sys.stderr.write(stderr)
        return status, []


def first_line(found, severity="error"):
    for finding in found:
        if finding["severity"] == severity:
            return "%s:%s:%s: %s %s" % (finding["path"], finding["line"], finding["col"],
                                       finding["rule"], finding["message"])
    return None


def short(text, width=150):
    return text if text is None or len(text) <= width else text[:width - 3] + "..."


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/demo", help="where everything is written (replaced)")
    args = parser.parse_args()
    for tool in (CAFFE, SAFE_LAYERS):
        if not tool.exists():
            sys.exit("demo: no %s; run `make setup` first" % tool)
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    step = Step(7)
    results = {}
    ok = True

    step("data: scikit-learn digits -> Caffe LMDBs (clean, and a copy with record %08d poisoned)"
         % POISONED_RECORD)
    digits.write_digits(out / "data" / "clean")
    poisoned_key = digits.write_digits(out / "data" / "poisoned", poison=POISONED_RECORD)
    dirs = {"healthy": scenario_dir(out, "healthy", {})}
    dirs.update({name: scenario_dir(out, name, spec) for name, spec in SCENARIOS.items()})

    step("unprotected: `caffe train` on the healthy net and on each broken one")
    for name, where in dirs.items():
        status, _, _ = run([CAFFE, "train", "-solver", "solver.prototxt"], where / "caffe.log", where)
        curve, accuracy = losses_of(where / "caffe.log")
        finite = [v for _, v in curve if math.isfinite(v)]
        dead = (status != 0 or len(finite) < len(curve) or not curve
                or (accuracy is not None and accuracy < 0.5))
        results[name] = {"caffe_status": status, "curve": curve, "accuracy": accuracy, "dead": dead}
        print("    %-9s exit %3d  %3d loss lines, %3d non-finite, test accuracy %s"
              % (name, status, len(curve), len(curve) - len(finite),
                 "%.3f" % accuracy if accuracy is not None else "none"))
    ok &= not results["healthy"]["dead"]
    ok &= all(results[name]["dead"] for name in SCENARIOS)

    step("lint: `safe-layers lint solver.prototxt` in each scenario")
    for name in SCENARIOS:
        status, found = findings([SAFE_LAYERS, "lint", "solver.prototxt"], dirs[name])
        results[name]["lint"] = first_line(found)
        results[name]["lint_status"] = status
        print("    %-9s exit %d  %s" % (name, status, short(results[name]["lint"] or "no error")))
    ok &= results["pooling"]["lint_status"] == 1 and results["poly"]["lint_status"] == 1

    step("scan: `safe-layers scan` on the training LMDB of each scenario")
    for name in SCENARIOS:
        status, found = findings([SAFE_LAYERS, "scan", "digits_train_lmdb", "--num-classes", "10"],
                                 dirs[name])
        results[name]["scan"] = first_line(found)
        results[name]["scan_status"] = status
        if results[name]["scan"]:
            print("    %-9s exit %d  %s" % (name, status, short(results[name]["scan"])))
    ok &= results["poisoned"]["scan_status"] == 1 and poisoned_key in (results["poisoned"]["scan"] or "")
    ok &= all(results[n]["scan_status"] == 0 for n in SCENARIOS if n != "poisoned")

    step("diagnose: `safe-layers diagnose caffe.log` on each dead run")
    for name in SCENARIOS:
        status, found = findings([SAFE_LAYERS, "diagnose", "caffe.log"], dirs[name])
        results[name]["diagnose"] = first_line(found)
        print("    %-9s exit %d  %s" % (name, status, short(results[name]["diagnose"] or "nothing found")))
    ok &= all(results[name]["diagnose"] for name in SCENARIOS)

    step("harden + train: `safe-layers harden --level repair`, then `safe-layers train` "
         "(lint first, then a watch that skips or rolls back)")
    for name, spec in SCENARIOS.items():
        status, accuracy = protected_run(dirs[name], "net.prototxt", "solver.prototxt")
        results[name].update(train_status=status, lint_stopped=status == 2)
        line = "    %-9s exit %d  %s" % (name, status, "test accuracy %.3f" % accuracy
                                         if accuracy is not None else "no test")
        if status == 2 and "lint_fix" in spec:
            # safe-layers train refused the net or solver lint found an error in; apply
            # lint's fix and train again, as the user would.
            fix = spec["lint_fix"]
            where = dirs[name]
            (where / "net_fixed.prototxt").write_text(edit((where / "net.prototxt").read_text(),
                                                           fix.get("net", [])))
            solver = edit((where / "solver.prototxt").read_text(), fix.get("solver", []))
            (where / "solver_fixed.prototxt").write_text(solver.replace('net: "net.prototxt"',
                                                                        'net: "net_fixed.prototxt"'))
            status, accuracy = protected_run(where, "net_fixed.prototxt", "solver_fixed.prototxt")
            line += "  (lint stopped it); with lint's fix: exit %d, test accuracy %s" % (
                status, "%.3f" % accuracy if accuracy is not None else "none")
        curve = losses_of(dirs[name] / "train.log")[0]
        # What the protected run caught, in diagnose's words (it reads our layers' and the
        # watch's report lines through their own parsers).
        _, found = findings([SAFE_LAYERS, "diagnose", "train.log"], dirs[name])
        caught = [f for f in found if f["rule"] == "SL806"]
        results[name].update(final_status=status, hardened_curve=curve, hardened_accuracy=accuracy,
                             caught=caught[0] if caught else None,
                             watch=watch_summary(dirs[name] / "train.log"))
        print(line)
    ok &= all(results[name]["final_status"] == 0 and (results[name]["hardened_accuracy"] or 0) > 0.9
              for name in SCENARIOS)
    ok &= results["pooling"]["lint_stopped"] and results["poly"]["lint_stopped"]

    step("report: one line per scenario")
    print("  %-9s %-38s %-42s %s" % ("scenario", "cause (#)", "caught by", "outcome"))
    for name, spec in SCENARIOS.items():
        r = results[name]
        print("  %-9s %-38s %-42s %s" % (name, "%s (%d)" % (spec["cause"], spec["cause_number"]),
                                          ", ".join(caught_by(r)), outcome(r)))
    plot(out / "demo.png", results)
    print("wrote %s; every scenario's files are in %s" % (out / "demo.png", out))
    print("demo %s" % ("OK" if ok else "FAILED"))
    return 0 if ok else 1


def rule_of(line):
    """'SL201' from 'net.prototxt:21:3: SL201 pooling ...'."""
    return line.split(": ", 1)[1].split(" ", 1)[0] if line else None


def caught_by(r):
    found = []
    if r.get("lint_status") == 1:
        found.append("lint %s" % rule_of(r["lint"]))
    if r.get("scan_status") == 1:
        found.append("scan %s" % rule_of(r["scan"]))
    if r.get("diagnose"):
        found.append("diagnose %s" % rule_of(r["diagnose"]))
    if r.get("caught"):
        found.append("watch (%s, it. %s)" % (r["caught"].get("layer"), r["caught"].get("iteration")))
    elif r.get("watch", {}).get("dead"):
        dead = r["watch"]["dead"][0]
        found.append("watch (dead %s, it. %s)" % (
            ", ".join(l["layer"] for l in dead["layers"]) or "net", dead["iteration"]))
    return found or ["nothing"]


def outcome(r):
    bad = [i for i, v in r["curve"] if not math.isfinite(v)]
    if bad:
        # Caffe's Accuracy layer counts a NaN score as right: a dead net reports 1.0.
        dead = "unprotected: loss NaN from iteration %d%s (its test 'accuracy' %.2f)" % (
            bad[0], ", then crashed" if r["caffe_status"] < 0 else "",
            r["accuracy"] if r["accuracy"] is not None else float("nan"))
    else:
        dead = "unprotected: %d iterations, test accuracy %.2f" % (
            max([i for i, _ in r["curve"]] or [0]), r["accuracy"] or 0)
    watched = r["watch"]
    steps = (["%d skipped" % watched["skipped"]] if watched["skipped"] else []) + [
        "%s at it. %d: back to it. %d%s" % (
            "dead (%s)" % ", ".join(d.get("layers") or ["net"]) if d.get("cause") == "dead"
            else d.get("cause"), d["at"], d["to"],
            ", base_lr %g -> %g" % (d["base_lr_from"], d["base_lr_to"]) if d.get("base_lr_to")
            else "") for d in watched["rollbacks"] if d]
    protected = "protected: %s%s%s" % (
        "lint stopped it; fixed as lint said, " if r["lint_stopped"] else "",
        "%s; " % ", ".join(steps) if steps else "",
        "accuracy %.3f" % r["hardened_accuracy"] if r["final_status"] == 0 and r["hardened_accuracy"]
        is not None else "exit %d" % r["final_status"])
    return "%s; %s" % (protected, dead)


def protected_run(where, net_file, solver_file):
    """`safe-layers harden --level repair` on ``net_file``, then `safe-layers train` on a
    copy of ``solver_file`` naming the hardened net. Returns (exit status, test accuracy)."""
    status, _, stderr = run([SAFE_LAYERS, "harden", net_file, "-o", "hardened.prototxt",
                             "--level", "repair", "--solver", solver_file], cwd=where)
    if status != 0:
        sys.stderr.write(stderr)
        return status, None
    solver = (where / solver_file).read_text().replace('net: "%s"' % net_file, 'net: "hardened.prototxt"')
    (where / "hardened_solver.prototxt").write_text(solver)
    # The default rollback settings (a checkpoint every 100 iterations, lr_factor 0.1,
    # a net found dead rolled back too).
    status, _, _ = run([SAFE_LAYERS, "train", "-solver", "hardened_solver.prototxt",
                        "--on-nonfinite", "skip", "--rollback-after", "3",
                        "--events", "events.jsonl", "--plot", "train.png",
                        "--progress", "never"], where / "train.log", where)
    return status, losses_of(where / "train.log")[1]


def segments(curve):
    """``curve`` split where the iteration goes back (a rollback): [[(i, v)], ...]."""
    parts = [[]]
    for point in curve:
        if parts[-1] and point[0] < parts[-1][-1][0]:
            parts.append([])
        parts[-1].append(point)
    return [part for part in parts if part]


def plot(path, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(SCENARIOS), figsize=(4 * len(SCENARIOS), 3.4), sharey=True)
    for ax, name in zip(axes, SCENARIOS):
        r = results[name]
        for curve, label, color in ((r.get("hardened_curve") or [], "protected", "green"),
                                    (r["curve"], "unprotected", "red")):
            parts = segments(curve)
            for k, part in enumerate(parts):
                finite = [(i, v) for i, v in part if math.isfinite(v)]
                abandoned = k < len(parts) - 1  # rolled back: training went on from a checkpoint
                if finite:
                    ax.plot(*zip(*finite), color=color, linewidth=1, alpha=0.35 if abandoned else 1,
                            label=None if k else label,
                            linestyle="--" if label == "unprotected" else "-")
                bad = [i for i, v in part if not math.isfinite(v)]
                if bad:
                    ax.plot(bad, [150.0] * len(bad), "x", color=color, markersize=3,
                            alpha=0.35 if abandoned else 1,
                            label="%s: loss NaN/inf" % label if not abandoned else None)
        ax.set_title("%s: %s" % (name, SCENARIOS[name]["cause"]), fontsize=9)
        ax.set_yscale("log")
        ax.set_ylim(1e-3, 300)
        ax.set_xlabel("iteration")
    axes[0].set_ylabel("training loss (log scale)")
    axes[-1].legend(loc="lower left", fontsize=7)
    figure.suptitle("caffe train (red, dashed) vs harden + safe-layers train (green; faded: "
                    "iterations a rollback abandoned)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
