"""GradientClip over several bottoms, inside real Caffe nets: in ``mode: norm`` one L2 norm
over all of them and one scale, so the gradient keeps its direction.

Two EuclideanLosses, on x (4x5) and on y (4x3), send x and y the gradients (x - tx) / 4
and (y - ty) / 4; a clip takes both. Then a siamese net (two branches sharing their
weights by ``param { name: ... }``, ContrastiveLoss on both features) whose branches
cancel in the shared bias of the last layer: its gradient is exactly 0, and stays so
under one clip of both features, not under a clip of one feature alone.
"""

import numpy as np
import pytest

from safe_layers import reporting
from safe_layers.core.params import ParamError
from support.gradients import numeric_gradient

SHAPES = {"x": (4, 5), "y": (4, 3)}


def clip_tops(top_names):
    return "".join('top: "%s" ' % t for t in top_names)


def pair_net(param_str, tops=("x", "y"), propagate_down=None, shapes=SHAPES):
    """x and y through one GradientClip (bottoms x, y; ``tops``), each into its own
    EuclideanLoss (against tx, ty); ``propagate_down``: the clip's fields, if given."""
    dims = lambda s: " ".join("dim: %d" % d for d in s)
    down = "".join("propagate_down: %s " % ("true" if d else "false") for d in propagate_down or ())
    return ('name: "pair" force_backward: true\n'
            'layer { name: "in" type: "Input" top: "x" top: "y" top: "tx" top: "ty" input_param { '
            'shape { %s } shape { %s } shape { %s } shape { %s } } }\n'
            % (dims(shapes["x"]), dims(shapes["y"]), dims(shapes["x"]), dims(shapes["y"]))
            + 'layer { name: "clip" type: "Python" bottom: "x" bottom: "y" %s%spython_param { '
              'module: "safe_layers" layer: "GradientClip" param_str: "%s" } }\n'
            % (clip_tops(tops), down, param_str)
            + 'layer { name: "loss_x" type: "EuclideanLoss" bottom: "%s" bottom: "tx" top: "loss_x" }\n' % tops[0]
            + 'layer { name: "loss_y" type: "EuclideanLoss" bottom: "%s" bottom: "ty" top: "loss_y" }\n' % tops[1])


@pytest.fixture
def inputs():
    rng = np.random.default_rng(11)
    values = {name: rng.standard_normal(shape).astype(np.float32) * 3 for name, shape in SHAPES.items()}
    values.update({"t" + name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()})
    return values


def run(net, values):
    for name, value in values.items():
        net.blobs[name].data[...] = value
    net.forward()
    net.backward()
    return {name: net.blobs[name].diff.copy() for name in SHAPES}


def raw(values):
    """The clip-free gradients, in float64."""
    return {name: (values[name].astype(np.float64) - values["t" + name]) / values[name].shape[0]
            for name in SHAPES}


def joint_norm(grads):
    return np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values()))


def numeric(net, values):
    """Finite differences of the summed losses w.r.t. x and y."""
    for name, value in values.items():
        net.blobs[name].data[...] = value
    return {name: numeric_gradient(net, name, loss="loss_x") + numeric_gradient(net, name, loss="loss_y")
            for name in SHAPES}


@pytest.mark.parametrize("tops", [("x", "y"), ("xc", "yc"), ("x", "yc")],
                         ids=["in-place", "copies", "mixed"])
