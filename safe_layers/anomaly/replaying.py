"""Run a record's batch (:mod:`safe_layers.anomaly.record`) through a net again, under a
net watch, to find the layer that produced its fault."""

from safe_layers.anomaly.record import read_record
from safe_layers.anomaly.watcher import Watch


def replay(path, net, **watch_options):
    """Run a record's batch through ``net`` (a caffe.Net of the same prototxt, TRAIN)
    with its weights, forward then backward, under a net watch; returns the
    ProducerFaults found (the first is the producer the record names, if the fault
    came from the batch and the weights)."""
    document, inputs, weights = read_record(path)
    if weights:
        net.copy_from(weights)
    watch_options.setdefault("on_nonfinite", "warn")
    watch = Watch(net=net, **watch_options)
    try:
        probe = watch.probes[0]
        for name, array in inputs.items():
            net.blobs[name].reshape(*array.shape)
            net.blobs[name].data[...] = array
        probe.begin_forward()
        for i in range(len(probe.names)):
            if i in probe.data_layers:
                probe.after_forward(i)  # checked, not run: running it would read a new batch
            else:
                net._forward(i, i)
        net._backward(len(probe.names) - 1, 0)
        return list(probe.producers)
    finally:
        watch.close()
