"""StableBatchNorm beside Caffe's BatchNorm in real nets and solvers, caffemodels both ways,
finite differences, and the cases where Caffe's layer explodes or loses precision."""

import re

import numpy as np
import pytest

from safe_layers import reporting
from safe_layers.core.params import ParamError
from support.gradients import numeric_gradient
from support.nets import solver_text
from support.published import published_net

STATS_FROZEN = "param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 } "


def ours(name, bottom, top, param_str="{}"):
    return ('layer { name: "%s" type: "Python" bottom: "%s" top: "%s" %s'
            'python_param { module: "safe_layers" layer: "StableBatchNorm" param_str: "%s" } }\n'
            % (name, bottom, top, STATS_FROZEN, param_str))


def stock(name, bottom, top, bn_param=""):
    return ('layer { name: "%s" type: "BatchNorm" bottom: "%s" top: "%s" %s}\n'
            % (name, bottom, top, ("batch_norm_param { %s } " % bn_param) if bn_param else ""))


def _dims(shape):
    return " ".join("dim: %d" % d for d in shape)


def pair_net(shape, in_place, with_scale, data="dummy", our_param="{}"):
    """data -> pre_c -> Caffe BatchNorm 'bnc' [-> Scale] -> loss_c
       data -> pre_o -> StableBatchNorm 'bno' [-> Scale] -> loss_o
    pre_* is a learnable InnerProduct (N x C) or 1x1 Convolution (N x C x H x W)."""
    c = shape[1]
    if data == "dummy":
        text = ('layer { name: "data" type: "DummyData" top: "data" top: "target" dummy_data_param { '
                'shape { %s } shape { %s } data_filler { type: "gaussian" mean: 3 std: 2 } '
                'data_filler { type: "gaussian" std: 1 } } }\n' % (_dims(shape), _dims(shape)))
    else:
        text = ('layer { name: "data" type: "Input" top: "data" top: "target" '
                'input_param { shape { %s } shape { %s } } }\n' % (_dims(shape), _dims(shape)))
    text = 'name: "bnpair" force_backward: true\n' + text
    for side, bn in (("c", stock), ("o", ours)):
        if len(shape) == 2:
            text += ('layer { name: "pre_%s" type: "InnerProduct" bottom: "data" top: "h_%s" '
                     'inner_product_param { num_output: %d weight_filler { type: "gaussian" std: 0.5 } '
                     'bias_filler { type: "constant" value: 0.5 } } }\n' % (side, side, c))
        else:
            text += ('layer { name: "pre_%s" type: "Convolution" bottom: "data" top: "h_%s" '
                     'convolution_param { num_output: %d kernel_size: 1 weight_filler { type: "gaussian" std: 0.5 } '
                     'bias_filler { type: "constant" value: 0.5 } } }\n' % (side, side, c))
        out = "h_%s" % side if in_place else "n_%s" % side
        text += bn("bn" + side, "h_%s" % side, out, our_param) if bn is ours else bn("bn" + side, "h_%s" % side, out)
        if with_scale:
            text += ('layer { name: "scale_%s" type: "Scale" bottom: "%s" top: "%s" '
                     'scale_param { bias_term: true } }\n' % (side, out, out))
        text += 'layer { name: "loss_%s" type: "EuclideanLoss" bottom: "%s" bottom: "target" top: "loss_%s" }\n' % (
            side, out, side)
    return text


def out_blob(side, in_place):
    return ("h_%s" if in_place else "n_%s") % side


def tie_weights(net, with_scale):
    for name in ("pre", "scale") if with_scale else ("pre",):
        for a, b in zip(net.params[name + "_c"], net.params[name + "_o"]):
            b.data[...] = a.data


def assert_same_stats(net):
    for i in range(3):
        np.testing.assert_allclose(net.params["bno"][i].data, net.params["bnc"][i].data, rtol=2e-5, atol=1e-5)


CASES = [((8, 5), True, False), ((8, 5), False, True), ((4, 3, 5, 5), True, True), ((4, 3, 5, 5), False, False)]
CASE_IDS = ["NxC-inplace", "NxC-scale", "NxCxHxW-inplace-scale", "NxCxHxW"]


