"""GradientClip inside real Caffe nets and solvers.

The gradient reaching the clip is EuclideanLoss's dL/dx = (x - t) / N, so each expected
value is computed here from x and t alone.
"""

import numpy as np
import pytest

from safe_layers import reporting
from safe_layers.core.params import ParamError
from support.gradients import numeric_gradient
from support.nets import DIVERGING_NET


def clip_net(param_str, shape=(4, 5), in_place=True):
    dims = " ".join("dim: %d" % d for d in shape)
    top = "x" if in_place else "xc"
    return ('name: "clip" force_backward: true\n'
            'layer { name: "in" type: "Input" top: "x" top: "t" '
            'input_param { shape { %s } shape { %s } } }\n' % (dims, dims)
            + 'layer { name: "clip" type: "Python" bottom: "x" top: "%s" python_param { '
              'module: "safe_layers" layer: "GradientClip" param_str: "%s" } }\n' % (top, param_str)
            + 'layer { name: "loss" type: "EuclideanLoss" bottom: "%s" bottom: "t" top: "loss" }\n' % top)


def run(net, x, t):
    net.blobs["x"].data[...] = x
    net.blobs["t"].data[...] = t
    net.forward()
    net.backward()
    return net.blobs["x"].diff.copy()


@pytest.fixture
def xt():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 5)).astype(np.float32) * 3
    t = rng.standard_normal((4, 5)).astype(np.float32)
    return x, t


def raw_grad(x, t):
    return (x.astype(np.float64) - t) / x.shape[0]


@pytest.mark.parametrize("in_place", [True, False])
def test_forward_is_identity_and_backward_matches_finite_differences(make_net, xt, in_place):
    net = make_net(clip_net("{max_norm: 1e6}", in_place=in_place))
    x, t = xt
    grad = run(net, x, t)
    top = "x" if in_place else "xc"
    np.testing.assert_array_equal(net.blobs[top].data, x)
    np.testing.assert_allclose(grad, numeric_gradient(net, "x"), rtol=2e-3, atol=2e-3)


def test_value_mode_clips_each_element(make_net, xt):
    net = make_net(clip_net("{name: v, mode: value, clip: 0.5}"))
    x, t = xt
    expected = np.clip(raw_grad(x, t), -0.5, 0.5)
    assert (np.abs(raw_grad(x, t)) > 0.5).any()  # the case is not vacuous
    np.testing.assert_allclose(run(net, x, t), expected, rtol=1e-6)
    assert reporting.fault_logs("v")[-1].count == 0


def test_norm_mode_rescales_the_whole_blob(make_net, xt):
    net = make_net(clip_net("{mode: norm, max_norm: 0.5}"))
    x, t = xt
    g = raw_grad(x, t)
    assert np.linalg.norm(g) > 0.5
    expected = g * 0.5 / (np.linalg.norm(g) + 1e-6)
    got = run(net, x, t)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.linalg.norm(got) == pytest.approx(0.5, rel=1e-5)


def test_norm_below_the_bound_passes_unchanged(make_net, xt):
    net = make_net(clip_net("{max_norm: 100}"))
    x, t = xt
    np.testing.assert_allclose(run(net, x, t), raw_grad(x, t), rtol=1e-6)


def test_per_sample_norms_are_bounded_separately(make_net, xt):
    net = make_net(clip_net("{max_norm: 0.4, per_sample: true}"))
    x, t = xt
    x[0] = t[0] + 0.01  # sample 0 is small and must stay as it is
    g = raw_grad(x, t)
    norms = np.linalg.norm(g, axis=1)
    expected = g * np.minimum(1.0, 0.4 / (norms + 1e-6))[:, None]
    got = run(net, x, t)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(got[0], g[0], rtol=1e-6)
    assert np.all(np.linalg.norm(got, axis=1) <= 0.4 * (1 + 1e-5))


def test_nonfinite_zero_happens_before_the_norm(make_net, xt):
    net = make_net(clip_net("{name: z, max_norm: 0.5, nonfinite: zero}"))
    x, t = xt
    x[1, 2] = np.nan
    x[3, 0] = np.inf
    g = raw_grad(x, t)
    g[~np.isfinite(g)] = 0.0
    expected = g * min(1.0, 0.5 / (np.linalg.norm(g) + 1e-6))
    got = run(net, x, t)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    report = reporting.fault_logs("z")[-1].last
    assert (report.nan, report.posinf, report.first_index) == (1, 1, (1, 2))
    assert report.pass_ == "backward diff" and report.action == "zero"


def test_nonfinite_error_raises_with_the_report(make_net, xt, capfd):
    net = make_net(clip_net("{name: e, follows: fc, max_norm: 1, nonfinite: error}"))
    x, t = xt
    x[2, 2] = -np.inf
    with pytest.raises(FloatingPointError, match=r"GradientClip e \(after fc\) in TRAIN: non-finite backward diff, "
                                                 r"iteration 0 \(call 1\), bottom\[0\] shape 4x5: "
                                                 r"nan=0 \+inf=0 -inf=1; first bad at \[2, 2\] = -inf"):
        run(net, x, t)
    assert "ABORT GradientClip e (after fc)" in capfd.readouterr().err


