"""How the defaults of the watch's dead-net checks (``on_dead``) were chosen: what the
checks measure on healthy runs, against what they measure on the dead ones.

    .venv/bin/python bench/measure_dead_defaults.py                     # all, ~4 minutes
    .venv/bin/python bench/measure_dead_defaults.py --nets digits,lenet --iterations 300

Healthy runs: the demo's digits net at its solver (LMDBs of scikit-learn's digits), and
the published LeNet, CIFAR-10 quick (their solvers) and ResNet-50 (the solver the watch
bench uses) on the same digits, scaled up to each net's input (an ArrayData layer in place
of their Data layers): data a net can learn, so that the loss leaves chance as it does on
MNIST or CIFAR (DummyData's random labels cannot be learned: the loss stays at chance,
rightly called dead). Dead runs: the digits net at base_lr 1 and 10. For each run, under a
watch with ``on_dead: warn``: the longest streak of a trained layer's top all zeros, the
smallest update/weights ratio (lr x the param diffs' norm / the weights' norm), the longest
streak of the loss at chance (after having been below it; from the start), the dead
reports.
"""

import argparse
import os
import sys
import tempfile
import time

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("GLOG_minloglevel", "2")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "examples"))

PUBLISHED = {
    # name: (net, solver or None, batch, input (channels, side))
    "lenet": ("lenet_train_test.prototxt", "lenet_solver.prototxt", 64, (1, 28)),
    "cifar10_quick": ("cifar10_quick_train_test.prototxt", "cifar10_quick_solver.prototxt", 100,
                      (3, 32)),
    "resnet50": ("resnet50_train_val.prototxt", None, 4, (3, 224)),
}
RESNET_SOLVER = {"base_lr": 0.1, "lr_policy": '"step"', "stepsize": 100000, "gamma": 0.1,
                 "momentum": 0.9, "weight_decay": 0.0001}


def scaled_digits(folder, channels, side, scale):
    """The digits as .npy files, each image scaled (nearest) to side x side, channels
    copies, pixels times ``scale`` (255 for CIFAR-10 quick, which reads mean-subtracted
    0-255 pixels, its mean subtracted here too)."""
    import numpy
    import digits
    images, labels = digits.digits()
    index = (numpy.arange(side) * 8) // side
    big = images[:, :, index][:, :, :, index] * scale
    if scale != 1:
        big = big - big.mean(axis=0)
    big = numpy.repeat(big, channels, axis=1).astype(numpy.float32)
    data = os.path.join(folder, "digits_%d_%d.npy" % (channels, side))
    label = os.path.join(folder, "labels.npy")
    numpy.save(data, big)
    numpy.save(label, labels.astype(numpy.float32))
    return data, label


def solver_file(folder, name, net_text, fields):
    net = os.path.join(folder, name + "_net.prototxt")
    with open(net, "w") as f:
        f.write(net_text)
    path = os.path.join(folder, name + "_solver.prototxt")
    lines = ['net: "%s"' % net, "max_iter: 100000", "random_seed: 1", "solver_mode: CPU",
             'snapshot_prefix: "%s"' % os.path.join(folder, name)]
    lines += ["%s: %s" % kv for kv in fields.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def published(folder, name):
    from google.protobuf import text_format
    from caffe.proto import caffe_pb2
    from support.published import published_net, published_solver_fields
    net, solver, batch, (channels, side) = PUBLISHED[name]
    arrays = scaled_digits(folder, channels, side, 255 if name == "cifar10_quick" else 1)
    text = published_net(net, data="array", batch=batch, arrays=arrays, phase_only="TRAIN")
    if name == "resnet50":
        # Its prototxt leaves the weights at Caffe's default filler, zero: a net that cannot
        # learn (rightly found dead). Trained from scratch, MSRA (He et al.) is the custom.
        param = caffe_pb2.NetParameter()
        text_format.Parse(text, param)
        for layer in param.layer:
            if layer.type == "Convolution":
                layer.convolution_param.weight_filler.type = "msra"
            elif layer.type == "InnerProduct":
                layer.inner_product_param.weight_filler.type = "gaussian"
                layer.inner_product_param.weight_filler.std = 0.01
        text = text_format.MessageToString(param)
    fields = published_solver_fields(solver) if solver else RESNET_SOLVER
    return solver_file(folder, name, text, fields)


def digits_net(folder, base_lr):
    import digits
    from pathlib import Path
    where = os.path.join(folder, "digits_lmdb")
    if not os.path.isdir(where):
        digits.write_digits(Path(where))
    demo = os.path.join(ROOT, "examples", "demo")
    text = open(os.path.join(demo, "digits_train_test.prototxt")).read().replace(
        'source: "digits_', 'source: "%s/digits_' % where)
    fields = {"base_lr": base_lr, "momentum": 0.9, "weight_decay": 0.0005,
              "lr_policy": '"fixed"'}
    return solver_file(folder, "digits_lr%g" % base_lr, text, fields)


def measure(path, iterations):
    """Step a watched solver; returns what its liveness checks saw."""
    import io
    import safe_layers
    w = safe_layers.watch(path, on_dead="warn", on_nonfinite="warn", stream=io.StringIO())
    live = w.checks.liveness
    zero, ratios, chance_learned, chance_start, losses = 0, [], 0, 0, []
    start = time.time()
    for _ in range(iterations):
        w.solver.step(1)
        it = int(w.solver.iter) - 1
        losses.append(w.loss)
        zero = max([zero] + [it - since + 1 for since in live.zero_since.values()])
        if live.last_ratio is not None and it > 0:
            ratios.append(live.last_ratio)
        if live.chance_since is not None:
            count = it - live.chance_since + 1
            if live.learned:
                chance_learned = max(chance_learned, count)
            else:
                chance_start = max(chance_start, count)
    dead = [f for f in w.faults if f.kind == "dead"]
    w.close()
    tail = losses[-20:]
    return {"seconds": time.time() - start, "zero": zero, "ratio": min(ratios) if ratios else None,
            "chance_learned": chance_learned, "chance_start": chance_start,
            "level": live.level, "loss": sum(tail) / len(tail), "dead": dead}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default="digits,lenet,cifar10_quick,resnet50,digits_lr1,digits_lr10")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--resnet-iterations", type=int, default=30)
    args = parser.parse_args()
    import caffe
    caffe.set_mode_cpu()
    print("%-14s %5s %8s %10s %12s %12s %9s %9s  %s" % (
        "run", "iters", "zero run", "min ratio", "chance(after)", "chance(start)", "level",
        "last loss", "dead reports"))
    with tempfile.TemporaryDirectory() as folder:
        for name in args.nets.split(","):
            if name.startswith("digits"):
                path = digits_net(folder, {"digits": 0.1, "digits_lr1": 1, "digits_lr10": 10}[name])
            else:
                path = published(folder, name)
            n = args.resnet_iterations if name == "resnet50" else args.iterations
            r = measure(path, n)
            print("%-14s %5d %8d %10s %12d %12d %9s %9.4f  %s" % (
                name, n, r["zero"], "%.3g" % r["ratio"] if r["ratio"] is not None else "-",
                r["chance_learned"], r["chance_start"],
                "%.4f" % r["level"] if r["level"] else "-", r["loss"],
                "; ".join("it. %d: %s" % (f.iteration, f.message[:100]) for f in r["dead"][:2])
                or "none"), flush=True)


if __name__ == "__main__":
    main()
