"""The main job: a real `caffe train` run that goes NaN, and NaNGuard catching it.

Three runs of examples/pooling_nan (AVE pooling whose last window lies outside the
input, cause 5 of the NaN catalogue), each through the real `caffe` binary:
  1. unguarded: the loss is nan from the first iteration, and nothing says why;
  2. NaNGuard action: abort: training stops at once with a one-line report naming the
     guard, the layer it follows, the pass, the iteration, the counts and the first
     bad element;
  3. NaNGuard action: clamp: the NaN are repaired in place and the loss stays finite.
     This NaN comes from the net's structure, at the same place in every iteration, so
     the repair is a deliberate workaround: the guard says `escalate_after: 0`. By default
     a repair needed on 10 calls in a row aborts instead (a dead net must not hide behind
     it; see README, "Choosing the clamp bound").
Exits 0 when all three behave so, 1 otherwise.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent / "pooling_nan"
CAFFE = Path(sys.executable).parent / "caffe"
GUARD = re.compile(r'layer \{\n  name: "pool1_guard".*?\n\}\n', re.S)


def run(workdir, label, action):
    net = (HERE / "train.prototxt").read_text()
    net = GUARD.sub("", net) if action is None else net.replace("ACTION", action)
    net_path = workdir / ("%s.prototxt" % label)
    net_path.write_text(net)
    solver_path = workdir / ("%s_solver.prototxt" % label)
    solver_path.write_text((HERE / "solver.prototxt").read_text().replace("NET", str(net_path)))
    result = subprocess.run([str(CAFFE), "train", "-solver", str(solver_path)],
                            capture_output=True, text=True, env=dict(os.environ, GLOG_minloglevel="0"))
    lines = result.stderr.splitlines()
    losses = [l.split("loss = ")[1] for l in lines if "solver.cpp" in l and ", loss = " in l]
    reports = [l for l in lines if "safe_layers]" in l]
    return result.returncode, losses, reports


def main():
    if not CAFFE.exists():
        sys.exit("no caffe binary at %s: run `make setup` first" % CAFFE)
    ok = True
    with tempfile.TemporaryDirectory(prefix="safe_layers_demo_") as tmp:
        workdir = Path(tmp)
        print("== 1. unguarded net: caffe train")
        rc, losses, _ = run(workdir, "unguarded", None)
        print("   exit %d, losses: %s" % (rc, ", ".join(losses)))
        ok &= rc == 0 and bool(losses) and all("nan" in l for l in losses)

        print("== 2. NaNGuard after pool1, action: abort")
        rc, losses, reports = run(workdir, "abort", "abort")
        print("   exit %d" % rc)
        for line in reports[:1]:
            print("   " + line)
        ok &= rc != 0 and any("NaNGuard pool1_guard (after pool1)" in l and "iteration 0" in l
                              for l in reports)

        print("== 3. NaNGuard after pool1, action: clamp, escalate_after: 0")
        rc, losses, reports = run(workdir, "clamp", "clamp, escalate_after: 0")
        print("   exit %d, losses: %s" % (rc, ", ".join(losses)))
        if reports:
            print("   " + reports[-1])
        ok &= rc == 0 and bool(losses) and not any("nan" in l or "inf" in l for l in losses)
    print("demo %s" % ("OK: the guard found the NaN and clamp kept training finite" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
