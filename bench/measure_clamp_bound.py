"""What a clamp should write for +-Inf: candidate bounds measured on Caffe's published nets.

    .venv/bin/python bench/measure_clamp_bound.py            # LeNet and CIFAR-10 quick
    .venv/bin/python bench/measure_clamp_bound.py --quick    # fewer iterations

The nets are tests/data's LeNet and CIFAR-10 quick (TRAIN phase), their Data layers
replaced by DummyData of the published shapes (LeNet: pixels in [0, 1), as its scale 1/256
gives; CIFAR-10: mean-subtracted pixels, Gaussian with std 64), batch 16, a NaNGuard
`{action: clamp, bound: B}` in place after every Convolution, Pooling and InnerProduct.

1. **Next layer.** Forward to a guard, write +Inf into one sample of its blob, run on
   (the guard clamps it to B), backward. Is the output of the layer after the guard, and
   are its weight gradients, finite?
2. **One bad batch.** Train with the published solver settings; at iteration 10 one
   sample of conv1's output becomes +Inf (a local overflow), once. Are the weights finite
   30 iterations later, and how far is the loss from a run that never saw the fault?
3. **Divergence.** Train with base_lr 1, 10 and 100 (the published lr is 0.001/0.01): at
   which iteration do the weights stop being finite, and is the loss then still finite
   (a dead net the clamp hides)? How many consecutive calls did the guards fault before,
   i.e. when would `escalate_after: N` stop it?
"""

import argparse
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
os.environ.setdefault("GLOG_minloglevel", "2")

import caffe  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from caffe.proto import caffe_pb2  # noqa: E402

from support.published import published_net, published_solver_fields  # noqa: E402
from safe_layers import reporting  # noqa: E402
from safe_layers.core.schemas import CLAMP_BOUND as DEFAULT_BOUND, ESCALATE_AFTER  # noqa: E402

FLOAT32_MAX = float(np.finfo(np.float32).max)
CANDIDATES = [FLOAT32_MAX, 1e30, 1e20, 1e15, 1e10, 1e6, 1e4, 1e3, 1e2]
NETS = {"LeNet": ("lenet_train_test.prototxt", "lenet_solver.prototxt"),
        "CIFAR-10 quick": ("cifar10_quick_train_test.prototxt", "cifar10_quick_solver.prototxt")}
GUARDED = ("Convolution", "Pooling", "InnerProduct")


