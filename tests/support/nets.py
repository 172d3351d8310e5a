"""The small nets the tests build, one builder each, and the solver file around a net.

* :func:`regression_net`: DummyData (x ~ N(0, data_std), t ~ N(0, 1)) -> InnerProduct
  ``fc`` (one output) -> EuclideanLoss; a test puts its layers before or after ``fc``.
* :func:`classifier_net`: DummyData (zeros) -> InnerProduct ``fc`` -> SoftmaxWithLoss.
* :func:`log_net`: x -> Log -> the test's layers on ``y`` -> EuclideanLoss: an x <= 0
  gives NaN / -Inf in ``y``.
* :func:`dead_relu`: DummyData -> fc1 (bias -100) -> ReLU (all zeros) -> fc2 ->
  SoftmaxWithLoss: a net dead without a NaN.
"""

from support.switches import TEST_MODE


def regression_net(name=None, batch=4, inputs=3, data_std=1, before_fc="", fc_bottom="x",
                   after_fc=""):
    """Prototxt of the regression net; ``before_fc`` / ``after_fc`` are layer lines (each
    ending in a newline) placed between the data and ``fc`` (which reads ``fc_bottom``) and
    between ``fc`` (top ``y``) and the loss."""
    return (('name: "%s"\n' % name if name else "")
            + 'layer { name: "data" type: "DummyData" top: "x" top: "t"\n'
            '  dummy_data_param { shape { dim: %d dim: %d } shape { dim: %d dim: 1 }\n'
            '    data_filler { type: "gaussian" std: %g } data_filler { type: "gaussian" std: 1 } } }\n'
            % (batch, inputs, batch, data_std)
            + before_fc
            + 'layer { name: "fc" type: "InnerProduct" bottom: "%s" top: "y"\n' % fc_bottom
            + '  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.1 } } }\n'
            + after_fc
            + 'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }\n')


def poison_layer(calls, sample=1, bottom="x", top="xp"):
    """A layer line of support.poison's PoisonAtCall named ``poison``: NaN into
    ``sample`` of ``bottom`` at the forward ``calls`` (counted from 1)."""
    return ('layer { name: "poison" type: "Python" bottom: "%s" top: "%s"\n'
            '  python_param { module: "support.poison" layer: "PoisonAtCall" '
            'param_str: "{calls: %s, sample: %d}" } }\n' % (bottom, top, list(calls), sample))


def guarded_poison_net(name, calls, after_fc=""):
    """The regression net with a sample poisoned at the forward ``calls`` and a NaNGuard
    ``guard`` (action warn) right after the poison, on ``fc``'s input ``xp``."""
    return regression_net(name, fc_bottom="xp", after_fc=after_fc, before_fc=(
        poison_layer(calls)
        + 'layer { name: "guard" type: "Python" bottom: "xp" top: "xp"\n'
        '  python_param { module: "safe_layers" layer: "NaNGuard" '
        'param_str: "{name: guard, follows: poison}" } }\n'))


# Linear regression that SGD with base_lr 0.1 makes diverge: inputs of std 10 put the
# curvature near 100, so every step multiplies the error by about |1 - 0.1 * 100| = 9.
# LAYER is where a test puts the layer that should keep it finite (on the fc output "y").
DIVERGING_NET = regression_net("diverging", batch=16, inputs=10, data_std=10, after_fc="LAYER\n")


def classifier_net(batch=4, inputs=3, classes=2):
    """Prototxt of the classifier net: data (batch x inputs) and label (batch), both zeros."""
    return ('layer { name: "data" type: "DummyData" top: "data" top: "label"\n'
            '  dummy_data_param { shape { dim: %d dim: %d } shape { dim: %d } } }\n'
            'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"\n'
            '  inner_product_param { num_output: %d } }\n'
            'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }\n'
            % (batch, inputs, batch, classes))


def log_net(layers, name="lognet", force_backward=True, data="input"):
    """Prototxt of the log net, ``layers`` (lines ending in a newline) on ``y``. x and t
    are 2x3: Input blobs the test fills (``data="input"``), or DummyData with x = -1 and
    t = 0 (``data="constant"``: every forward is NaN, for runs of the caffe binary)."""
    if data == "input":
        source = ('layer { name: "in" type: "Input" top: "x" top: "t" '
                  'input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } } }\n')
    else:
        source = ('layer { name: "data" type: "DummyData" top: "x" top: "t" dummy_data_param { '
                  'shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } '
                  'data_filler { type: "constant" value: -1 } data_filler { type: "constant" value: 0 } } }\n')
    return ('name: "%s"%s\n' % (name, " force_backward: true" if force_backward else "")
            + source
            + 'layer { name: "log" type: "Log" bottom: "x" top: "y" }\n'
            + layers
            + 'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "l" }\n')


def solver_text(net_path, **fields):
    """A solver file's text for ``net_path``: seeded, silent, in this run's mode."""
    values = {"base_lr": 0.01, "lr_policy": '"fixed"', "max_iter": 100, "display": 0,
              "random_seed": 1, "solver_mode": TEST_MODE.upper(), "snapshot_after_train": "false"}
    values.update(fields)
    lines = ['net: "%s"' % net_path] + ["%s: %s" % kv for kv in values.items()]
    return "\n".join(lines) + "\n"


# An AVE pooling whose last windows lie outside its input: NaN from the first forward.
POOLING_NET = """
name: "pooling_nan"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 8 dim: 1 dim: 10 dim: 10 } shape { dim: 8 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: AVE kernel_size: 3 stride: 5 } }
layer { name: "relu1" type: "ReLU" bottom: "pool1" top: "pool1" }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
  inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


# A ReLU after an fc whose bias is -100 (the inputs are N(0, 1)): its top is all zeros
# from the first iteration, while its bottom is not.
DEAD_RELU_NET = """
layer { name: "data" type: "DummyData" top: "x" top: "label"
  dummy_data_param { shape { dim: 16 dim: 8 } shape { dim: 16 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "uniform" min: 0 max: 3.99 } } }
layer { name: "fc1" type: "InnerProduct" bottom: "x" top: "h"
  inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.1 }
    bias_filler { type: "constant" value: BIAS } } }
layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "fc2" type: "InnerProduct" bottom: "h" top: "score"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
"""


def dead_relu(bias=-100):
    """DEAD_RELU_NET with fc1's bias ``bias`` (-100: the ReLU dead from the start)."""
    return DEAD_RELU_NET.replace("BIAS", str(bias))
