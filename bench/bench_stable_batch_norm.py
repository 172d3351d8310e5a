"""StableBatchNorm against Caffe's BatchNorm on ResNet-50: ratios measured in one run.

    .venv/bin/python bench/bench_stable_batch_norm.py               # batch 4, 10 rounds
    .venv/bin/python bench/bench_stable_batch_norm.py --batch 2 --rounds 12

The net is tests/data/resnet50_train_val.prototxt (53 BatchNorm + Scale, TRAIN phase: batch
statistics, running averages updated), its Data layer replaced by DummyData of the same
shape, convolutions initialised with MSRA fillers (the file leaves them at Caffe's zero
default). Variant "stock": as published. Variant "stable": every BatchNorm replaced by the
Python StableBatchNorm of the same name (the same three blobs, lr_mult 0). Both nets get the
same weights and the same batch. One round times one forward+backward of each net, in
alternating order; the ratio is taken per round (both nets under the same machine load) and
summarised as the median of the rounds, with best-vs-best beside it. Both wall time and the
process's CPU time are measured; on a shared machine (other processes competing for the
cores) the CPU time is the steadier of the two, so BLAS runs single-threaded by default
(``--threads`` to change it; set before NumPy and Caffe load it).

Target (issue 10): stable/stock <= 1.05.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":
    _threads = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), "1")
    for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(_name, _threads)
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
os.environ.setdefault("GLOG_minloglevel", "2")


def nets_text(batch):
    from google.protobuf import text_format
    from caffe.proto import caffe_pb2
    from support.published import published_net
    stock = caffe_pb2.NetParameter()
    text_format.Parse(published_net("resnet50_train_val.prototxt", data="dummy", batch=batch,
                                    phase_only="TRAIN"), stock)
    layers = [layer for layer in stock.layer if layer.type != "Accuracy"]
    del stock.layer[:]
    stock.layer.extend(layers)
    for layer in stock.layer:
        if layer.type == "Convolution":
            layer.convolution_param.weight_filler.type = "msra"
        elif layer.type == "InnerProduct":
            layer.inner_product_param.weight_filler.type = "gaussian"
            layer.inner_product_param.weight_filler.std = 0.01
    stable = caffe_pb2.NetParameter()
    stable.CopyFrom(stock)
    count = 0
    for layer in stable.layer:
        if layer.type == "BatchNorm":
            layer.type = "Python"
            layer.python_param.module = "safe_layers"
            layer.python_param.layer = "StableBatchNorm"
            layer.python_param.param_str = "{name: %s}" % layer.name
            layer.ClearField("batch_norm_param")
            count += 1
    return text_format.MessageToString(stock), text_format.MessageToString(stable), count


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", default="1", help="BLAS threads (--threads=N; default 1)")
    args = parser.parse_args()
    import caffe
    import numpy as np
    caffe.set_mode_cpu()
    stock_text, stable_text, count = nets_text(args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for label, text in (("stock", stock_text), ("stable", stable_text)):
            path = os.path.join(tmp, label + ".prototxt")
            with open(path, "w") as f:
                f.write(text)
            paths.append(path)
        caffe.set_random_seed(1)
        stock = caffe.Net(paths[0], caffe.TRAIN)
        stable = caffe.Net(paths[1], caffe.TRAIN)
        model = os.path.join(tmp, "weights.caffemodel")
        stock.save(model)
        stable.copy_from(model)
        for net in (stock, stable):  # warm-up: allocations, first-touch pages
            net.forward()
            net.backward()
        data = stock.blobs["data"].data.copy()
        times = {(clock, label): [] for clock in ("wall", "cpu") for label in ("stock", "stable")}
        for round_ in range(args.rounds):
            order = [("stock", stock), ("stable", stable)]
            if round_ % 2:
                order.reverse()
            for label, net in order:
                wall, cpu = time.perf_counter(), time.process_time()
                net.forward()
                net.backward()
                times["cpu", label].append(time.process_time() - cpu)
                times["wall", label].append(time.perf_counter() - wall)
        assert np.array_equal(stock.blobs["data"].data.shape, data.shape)
    print("== ResNet-50 (tests/data/resnet50_train_val.prototxt), batch %d, CPU (BLAS threads: %s), "
          "forward+backward, %d BatchNorm layers, %d rounds"
          % (args.batch, os.environ.get("OPENBLAS_NUM_THREADS", "default"), count, args.rounds))
    for clock in ("cpu", "wall"):
        for label in ("stock", "stable"):
            series = times[clock, label]
            print("  %-4s %-6s best %.3f s  median %.3f s" % (clock, label, min(series), statistics.median(series)))
        ratios = [b / a for a, b in zip(times[clock, "stock"], times[clock, "stable"])]
        print("  %-4s stable/stock: median of per-round ratios %.3f (min %.3f, max %.3f); best vs best %.3f "
              "(target <= 1.05)" % (clock, statistics.median(ratios), min(ratios), max(ratios),
                                    min(times[clock, "stable"]) / min(times[clock, "stock"])))


if __name__ == "__main__":
    main()