class InjectInf(caffe.Layer):
    """Identity; at forward call `call` writes +Inf into sample 0 of its blob: one element
    (`whole: false`) or all of it."""

    def setup(self, bottom, top):
        import yaml
        p = yaml.safe_load(self.param_str)
        self.call, self.whole, self.count = p["call"], p["whole"], 0

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        self.count += 1
        if self.count == self.call:
            if self.whole:
                top[0].data[0] = np.inf
            else:
                top[0].data[0].flat[top[0].data[0].size // 2] = np.inf

    def backward(self, top, propagate_down, bottom):
        pass


def net_text(name, bound, inject_after=None, inject_call=None, batch=16, only=None, whole=True,
             escalate_after=0):
    """The published net with a clamping guard after each Convolution/Pooling/InnerProduct
    (``only``: after that layer alone; ``bound`` None: no guards), optionally an InjectInf
    after ``inject_after``."""
    net = caffe_pb2.NetParameter()
    text_format.Parse(published_net(name, data="dummy", batch=batch, phase_only="TRAIN"), net)
    layers = []
    for layer in net.layer:
        if layer.type == "Accuracy":
            continue
        if layer.type == "DummyData" and name.startswith("cifar"):
            filler = layer.dummy_data_param.data_filler[0]
            filler.type, filler.std = "gaussian", 64.0
            filler.ClearField("min")
            filler.ClearField("max")
        layers.append(layer)
        if layer.name == inject_after:
            inject = caffe_pb2.LayerParameter(name="inject", type="Python", bottom=[layer.top[0]],
                                              top=[layer.top[0]])
            layers.append(inject)
            inject.python_param.module = "measure_clamp_bound"
            inject.python_param.layer = "InjectInf"
            inject.python_param.param_str = "{call: %d, whole: %s}" % (inject_call, str(whole).lower())
        if layer.type in GUARDED and bound is not None and only in (None, layer.name):
            guard = caffe_pb2.LayerParameter(name=layer.name + "_guard", type="Python",
                                             bottom=[layer.top[0]], top=[layer.top[0]])
            guard.python_param.module = "safe_layers"
            guard.python_param.layer = "NaNGuard"
            guard.python_param.param_str = ("{name: %s_guard, follows: %s, action: clamp, bound: %r, "
                                            "log_first: 0, log_every: 1000000, escalate_after: %d}"
                                            % (layer.name, layer.name, bound, escalate_after))
            layers.append(guard)
    del net.layer[:]
    net.layer.extend(layers)
    net.force_backward = True
    return text_format.MessageToString(net)


def write(tmp, text, suffix):
    path = os.path.join(tmp, "net_%s.prototxt" % suffix)
    with open(path, "w") as f:
        f.write(text)
    return path


def all_finite(arrays):
    return bool(all(np.isfinite(a).all() for a in arrays))


def next_layer(tmp, name, bound):
    """Experiment 1: per guard position (one guard in the net at a time), are the next
    layer's output and the next weights' gradient finite?"""
    positions = list(caffe.Net(write(tmp, net_text(name, None), "plain"), caffe.TRAIN)._layer_names)
    results = []
    for position in positions:
        net = caffe.Net(write(tmp, net_text(name, bound, only=position), "next"), caffe.TRAIN)
        names = list(net._layer_names)
        if position + "_guard" not in names or names.index(position + "_guard") + 1 >= len(names):
            continue
        i = names.index(position + "_guard")
        layer, after = names[i], names[i + 1]
        net.forward(end=names[i - 1])
        blob = net.top_names[names[i - 1]][0]
        net.blobs[blob].data[0] = np.inf
        net.forward(start=layer)
        top = net.blobs[net.top_names[after][0]].data.copy()
        if not all_finite([b.data for b in net.blobs.values()]):
            # A NaN window would make max pooling's CPU backward write out of bounds
            # (caffe-internals.md, section 8): no backward, the gradients count as lost.
            results.append((names[i - 1], after, bool(np.isfinite(top).all()), None, False, False))
            continue
        net.clear_param_diffs()
        net.backward()
        params = [p.diff for p in net.params[after]] if after in net.params else []
        # The layer whose weights the clamped values feed: the next one with parameters.
        learner = next((n for n in names[i + 1:] if n in net.params), None)
        grads = [p.diff for p in net.params[learner]] if learner else []
        results.append((names[i - 1], after, bool(np.isfinite(top).all()), learner,
                        bool(all_finite(params + grads)),
                        bool(all_finite([b.data for b in net.blobs.values()])
                             and all_finite([b.diff for b in net.blobs.values()]))))
    reporting.clear_fault_logs()
    return results


def solver_for(tmp, name, solver_name, text, base_lr=None, suffix="s"):
    fields = published_solver_fields(solver_name)
    if base_lr is not None:
        fields["base_lr"] = base_lr
    fields.update(random_seed=1, display=0, snapshot_after_train="false", solver_mode="CPU",
                  max_iter=100000)
    path = write(tmp, text, suffix)
    solver_path = os.path.join(tmp, "solver_%s.prototxt" % suffix)
    with open(solver_path, "w") as f:
        f.write('net: "%s"\n' % path + "".join("%s: %s\n" % kv for kv in fields.items()
                                               if kv[0] not in ("test_iter", "test_interval")))
    return caffe.SGDSolver(solver_path)


def weights_finite(solver):
    return all(np.isfinite(p.data).all() for ps in solver.net.params.values() for p in ps)


def loss(solver):
    return float(solver.net.blobs["loss"].data)


def one_bad_batch(tmp, name, solver_name, bound, iterations, whole):
    """Experiment 2: conv1 +Inf (one element, or one whole sample) at iteration 10, once;
    the weights and the loss later."""
    # Without guards (the reference) there is no fault: an unrepaired +Inf would reach max
    # pooling, whose CPU backward then writes out of bounds (caffe-internals.md, section 8).
    text = (net_text(name, bound, inject_after="conv1", inject_call=11, whole=whole) if bound is not None
            else net_text(name, None))
    solver = solver_for(tmp, name, solver_name, text, suffix="bad")
    streak, longest, counts = 0, 0, 0
    for _ in range(iterations):
        solver.step(1)
        total = sum(log.count for log in reporting.fault_logs())
        streak = streak + 1 if total > counts else 0
        longest, counts = max(longest, streak), total
    finite = bool(weights_finite(solver))
    largest = max(float(np.abs(p.data).max()) for ps in solver.net.params.values() for p in ps)
    activation = max(float(np.abs(b.data).max()) for n, b in solver.net.blobs.items() if n != "loss")
    result = finite, largest, loss(solver), longest, activation
    reporting.clear_fault_logs()
    return result


def divergence(tmp, name, solver_name, bound, base_lr, iterations, escalate_after=0):
    """Experiment 3: the iteration the weights die, the loss then, and the longest runs of
    consecutive faulty iterations before it; with ``escalate_after``, where the guards stop."""
    solver = solver_for(tmp, name, solver_name, net_text(name, bound, escalate_after=escalate_after),
                        base_lr=base_lr, suffix="div")
    dead_at, streak, longest_before, counts = None, 0, 0, 0
    first_fault = stopped_at = None
    for it in range(iterations):
        try:
            solver.step(1)
        except reporting.FaultAbort as exc:
            stopped_at = exc.report.iteration
            break
        total = sum(log.count for log in reporting.fault_logs())
        faulty = total > counts
        counts = total
        if faulty and first_fault is None:
            first_fault = it
        streak = streak + 1 if faulty else 0
        if dead_at is None and not weights_finite(solver):
            dead_at = it
            longest_before = streak
        if dead_at is None:
            longest_before = max(longest_before, streak)
    result = dict(first_fault=first_fault, dead_at=dead_at, loss=loss(solver),
                  streak_at_death=longest_before, final_streak=streak, stopped_at=stopped_at)
    reporting.clear_fault_logs()
    return result


def fmt(bound):
    return "none" if bound is None else ("FLT_MAX" if bound == FLOAT32_MAX else "%g" % bound)


def cell(args):
    """Run one measurement in a child process: a heap corrupted by Caffe (max pooling's
    backward writes out of bounds when a window holds nothing above -FLT_MAX) kills the
    child, not the table."""
    import json
    import subprocess
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--cell", json.dumps(args)],
                            capture_output=True, text=True)
    lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
    if result.returncode != 0 or not lines:
        tail = (result.stderr.strip().splitlines() or ["?"])[-1]
        return {"crashed": "exit %d: %s" % (result.returncode, tail)}
    return json.loads(lines[-1])