@pytest.mark.parametrize("shape, in_place, with_scale", CASES, ids=CASE_IDS)
def test_matches_caffe_batch_norm_over_20_solver_iterations_then_in_test(
        caffe, tmp_path, shape, in_place, with_scale):
    net_path = tmp_path / "pair.prototxt"
    net_path.write_text(pair_net(shape, in_place, with_scale))
    solver_path = tmp_path / "solver.prototxt"
    solver_path.write_text(solver_text(net_path, base_lr=0.01, momentum=0.9, weight_decay=0.005))
    solver = caffe.SGDSolver(str(solver_path))
    tie_weights(solver.net, with_scale)
    solver.step(20)
    net = solver.net
    assert float(net.params["bno"][2].data[0]) == pytest.approx(sum(0.999 ** k for k in range(20)), rel=1e-5)
    assert_same_stats(net)  # weight decay did not touch them: lr_mult 0
    for a, b in zip(net.params["pre_c"], net.params["pre_o"]):  # trained through both layers alike
        np.testing.assert_allclose(b.data, a.data, rtol=1e-4, atol=1e-5)
    net.forward()
    net.backward()
    np.testing.assert_allclose(net.blobs[out_blob("o", in_place)].data, net.blobs[out_blob("c", in_place)].data,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(net.blobs["h_o"].diff, net.blobs["h_c"].diff, rtol=1e-4, atol=1e-6)

    # TEST phase: both use the stored statistics (use_global_stats defaults to true there).
    model = tmp_path / "trained.caffemodel"
    net.save(str(model))
    test_net = caffe.Net(str(net_path), str(model), caffe.TEST)
    test_net.forward()
    test_net.backward()
    np.testing.assert_allclose(test_net.blobs[out_blob("o", in_place)].data,
                               test_net.blobs[out_blob("c", in_place)].data, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(test_net.blobs["h_o"].diff, test_net.blobs["h_c"].diff, rtol=1e-4, atol=1e-6)
    assert_same_stats(test_net)  # TEST forwards do not update statistics


@pytest.mark.parametrize("use_global_stats", ["true", "false"])
def test_explicit_use_global_stats_matches_caffe(make_net, use_global_stats):
    text = pair_net((6, 4), False, False, data="input", our_param="{use_global_stats: %s}" % use_global_stats)
    text = text.replace('type: "BatchNorm" bottom: "h_c" top: "n_c" }',
                        'type: "BatchNorm" bottom: "h_c" top: "n_c" batch_norm_param { use_global_stats: %s } }'
                        % use_global_stats)
    net = make_net(text, phase="TEST" if use_global_stats == "false" else "TRAIN")
    tie_weights(net, False)
    stats = [np.array([0.5, -1, 2, 0.1]), np.array([3.0, 0.5, 1.0, 9.0]), np.array([1.7])]
    for i, value in enumerate(stats):
        net.params["bnc"][i].data[...] = value
        net.params["bno"][i].data[...] = value
    rng = np.random.default_rng(1)
    net.blobs["data"].data[...] = rng.standard_normal((6, 4))
    net.blobs["target"].data[...] = rng.standard_normal((6, 4))
    net.forward()
    net.backward()
    np.testing.assert_allclose(net.blobs["n_o"].data, net.blobs["n_c"].data, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(net.blobs["h_o"].diff, net.blobs["h_c"].diff, rtol=1e-5, atol=1e-7)
    assert_same_stats(net)


SINGLE = """
name: "single" force_backward: true
layer {{ name: "data" type: "Input" top: "data" top: "target" input_param {{ shape {{ dim: 4 dim: 3 dim: 2 dim: 2 }} shape {{ dim: 4 dim: 3 dim: 2 dim: 2 }} }} }}
layer {{ name: "pre" type: "Convolution" bottom: "data" top: "h" convolution_param {{ num_output: 3 kernel_size: 1
  weight_filler {{ type: "gaussian" std: 1 }} bias_filler {{ type: "constant" value: 1 }} }} }}
{bn}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "h" bottom: "target" top: "loss" }}
"""


@pytest.mark.parametrize("direction", ["stock_to_ours", "ours_to_stock"])
def test_caffemodel_loads_across_layer_types(caffe, tmp_path, direction):
    """Train with one layer type, save a .caffemodel, change the layer's type (same name) and load."""
    stock_text = SINGLE.format(bn=stock("bn1", "h", "h"))
    ours_text = SINGLE.format(bn=ours("bn1", "h", "h"))
    first, second = (stock_text, ours_text) if direction == "stock_to_ours" else (ours_text, stock_text)
    (tmp_path / "first.prototxt").write_text(first)
    (tmp_path / "second.prototxt").write_text(second)
    rng = np.random.default_rng(3)
    trained = caffe.Net(str(tmp_path / "first.prototxt"), caffe.TRAIN)
    for _ in range(5):
        trained.blobs["data"].data[...] = rng.standard_normal((4, 3, 2, 2)) + 2
        trained.forward()
    model = tmp_path / "bn.caffemodel"
    trained.save(str(model))
    assert float(trained.params["bn1"][2].data[0]) > 0
    x = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    outputs = []
    for text_file in ("first.prototxt", "second.prototxt"):
        net = caffe.Net(str(tmp_path / text_file), str(model), caffe.TEST)
        for i in range(3):
            np.testing.assert_array_equal(net.params["bn1"][i].data, trained.params["bn1"][i].data)
        net.blobs["data"].data[...] = x
        net.forward()
        outputs.append(net.blobs["h"].data.copy())
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("phase, param_str", [("TRAIN", "{}"), ("TEST", "{}"), ("TRAIN", "{use_global_stats: true}")])
def test_backward_matches_finite_differences(make_net, phase, param_str):
    net = make_net(SINGLE.format(bn=ours("bn1", "h", "h", param_str)), phase=phase)
    rng = np.random.default_rng(12)
    net.params["bn1"][0].data[...] = [0.3, -0.2, 1.0]
    net.params["bn1"][1].data[...] = [1.5, 0.7, 2.0]
    net.params["bn1"][2].data[...] = 1.2
    net.blobs["data"].data[...] = rng.standard_normal((4, 3, 2, 2))
    net.blobs["target"].data[...] = rng.standard_normal((4, 3, 2, 2))
    net.forward()
    net.backward()
    analytic = net.blobs["data"].diff.copy()
    numeric = numeric_gradient(net, "data", eps=1e-2)
    np.testing.assert_allclose(analytic, numeric, rtol=3e-3, atol=3e-4)


def test_statistics_update_formula(make_net):
    net = make_net(SINGLE.format(bn=ours("bn1", "h", "h", "{moving_average_fraction: 0.9}")))
    rng = np.random.default_rng(0)
    expected = [np.zeros(3), np.zeros(3), 0.0]
    for _ in range(3):
        net.blobs["data"].data[...] = rng.standard_normal((4, 3, 2, 2))
        net.forward()
        # "h" is normalized in place now; recompute the layer's input from pre's parameters.
        w, b = net.params["pre"][0].data.reshape(3, 3), net.params["pre"][1].data
        pre = np.einsum("oc,nchw->nohw", w.astype(np.float64), net.blobs["data"].data) + b[None, :, None, None]
        mean, var = pre.mean(axis=(0, 2, 3)), pre.var(axis=(0, 2, 3))
        expected = [0.9 * expected[0] + mean, 0.9 * expected[1] + 16 / 15 * var, 0.9 * expected[2] + 1]
    np.testing.assert_allclose(net.params["bn1"][0].data, expected[0], rtol=1e-5)
    np.testing.assert_allclose(net.params["bn1"][1].data, expected[1], rtol=1e-5)
    assert float(net.params["bn1"][2].data[0]) == pytest.approx(expected[2], rel=1e-6)


# ---- where Caffe's layer explodes or loses precision -----------------------------------

def _reference(x, eps=1e-5):
    x64 = x.astype(np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x64.mean(axis=axes, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x64 - mean) / np.sqrt(var + eps)


def plain_pair(shape, our_param="{}", bn_param=""):
    return ('name: "plain" force_backward: true\n'
            'layer { name: "data" type: "Input" top: "xc" top: "xo" input_param { shape { %s } shape { %s } } }\n'
            % (_dims(shape), _dims(shape))
            + stock("bnc", "xc", "yc", bn_param) + ours("bno", "xo", "yo", our_param)
            + 'layer { name: "lc" type: "Reduction" bottom: "yc" top: "lc" loss_weight: 1 reduction_param { operation: SUMSQ } }\n'
            'layer { name: "lo" type: "Reduction" bottom: "yo" top: "lo" loss_weight: 1 reduction_param { operation: SUMSQ } }\n')


def feed(net, x):
    net.blobs["xc"].data[...] = x
    net.blobs["xo"].data[...] = x
    net.forward()
    net.backward()


def test_zero_scale_factor_caffe_amplifies_ours_uses_batch_stats(caffe, tmp_path, capfd):
    # A caffemodel whose BatchNorm never saw a TRAIN forward: scale factor 0.
    path = tmp_path / "plain.prototxt"
    path.write_text(plain_pair((8, 4, 3, 3), "{name: bno}"))
    model = tmp_path / "untrained.caffemodel"
    caffe.Net(str(path), caffe.TRAIN).save(str(model))
    net = caffe.Net(str(path), str(model), caffe.TEST)
    x = np.random.default_rng(5).standard_normal((8, 4, 3, 3)).astype(np.float32) * 2 + 1
    feed(net, x)
    np.testing.assert_allclose(net.blobs["yc"].data, x / np.sqrt(1e-5), rtol=1e-5)  # ~316 x
    np.testing.assert_allclose(net.blobs["yo"].data, _reference(x), atol=1e-5)
    assert np.isfinite(net.blobs["xo"].diff).all()
    feed(net, x)
    err = capfd.readouterr().err
    assert err.count("StableBatchNorm bno in TEST: stored statistics unusable under use_global_stats "
                     "(scale factor 0.0: untrained, or a renamed layer that received no weights)") == 1


def test_zero_scale_factor_with_on_bad_stats_error_raises(make_net):
    net = make_net(plain_pair((4, 2), "{name: strict, on_bad_stats: error}"), phase="TEST")
    with pytest.raises(ValueError, match="StableBatchNorm strict in TEST: stored statistics unusable .* on_bad_stats: error"):
        feed(net, np.ones((4, 2), np.float32))


def test_nonfinite_stored_statistics_fall_back(make_net):
    net = make_net(plain_pair((6, 3)), phase="TEST")
    for prefix in ("bnc", "bno"):
        net.params[prefix][0].data[...] = [0.0, np.nan, 0.0]
        net.params[prefix][1].data[...] = 1.0
        net.params[prefix][2].data[...] = 1.0
    x = np.random.default_rng(2).standard_normal((6, 3)).astype(np.float32)
    feed(net, x)
    assert np.isnan(net.blobs["yc"].data[:, 1]).all()
    np.testing.assert_allclose(net.blobs["yo"].data, _reference(x), atol=1e-5)


def test_huge_mean_input_keeps_its_precision(make_net):
    shape = (32, 3, 8, 8)
    net = make_net(plain_pair(shape))
    x = (1e4 + np.random.default_rng(4).standard_normal(shape) * 0.05).astype(np.float32)
    feed(net, x)
    reference = _reference(x)
    ours_error = np.abs(net.blobs["yo"].data - reference).max()
    caffe_error = np.abs(net.blobs["yc"].data - reference).max()
    assert ours_error < 1e-5
    assert caffe_error > 100 * ours_error, (caffe_error, ours_error)
    # The stored variance is the noise's (times m/(m-1)), not float32 cancellation error.
    np.testing.assert_allclose(net.params["bno"][1].data,
                               x.astype(np.float64).var(axis=(0, 2, 3)) * 2048 / 2047, rtol=1e-6)
    assert np.isfinite(net.blobs["xo"].diff).all()


@pytest.mark.parametrize("shape", [(16, 3, 4, 4), (1, 3), (1, 3, 1, 1), (5, 3, 1, 1)],
                         ids=["constant-channels", "batch1", "batch1-spatial1", "spatial1"])
def test_degenerate_batches_stay_finite_and_exact(make_net, shape):
    net = make_net(plain_pair(shape))
    rng = np.random.default_rng(6)
    x = rng.standard_normal(shape).astype(np.float32)
    if shape[0] > 1 and len(shape) == 4 and shape[2] > 1:
        x[:, 0] = 0.1  # constant channels, at values float32 cannot hold exactly
        x[:, 2] = -7.3
    feed(net, x)
    assert np.isfinite(net.blobs["yo"].data).all() and np.isfinite(net.blobs["xo"].diff).all()
    np.testing.assert_allclose(net.blobs["yo"].data, _reference(x), atol=1e-5)
    for i in range(3):
        assert np.isfinite(net.params["bno"][i].data).all()
    if x.size // x.shape[1] == 1:  # one value per channel: y = 0 and the gradient is 0
        assert not net.blobs["yo"].data.any() and not net.blobs["xo"].diff.any()


def test_nonfinite_input_is_reported_and_kept_out_of_the_statistics(make_net, capfd):
    net = make_net(plain_pair((4, 3), "{name: bnx, follows: fc}"))
    x = np.ones((4, 3), np.float32)
    x[2, 1] = np.nan
    feed(net, x)
    assert np.isfinite(net.params["bno"][1].data).all() and np.isnan(net.params["bnc"][1].data).any()
    assert float(net.params["bno"][2].data[0]) == 0.0  # the batch was skipped
    report = reporting.fault_logs("bnx")[-1].last
    assert (report.nan, report.first_index) == (1, (2, 1))
    assert "StableBatchNorm bnx (after fc) in TRAIN: non-finite forward data" in capfd.readouterr().err


def test_nonfinite_input_abort(make_net):
    net = make_net(plain_pair((4, 3), "{name: bna, action: abort}"))
    x = np.ones((4, 3), np.float32)
    x[0, 0] = np.inf
    with pytest.raises(FloatingPointError, match=r"StableBatchNorm bna in TRAIN: non-finite forward data, .* \+inf=1"):
        feed(net, x)


@pytest.mark.parametrize("param_str, message", [
    ("{eps: 0}", "key 'eps' has value 0; allowed: a number > 0 and <= 3.4028235e\\+38"),
    ("{eps: -1e-5}", "key 'eps' has value '-1e-5'; allowed: a number > 0 and <= 3.4028235e\\+38"),
    ("{moving_average_fraction: 1.5}", "key 'moving_average_fraction' has value 1.5; allowed: a number >= 0 and <= 1$"),
    ("{use_global_stats: maybe}", "key 'use_global_stats' has value 'maybe'; allowed: a boolean"),
])
def test_bad_params_fail_at_setup(make_net, param_str, message):
    with pytest.raises(ParamError, match="StableBatchNorm param_str: " + message):
        make_net(plain_pair((4, 3), param_str))


CLI_NET = """
name: "cli_bn"
layer {{ name: "data" type: "DummyData" top: "data" top: "target" dummy_data_param {{
  shape {{ dim: 8 dim: 2 dim: 3 dim: 3 }} shape {{ dim: 8 dim: 4 dim: 3 dim: 3 }}
  data_filler {{ type: "gaussian" mean: 5 std: 2 }} data_filler {{ type: "gaussian" std: 1 }} }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "h" convolution_param {{ num_output: 4
  kernel_size: 1 weight_filler {{ type: "gaussian" std: 1 }} bias_filler {{ type: "constant" value: 3 }} }} }}
{bn}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "h" bottom: "target" top: "loss" }}
"""


def _test_losses(caffe_train, bn):
    # test_initialization (default true) tests before the first training step: the
    # statistics are still zero then, the case of a renamed layer with no weights.
    result = caffe_train(CLI_NET.format(bn=bn), test_iter=1, test_interval=5, max_iter=10)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr, [float(line.rsplit("=", 1)[1].split()[0]) for line in result.stderr.splitlines()
                           if "Test net output #0: loss =" in line]


def test_caffe_train_tests_before_training_without_the_316x_blow_up(caffe_train):
    stock_log, stock_losses = _test_losses(caffe_train, stock("bn", "h", "h"))
    ours_log, ours_losses = _test_losses(caffe_train, ours("bn", "h", "h", "{name: bn}"))
    assert len(stock_losses) == len(ours_losses) == 3  # iterations 0, 5 and 10
    # Iteration 0: Caffe's test net outputs x / sqrt(eps), about 316 x.
    assert stock_losses[0] > 1e5
    assert ours_losses[0] < 100  # batch-normalized outputs vs N(0, 1) targets: ~ 4 * 9 per sample
    assert ours_log.count("StableBatchNorm bn in TEST: stored statistics unusable under use_global_stats") == 1
    # Later tests use the trained statistics in both, and agree.
    np.testing.assert_allclose(ours_losses[1:], stock_losses[1:], rtol=1e-3)


def test_a_batch_that_would_overflow_the_statistics_is_kept_out_and_reported(make_net, capfd):
    net = make_net(plain_pair((8, 3), "{name: huge, follows: fc}"))
    x = np.random.default_rng(7).standard_normal((8, 3)).astype(np.float32)
    x[:, 1] *= 1e20  # finite, but its variance (1e40) is beyond float32
    feed(net, x)
    assert np.isinf(net.params["bnc"][1].data[1])  # Caffe's BatchNorm: Inf for good
    for i in range(3):  # ours: the update skipped as a whole
        assert not net.params["bno"][i].data.any()
    np.testing.assert_allclose(net.blobs["yo"].data, _reference(x), atol=1e-5)  # and the output exact
    assert np.isfinite(net.blobs["xo"].diff).all()
    report = reporting.fault_logs("huge")[-1].last
    assert (report.kind, report.nan, report.posinf, report.action) == ("out-of-range", 0, 0, "warn")
    expected = x[:, 1].astype(np.float64).var() * 8 / 7  # what Caffe's update would add
    assert report.detail == ("the running variance would overflow float32 (channel 1: %.7g); this batch "
                             "is kept out of the running statistics" % expected)
    line = [l for l in capfd.readouterr().err.splitlines() if "StableBatchNorm huge" in l][0]
    assert reporting.parse_line(line).report == report
    feed(net, x / np.float32(1e20) * 0 + 1 + np.arange(8, dtype=np.float32)[:, None])  # an ordinary batch
    assert float(net.params["bno"][2].data[0]) == 1.0 and np.isfinite(net.params["bno"][1].data).all()


def test_a_batch_that_would_overflow_the_statistics_aborts_with_action_abort(make_net):
    net = make_net(plain_pair((8, 3), "{name: huge, action: abort}"))
    x = np.ones((8, 3), np.float32)
    x[::2, 0] = 1e20
    with pytest.raises(reporting.FaultAbort, match=r"running variance would overflow float32 \(channel 0"):
        feed(net, x)
    assert not net.params["bno"][2].data.any()


def test_unusable_statistics_are_reported_in_one_line_per_net(caffe, tmp_path, capfd):
    """ResNet-50 (53 BatchNorm) as StableBatchNorm, TEST phase, no weights loaded."""
    text = published_net("resnet50_train_val.prototxt", data="input", batch=1, phase_only="TEST")
    text = text.replace('type: "BatchNorm"', 'type: "Python" python_param { module: "safe_layers" '
                        'layer: "StableBatchNorm" }')
    names = re.findall(r'name: "(bn[^"]*)"', text)
    assert len(names) == 53
    path = tmp_path / "resnet50_stable.prototxt"
    path.write_text(text)
    def run(net):
        net.blobs["data"].data[...] = np.random.default_rng(0).standard_normal(net.blobs["data"].data.shape)
        net.forward()
        assert np.isfinite(net.blobs["fc1000"].data).all()
    first = caffe.Net(str(path), caffe.TEST)
    run(first)
    second = caffe.Net(str(path), caffe.TEST)
    for net in (second, first, second):
        run(net)
    lines = [l for l in capfd.readouterr().err.splitlines() if "stored statistics unusable" in l]
    assert len(lines) == 2, lines  # one per net, not 53 each
    for line in lines:
        parsed = reporting.parse_line(line)
        assert parsed.kind == "notice" and parsed.subject.layer == "#1" and parsed.subject.phase == "TEST"
        assert "so are those of 52 more StableBatchNorm layers in TEST: #2, #3," in line
        assert line.endswith("#53; normalizing with batch statistics instead of x/sqrt(eps) (reported once)")


@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_eps_is_what_is_added_to_the_variance(make_net, phase, eps):
    net = make_net(plain_pair((6, 3), "{eps: %r}" % eps, bn_param="eps: %r" % eps), phase=phase)
    stats = [np.array([0.5, -1.0, 2.0]), np.array([0.25, 4.0, 1.0]), np.array([1.0])]
    for i, value in enumerate(stats):
        net.params["bnc"][i].data[...] = value
        net.params["bno"][i].data[...] = value
    x = np.random.default_rng(9).standard_normal((6, 3)).astype(np.float32)
    feed(net, x)
    if phase == "TRAIN":
        expected = _reference(x, eps)
    else:
        expected = (x - stats[0]) / np.sqrt(stats[1] + eps)
    np.testing.assert_allclose(net.blobs["yo"].data, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.blobs["yo"].data, net.blobs["yc"].data, rtol=1e-4, atol=1e-5)  # as Caffe
