"""A published net with a NaNGuard after every layer (and optionally StableBatchNorm in
place of BatchNorm), for the tests and benchmarks of the deferred checks.

    text, guards = guard_every_layer(published_net("resnet50_train_val.prototxt", ...))
"""


def guard_every_layer(net_text, action="warn", stable_batch_norm=False):
    """(text, number of guards): an in-place NaNGuard (``action``, both passes) on every top
    of every layer but the data, loss and accuracy layers; with ``stable_batch_norm`` each
    BatchNorm becomes a StableBatchNorm of the same name (its three params kept)."""
    from google.protobuf import text_format
    from caffe.proto import caffe_pb2
    net = caffe_pb2.NetParameter()
    text_format.Parse(net_text, net)
    layers, guards = [], 0
    for layer in net.layer:
        if stable_batch_norm and layer.type == "BatchNorm":
            layer.type = "Python"
            layer.python_param.module = "safe_layers"
            layer.python_param.layer = "StableBatchNorm"
            layer.python_param.param_str = "{name: %s}" % layer.name
            layer.ClearField("batch_norm_param")
            while len(layer.param) < 3:
                layer.param.add(lr_mult=0)
        layers.append(layer)
        if layer.type in ("DummyData", "Input", "Data") or "Loss" in layer.type or \
                layer.type == "Accuracy":
            continue
        for top in layer.top:
            guards += 1
            guard = caffe_pb2.LayerParameter(name="%s_%s_guard" % (layer.name, top), type="Python",
                                             bottom=[top], top=[top])
            guard.include.extend(layer.include)
            guard.python_param.module = "safe_layers"
            guard.python_param.layer = "NaNGuard"
            guard.python_param.param_str = "{name: %s_guard%d, follows: %s, action: %s}" % (
                top, guards, layer.name, action)
            layers.append(guard)
    del net.layer[:]
    net.layer.extend(layers)
    return text_format.MessageToString(net), guards