def run_cell(args):
    import json
    caffe.set_mode_cpu()
    name, solver_name = NETS[args["net"]]
    with tempfile.TemporaryDirectory() as tmp:
        if args["experiment"] == "next":
            rows = next_layer(tmp, name, args["bound"])
            out = {"rows": rows}
        elif args["experiment"] == "bad":
            finite, largest, final, longest, activation = one_bad_batch(
                tmp, name, solver_name, args["bound"], args["iterations"], args["whole"])
            out = {"finite": finite, "largest": largest, "loss": final, "longest_streak": longest,
                   "activation": activation}
        else:
            out = divergence(tmp, name, solver_name, args["bound"], args["lr"], args["iterations"],
                             args.get("escalate_after", 0))
    print(json.dumps(out), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        import json
        return run_cell(json.loads(args.cell))
    iterations = 20 if args.quick else 40
    for label in NETS:
        print("== %s (batch 16)" % label)
        print("-- 1. +Inf in one sample of a blob, clamped to B by the one guard there: the next layer")
        for bound in CANDIDATES:
            r = cell({"experiment": "next", "net": label, "bound": bound})
            if "crashed" in r:
                print("  B=%-8s CRASHED (%s)" % (fmt(bound), r["crashed"]))
                continue
            rows = r["rows"]
            bad = ["%s->%s%s%s" % (where, after, "" if out_ok else " [output]",
                                  "" if grad_ok else " [gradients]")
                   for where, after, out_ok, learner, grad_ok, _ in rows if not (out_ok and grad_ok)]
            print("  B=%-8s next layer and its gradients finite after %d of %d guard positions%s"
                  % (fmt(bound), len(rows) - len(bad), len(rows),
                     ("; overflow: " + ", ".join(bad)) if bad else ""))
        for whole in (False, True):
            print("-- 2. %s of conv1 = +Inf at iteration 10 (once), guards clamp; after %d iterations"
                  % ("one whole sample" if whole else "one element", iterations))
            ref = cell({"experiment": "bad", "net": label, "bound": None, "iterations": iterations,
                        "whole": whole})
            print("  no fault (reference): loss %.4g, largest |w| %.3g, largest |activation| %.3g"
                  % (ref["loss"], ref["largest"], ref["activation"]))
            for bound in CANDIDATES:
                r = cell({"experiment": "bad", "net": label, "bound": bound, "iterations": iterations,
                          "whole": whole})
                if "crashed" in r:
                    print("  B=%-8s CRASHED (%s)" % (fmt(bound), r["crashed"]))
                    continue
                print("  B=%-8s weights finite: %-5s largest |w| %-9.3g loss %-7.4g longest run of "
                      "faulty iterations: %d" % (fmt(bound), r["finite"], r["largest"], r["loss"],
                                                  r["longest_streak"]))
        print("-- 3. divergence at a high base_lr, guards clamp, %d iterations" % iterations)
        for base_lr in (1, 10, 100):
            for bound in CANDIDATES:
                r = cell({"experiment": "div", "net": label, "bound": bound, "lr": base_lr,
                          "iterations": iterations})
                if "crashed" in r:
                    print("  lr=%-4g B=%-8s CRASHED (%s)" % (base_lr, fmt(bound), r["crashed"]))
                    continue
                print("  lr=%-4g B=%-8s first fault at it %s; weights dead from it %s; final loss %.4g; "
                      "faulty iterations in a row at the end: %d%s"
                      % (base_lr, fmt(bound), r["first_fault"], r["dead_at"], r["loss"], r["final_streak"],
                         "  <- finite loss over dead weights"
                         if r["dead_at"] is not None and np.isfinite(r["loss"]) else ""))
            r = cell({"experiment": "div", "net": label, "bound": DEFAULT_BOUND, "lr": base_lr,
                      "iterations": iterations, "escalate_after": ESCALATE_AFTER})
            print("  lr=%-4g B=%-8s escalate_after: %d -> %s"
                  % (base_lr, fmt(DEFAULT_BOUND), ESCALATE_AFTER,
                     r.get("crashed") or ("aborted at iteration %s (weights dead from it %s)"
                                          % (r["stopped_at"], r["dead_at"]))))


if __name__ == "__main__":
    main()