def test_an_inactive_clip_is_identity_forward_and_matches_finite_differences(make_net, inputs, tops):
    net = make_net(pair_net("{max_norm: 1e6}", tops))
    got = run(net, inputs)
    for name, top in zip(SHAPES, tops):
        np.testing.assert_array_equal(net.blobs[top].data, inputs[name])
        np.testing.assert_array_equal(got[name], raw(inputs)[name].astype(np.float32))
    expected = numeric(net, inputs)
    for name in SHAPES:
        np.testing.assert_allclose(got[name], expected[name], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("tops", [("x", "y"), ("xc", "yc"), ("x", "yc")],
                         ids=["in-place", "copies", "mixed"])
def test_one_norm_over_both_keeps_the_direction_of_the_finite_difference_gradient(make_net, inputs, tops):
    free = raw(inputs)
    norm = joint_norm(free)
    max_norm = 0.25 * norm
    net = make_net(pair_net("{name: both, max_norm: %r}" % float(max_norm), tops))
    got = run(net, inputs)
    # Each bottom alone is above the bound too: a clip per blob would scale each by its own
    # factor (max_norm / its norm) and turn the gradient.
    assert all(np.linalg.norm(g) > max_norm for g in free.values())
    scale = max_norm / (norm + 1e-6)
    expected = numeric(make_net(pair_net("{max_norm: 1e6}", tops)), inputs)
    for name in SHAPES:
        np.testing.assert_allclose(got[name], free[name] * scale, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(got[name], expected[name] * scale, rtol=2e-3, atol=2e-3 * scale)
    assert joint_norm(got) == pytest.approx(max_norm, rel=1e-5)
    clip = next(layer for layer in net.layers if hasattr(layer, "stats"))
    assert clip.stats.calls == 1 and clip.stats.clipped_total() == 1
    assert clip.stats.norm_stats()[2] == pytest.approx(norm, rel=1e-6)


def test_a_bottom_caffe_asks_no_gradient_for_is_left_out_of_the_norm_and_alone(make_net, inputs):
    """propagate_down false on y (no force_backward: it would override it): Caffe passes
    the clip propagate_down [true, false]; the norm is x's alone, and y's diff is what the
    loss above wrote (the clip is in place). x and y come from learned biases (0), so
    that they need a gradient at all."""
    text = pair_net("{max_norm: 1}", propagate_down=(True, False)).replace(" force_backward: true", "")
    text = text.replace('top: "x" top: "y" top: "tx"', 'top: "x0" top: "y0" top: "tx"')
    biases = "".join('layer { name: "b%s" type: "Bias" bottom: "%s0" top: "%s" bias_param { axis: 1 num_axes: 1 '
                     'filler { type: "constant" value: 0 } } }\n' % (n, n, n) for n in SHAPES)
    text = text.replace('layer { name: "clip"', biases + 'layer { name: "clip"')
    free = raw(inputs)
    max_norm = 0.5 * np.linalg.norm(free["x"])
    net = make_net(text.replace("{max_norm: 1}", "{max_norm: %r}" % float(max_norm)))
    got = run(net, {("%s0" % k if k in SHAPES else k): v for k, v in inputs.items()})
    scale = max_norm / (np.linalg.norm(free["x"]) + 1e-6)
    np.testing.assert_allclose(got["x"], free["x"] * scale, rtol=1e-5)
    np.testing.assert_allclose(got["y"], free["y"], rtol=1e-6)


def test_value_mode_clips_every_element_of_every_bottom(make_net, inputs):
    net = make_net(pair_net("{name: v, mode: value, clip: 0.4}"))
    free = raw(inputs)
    assert all((np.abs(g) > 0.4).any() for g in free.values())  # not vacuous on either
    got = run(net, inputs)
    for name in SHAPES:
        np.testing.assert_allclose(got[name], np.clip(free[name], -0.4, 0.4), rtol=1e-6)
    clip = next(layer for layer in net.layers if hasattr(layer, "stats"))
    assert clip.stats.clipped_total() == 1
    assert clip.stats.norm_stats()[2] == pytest.approx(joint_norm(free), rel=1e-6)


def test_per_sample_norms_run_across_both_bottoms(make_net, inputs):
    free = raw(inputs)
    both = np.concatenate([free["x"], free["y"]], axis=1)  # sample i: its x row and its y row
    norms = np.linalg.norm(both, axis=1)
    max_norm = float(np.median(norms))
    net = make_net(pair_net("{max_norm: %r, per_sample: true}" % float(max_norm)))
    got = run(net, inputs)
    scale = np.minimum(1.0, max_norm / (norms + 1e-6))[:, None]
    assert (scale < 1).any() and (scale == 1).any()
    for name in SHAPES:
        np.testing.assert_allclose(got[name], free[name] * scale, rtol=1e-5, atol=1e-8)


def test_per_sample_needs_the_same_samples_in_every_bottom(make_net):
    shapes = {"x": (4, 5), "y": (3, 3)}
    with pytest.raises(ParamError, match=r"per_sample: every bottom must hold the same number of "
                                         r"samples \(axis 0\); got 4, 3"):
        make_net(pair_net("{max_norm: 1, per_sample: true}", shapes=shapes))


def test_tops_pair_with_bottoms(make_net):
    text = pair_net("{max_norm: 1}").replace('top: "x" top: "y" python_param', 'top: "x" python_param')
    with pytest.raises(ParamError, match="takes one top for each bottom"):
        make_net(text.replace('bottom: "y" top: "loss_y"', 'bottom: "ty" top: "loss_y"'))


def test_a_nan_in_the_second_bottom_is_zeroed_before_the_one_norm_and_named(make_net, inputs):
    inputs["y"][2, 1] = np.nan
    free = raw(inputs)
    free["y"][~np.isfinite(free["y"])] = 0.0
    max_norm = 0.5 * joint_norm(free)
    net = make_net(pair_net("{name: z, max_norm: %r}" % float(max_norm)))
    got = run(net, inputs)
    scale = max_norm / (joint_norm(free) + 1e-6)
    for name in SHAPES:
        assert np.isfinite(got[name]).all()
        np.testing.assert_allclose(got[name], free[name] * scale, rtol=1e-5, atol=1e-8)
    report = reporting.fault_logs("z")[-1].last
    assert (report.blob_index, report.nan, report.first_index, report.action) == (1, 1, (2, 1), "zero")


def test_nonfinite_error_names_the_bottom(make_net, inputs):
    inputs["y"][0, 2] = np.inf
    net = make_net(pair_net("{name: e, follows: loss, max_norm: 1, nonfinite: error}"))
    with pytest.raises(FloatingPointError, match=r"GradientClip e \(after loss\) in TRAIN: non-finite "
                                                 r"backward diff, iteration 0 \(call 1\), bottom\[1\] "
                                                 r"shape 4x3: nan=0 \+inf=1 -inf=0"):
        run(net, inputs)


# --- a siamese net: shared weights, two branches that cancel in the last shared bias ------------

def branch(suffix, bottom):
    s = suffix
    return ('layer { name: "conv1%s" type: "Convolution" bottom: "%s" top: "conv1%s"\n'
            '  param { name: "conv1_w" } param { name: "conv1_b" }\n'
            '  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "xavier" } '
            'bias_filler { type: "constant" value: 0.1 } } }\n'
            'layer { name: "relu1%s" type: "ReLU" bottom: "conv1%s" top: "conv1%s" }\n'
            'layer { name: "feat%s" type: "InnerProduct" bottom: "conv1%s" top: "feat%s"\n'
            '  param { name: "feat_w" } param { name: "feat_b" }\n'
            '  inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }\n'
            % (s, bottom, s, s, s, s, s, s, s))


def siamese_net(clip=""):
    """``clip``: the GradientClip layer(s) put between the features and the loss."""
    return ('name: "siamese"\n'
            'layer { name: "pair_data" type: "Input" top: "pair_data" top: "sim" '
            'input_param { shape { dim: 8 dim: 2 dim: 6 dim: 6 } shape { dim: 8 } } }\n'
            'layer { name: "slice_pair" type: "Slice" bottom: "pair_data" top: "data" top: "data_p" '
            'slice_param { slice_dim: 1 slice_point: 1 } }\n'
            + branch("", "data") + branch("_p", "data_p") + clip
            + 'layer { name: "loss" type: "ContrastiveLoss" bottom: "feat" bottom: "feat_p" bottom: "sim" '
              'top: "loss" contrastive_loss_param { margin: 1 } }\n')


def clip_layer(name, blobs, max_norm):
    return ('layer { name: "%s" type: "Python" %s%spython_param { module: "safe_layers" '
            'layer: "GradientClip" param_str: "{name: %s, max_norm: %r}" } }\n'
            % (name, "".join('bottom: "%s" ' % b for b in blobs), clip_tops(blobs), name, float(max_norm)))


def siamese_gradients(make_net, text, weights=None):
    net = make_net(text, weights=weights)
    rng = np.random.default_rng(3)
    net.blobs["pair_data"].data[...] = rng.uniform(0, 1, net.blobs["pair_data"].data.shape)
    net.blobs["sim"].data[...] = [1, 0, 1, 0, 0, 1, 0, 1]
    net.forward()
    net.backward()
    grads = {(name, i): blob.diff.copy() for name, blobs in net.params.items() for i, blob in enumerate(blobs)}
    feats = {b: net.blobs[b].diff.copy() for b in ("feat", "feat_p")}
    return net, grads, feats


def test_one_clip_over_both_branches_keeps_the_shared_gradients_direction(make_net, tmp_path):
    original, free, feats = siamese_gradients(make_net, siamese_net())
    weights = str(tmp_path / "siamese.caffemodel")
    original.save(weights)
    # The branches cancel in feat's bias: its gradient is exactly 0 without a clip.
    assert not free[("feat", 1)].any() and np.abs(free[("conv1", 0)]).max() > 0
    norm = joint_norm(feats)
    max_norm = 0.3 * norm
    assert all(np.linalg.norm(f) > max_norm for f in feats.values())

    _, joint, _ = siamese_gradients(make_net, siamese_net(clip_layer("loss_clip", ["feat", "feat_p"], max_norm)),
                                    weights)
    scale = max_norm / (norm + 1e-6)
    assert not joint[("feat", 1)].any()  # still exactly 0
    for key, grad in free.items():
        np.testing.assert_allclose(joint[key], grad * scale, rtol=1e-4, atol=1e-7 * np.abs(grad).max())

    # What a clip of feat alone (bottom 0, as harden wrote it before) does instead.
    _, alone, _ = siamese_gradients(make_net, siamese_net(clip_layer("feat_clip", ["feat"], max_norm)), weights)
    assert np.abs(alone[("feat", 1)]).max() > 1e-3
    conv_free, conv_alone = free[("conv1", 0)].ravel(), alone[("conv1", 0)].ravel()
    fitted = conv_alone @ conv_free / (conv_free @ conv_free)  # the best single scalar
    assert np.linalg.norm(conv_alone - fitted * conv_free) > 0.05 * np.linalg.norm(conv_alone)


def test_an_inactive_clip_over_both_branches_changes_no_bit(make_net, tmp_path):
    original, free, _ = siamese_gradients(make_net, siamese_net())
    weights = str(tmp_path / "siamese.caffemodel")
    original.save(weights)
    _, clipped, _ = siamese_gradients(make_net, siamese_net(clip_layer("loss_clip", ["feat", "feat_p"], 1e6)),
                                      weights)
    for key, grad in free.items():
        np.testing.assert_array_equal(clipped[key], grad)
