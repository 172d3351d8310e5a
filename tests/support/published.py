"""The published nets of tests/data, made runnable here: their Data layers (which read
LMDBs we do not have) replaced by layers of the same name, tops and shapes.

    text = published_net("lenet_train_test.prototxt", data="dummy", batch=16)
"""

from support.paths import DATA

# (channels, height, width, classes) of what each published net's Data layer reads.
SHAPES = {
    "lenet_train_test.prototxt": (1, 28, 28, 10),
    "cifar10_quick_train_test.prototxt": (3, 32, 32, 10),
    "cifar10_full_sigmoid_train_test_bn.prototxt": (3, 32, 32, 10),
    "resnet50_train_val.prototxt": (3, 224, 224, 1000),
}


def published_net(name, data="dummy", batch=None, arrays=None, phase_only=None):
    """The text of ``tests/data/<name>`` with each Data layer replaced.

    data: "dummy" (DummyData: uniform [0, 1) images, uniform labels, seeded by the
    solver's random_seed, so `caffe train` and pycaffe see the same batches), "input"
    (an Input layer the caller fills), or "array" (support/poison.py's ArrayData reading
    ``arrays`` = (data.npy, labels.npy)). batch: override the batch size.
    phase_only: "TRAIN" drops the layers included only in TEST (and vice versa).
    """
    from google.protobuf import text_format
    from caffe.proto import caffe_pb2
    net = caffe_pb2.NetParameter()
    text_format.Parse((DATA / name).read_text(), net)
    channels, height, width, classes = SHAPES[name]
    layers = []
    for layer in net.layer:
        phases = {rule.phase for rule in layer.include if rule.HasField("phase")}
        if phase_only is not None and phases and getattr(caffe_pb2, phase_only) not in phases:
            continue
        if layer.type in ("Data", "ImageData"):
            size = batch or layer.data_param.batch_size or layer.image_data_param.batch_size
            crop = layer.transform_param.crop_size
            h, w = (crop, crop) if crop else (height, width)
            new = caffe_pb2.LayerParameter(name=layer.name, top=list(layer.top))
            new.include.extend(layer.include)
            if data == "input":
                new.type = "Input"
                new.input_param.shape.add(dim=[size, channels, h, w])
                new.input_param.shape.add(dim=[size])
            elif data == "array":
                new.type = "Python"
                new.python_param.module = "support.poison"
                new.python_param.layer = "ArrayData"
                new.python_param.param_str = "{data: %s, labels: %s, batch_size: %d}" % (
                    arrays[0], arrays[1], size)
            else:
                new.type = "DummyData"
                param = new.dummy_data_param
                param.shape.add(dim=[size, channels, h, w])
                param.shape.add(dim=[size])
                param.data_filler.add(type="uniform", min=0, max=1)
                param.data_filler.add(type="uniform", min=0, max=classes - 0.01)
            layer = new
        layers.append(layer)
    del net.layer[:]
    net.layer.extend(layers)
    return text_format.MessageToString(net)


def published_solver_fields(name):
    """The fields of ``tests/data/<name>`` (a solver) other than net/snapshot/mode, as a
    dict for conftest's solver writer."""
    from google.protobuf import text_format
    from caffe.proto import caffe_pb2
    solver = caffe_pb2.SolverParameter()
    text_format.Parse((DATA / name).read_text(), solver)
    out = {}
    for field, value in solver.ListFields():
        if field.name in ("net", "snapshot", "snapshot_prefix", "solver_mode", "max_iter",
                          "display", "test_iter", "test_interval"):
            continue
        if field.type == field.TYPE_STRING:
            out[field.name] = '"%s"' % value
        elif not isinstance(value, (list, tuple)) and not hasattr(value, "__len__"):
            out[field.name] = value
    return out
