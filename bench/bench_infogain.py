"""SafeInfogainLoss against Caffe's InfogainLoss, forward + backward: ratios in one run.

    .venv/bin/python bench/bench_infogain.py [--rounds 15]

Three shapes a Caffe user meets: a LeNet-size classifier (64 x 10), an ImageNet-size one
(32 x 1000) and a segmentation map (4 x 21 x 64 x 64). Each pair of nets has the same
Input blobs (logits, labels), the same row-stochastic H from the same .binaryproto, and
one loss layer: Caffe's ``InfogainLoss`` (its own softmax inside) or ``SafeInfogainLoss``
(``loss_weight: 1``). One round times one forward + backward of each net, in alternating
order; the ratio is taken per round and summarised as the median, best-vs-best beside
it. Process CPU time, BLAS single-threaded (set before NumPy loads; ``--threads`` to
change), as for the other CPU benchmarks on this shared machine.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

if __name__ == "__main__":
    _threads = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), "1")
    for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(_name, _threads)
os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np  # noqa: E402

SHAPES = {"LeNet-size 64x10": (64, 10, ()), "ImageNet-size 32x1000": (32, 1000, ()),
          "segmentation 4x21x64x64": (4, 21, (64, 64))}


def net_text(shape, classes, spatial, h_path, safe):
    dims = " ".join("dim: %d" % d for d in (shape, classes) + spatial)
    label_dims = " ".join("dim: %d" % d for d in (shape,) + spatial)
    if safe:
        loss = ('layer { name: "loss" type: "Python" bottom: "x" bottom: "y" top: "loss" loss_weight: 1 '
                'python_param { module: "safe_layers" layer: "SafeInfogainLoss" '
                'param_str: "{name: loss, source: %s}" } }' % h_path)
    else:
        loss = ('layer { name: "loss" type: "InfogainLoss" bottom: "x" bottom: "y" top: "loss" '
                'infogain_loss_param { source: "%s" } }' % h_path)
    return ('name: "infogain" force_backward: true\n'
            'layer { name: "in" type: "Input" top: "x" top: "y" input_param { shape { %s } shape { %s } } }\n'
            '%s\n' % (dims, label_dims, loss))


def timed(net):
    start = time.process_time()
    net.forward()
    net.backward()
    return time.process_time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", default="1", help="BLAS threads (read at start-up)")
    args = parser.parse_args()
    import caffe
    caffe.set_mode_cpu()
    rng = np.random.default_rng(0)
    work = tempfile.mkdtemp(prefix="bench_infogain_")
    print("== SafeInfogainLoss / Caffe InfogainLoss, forward+backward, CPU time, BLAS threads %s, "
          "%d rounds" % (os.environ.get("OPENBLAS_NUM_THREADS"), args.rounds))
    for label, (batch, classes, spatial) in SHAPES.items():
        h = rng.random((classes, classes)).astype(np.float32) + 0.05
        h /= h.sum(axis=1, keepdims=True)
        h_path = os.path.join(work, "H_%d.binaryproto" % classes)
        with open(h_path, "wb") as f:
            f.write(caffe.io.array_to_blobproto(h.reshape(1, 1, classes, classes)).SerializeToString())
        nets = {}
        for safe in (False, True):
            path = os.path.join(work, "%s_%d.prototxt" % ("safe" if safe else "caffe", classes))
            with open(path, "w") as f:
                f.write(net_text(batch, classes, spatial, h_path, safe))
            nets[safe] = caffe.Net(path, caffe.TRAIN)
        logits = rng.standard_normal(nets[False].blobs["x"].data.shape).astype(np.float32) * 3
        labels = rng.integers(0, classes, nets[False].blobs["y"].data.shape)
        for net in nets.values():
            net.blobs["x"].data[...] = logits
            net.blobs["y"].data[...] = labels
        # Same loss and gradient first: the comparison is between equals.
        for net in nets.values():
            net.forward()
            net.backward()
        np.testing.assert_allclose(nets[True].blobs["loss"].data, nets[False].blobs["loss"].data, rtol=1e-4)
        np.testing.assert_allclose(nets[True].blobs["x"].diff, nets[False].blobs["x"].diff,
                                   rtol=1e-3, atol=1e-7)
        caffe_times, safe_times, ratios = [], [], []
        for r in range(args.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            seconds = {safe: timed(nets[safe]) for safe in order}
            caffe_times.append(seconds[False])
            safe_times.append(seconds[True])
            ratios.append(seconds[True] / seconds[False])
        print("  %-26s caffe best %8.3f ms   safe best %8.3f ms   safe/caffe median %.2f "
              "(best vs best %.2f)" % (label, 1e3 * min(caffe_times), 1e3 * min(safe_times),
                                       statistics.median(ratios), min(safe_times) / min(caffe_times)))


if __name__ == "__main__":
    main()