def test_nonfinite_keep_passes_them_and_clips_the_rest(make_net, xt):
    net = make_net(clip_net("{max_norm: 0.5, nonfinite: keep}"))
    x, t = xt
    x[0, 0] = np.nan
    g = raw_grad(x, t)
    finite = np.where(np.isfinite(g), g, 0.0)
    expected = g * min(1.0, 0.5 / (np.linalg.norm(finite) + 1e-6))
    got = run(net, x, t)
    assert np.isnan(got[0, 0])
    mask = np.isfinite(g)
    np.testing.assert_allclose(got[mask], expected[mask], rtol=1e-5)


def test_nonfinite_keep_in_value_mode_passes_them_and_clips_the_rest(make_net, xt):
    net = make_net(clip_net("{name: kv, mode: value, clip: 0.3, nonfinite: keep}"))
    x, t = xt
    x[0, 0], x[1, 1], x[2, 2] = np.inf, -np.inf, np.nan
    g = raw_grad(x, t)
    got = run(net, x, t)
    assert got[0, 0] == np.inf and got[1, 1] == -np.inf and np.isnan(got[2, 2])
    mask = np.isfinite(g)
    assert (np.abs(g[mask]) > 0.3).any()
    np.testing.assert_allclose(got[mask], np.clip(g[mask], -0.3, 0.3), rtol=1e-6)
    report = reporting.fault_logs("kv")[-1].last
    assert (report.nan, report.posinf, report.neginf, report.action) == (1, 1, 1, "keep")


def test_clipping_statistics_are_logged(make_net, xt, capfd):
    net = make_net(clip_net("{name: s, max_norm: 0.5, log_every: 2, history: 3}"))
    x, t = xt
    small = t + 1e-3
    for inputs in (x, small, x, x):
        run(net, inputs, t)
    lines = [l for l in capfd.readouterr().err.splitlines() if "GradientClip s in TRAIN:" in l]
    assert len(lines) == 2, lines
    assert "backward call 2: clipped 1 of the last 2 calls (1 of 2 in all)" in lines[0]
    assert "backward call 4: clipped 2 of the last 3 calls (3 of 4 in all)" in lines[1]
    norm_x = np.linalg.norm(raw_grad(x, t))
    assert ("max=%.6g" % norm_x) in lines[1]


@pytest.mark.parametrize("param_str, message", [
    ("{mode: value}", "mode 'value' needs key 'clip'"),
    ("{mode: norm}", "mode 'norm' needs key 'max_norm'"),
    ("{mode: value, clip: 1, per_sample: true}", "key 'per_sample' belongs to mode 'norm', not 'value'"),
    ("{mode: value, clip: 1, max_norm: 2, per_sample: true}",
     "keys 'max_norm' and 'per_sample' belong to mode 'norm'"),
    ("{max_norm: 0}", "key 'max_norm' has value 0; allowed: a number > 0 and <= 3.4028235e\\+38"),
    ("{max_norm: 1, nonfinite: drop}", "key 'nonfinite' has value 'drop'; allowed: one of zero, error, keep"),
])
def test_bad_params_fail_at_setup(make_net, param_str, message):
    with pytest.raises(ParamError, match="GradientClip param_str: " + message):
        make_net(clip_net(param_str))


def test_clip_keeps_a_diverging_solver_finite(make_solver):
    plain = make_solver(DIVERGING_NET.replace("LAYER", ""), base_lr=0.1)
    plain.step(200)
    assert not np.isfinite(plain.net.params["fc"][0].data).all()
    clipped = make_solver(DIVERGING_NET.replace(
        "LAYER", 'layer { name: "clip" type: "Python" bottom: "y" top: "y" python_param { '
                'module: "safe_layers" layer: "GradientClip" param_str: "{name: dclip, max_norm: 1}" } }'),
        base_lr=0.1)
    clipped.step(200)
    assert np.isfinite(clipped.net.params["fc"][0].data).all()
    assert np.isfinite(clipped.net.blobs["loss"].data).all()


SOFTMAX_NET = """
name: "softmax"
layer { name: "data" type: "DummyData" top: "x" top: "label" dummy_data_param {
  shape { dim: 16 dim: 64 } shape { dim: 16 }
  data_filler { type: "gaussian" std: 10 } data_filler { type: "uniform" min: 0 max: 9.99 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h" inner_product_param { num_output: 32 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "score" inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "clip" type: "Python" bottom: "score" top: "score" python_param { module: "safe_layers"
  layer: "GradientClip" param_str: "{name: softclip, follows: ip2, max_norm: 1, log_every: 0}" } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
"""


def _largest_weight(solver):
    return max(float(np.abs(b.data).max()) for blobs in solver.net.params.values() for b in blobs)


def test_a_clip_above_softmax_cannot_stop_a_learning_rate_divergence(make_solver):
    """What the README says: above SoftmaxWithLoss the gradient is (p - onehot) / N, of L2
    norm at most sqrt(2 / N) (0.35 for N = 16), so max_norm: 1 never clips there; the blow-up
    of a high base_lr is lr x weight gradient, which only a parameter-level clip reaches."""
    solver = make_solver(SOFTMAX_NET, base_lr=10, momentum=0.9)
    solver.step(8)
    clip = next(layer for layer in solver.net.layers if hasattr(layer, "stats"))
    assert clip.stats.clipped_total() == 0 and clip.stats.calls == 8
    assert clip.stats.norm_stats()[2] <= np.sqrt(2 / 16) + 1e-6
    assert _largest_weight(solver) > 1e10  # diverged regardless
    bounded = make_solver(SOFTMAX_NET, base_lr=10, momentum=0.9, clip_gradients=1)
    bounded.step(8)
    assert _largest_weight(bounded) < 100  # the solver's own parameter-level clip holds it
