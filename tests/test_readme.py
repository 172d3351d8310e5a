"""The README's parameter tables and the snippets users paste must match the code."""

import re

import numpy as np
import pytest

from support.paths import ROOT


def _table(name):
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- %s params:.*?-->\n(.*?)<!-- end %s params -->" % (name, name), text, re.S)
    assert match, "README has no %s params table" % name
    return match.group(1).strip()


@pytest.mark.parametrize("module", ["nan_guard", "gradient_clip", "safe_infogain_loss", "stable_batch_norm"])
def test_param_tables_match_the_schemas(module):
    import importlib
    schema = importlib.import_module("safe_layers.layers." + module).SCHEMA
    from safe_layers.core import schemas
    assert schema is schemas.SCHEMAS[schema.layer_type]
    assert _table(module) == schema.describe()


@pytest.mark.parametrize("snippet", sorted((ROOT / "prototxt_snippets").glob("*.prototxt")),
                         ids=lambda p: p.name)
def test_snippet_layers_run_forward_and_backward_on_real_input(make_net, snippet, tmp_path, monkeypatch, caffe):
    """Every snippet layer, fed by Input blobs named like its bottoms, runs a forward and a
    backward pass on random input, with a loss on each of its outputs.

    A snippet's first line may give bottom shapes (`# shapes: fc8=2,5 label=2`; default
    2x3x4x4); an H file it names in `source:` is made here (row-stochastic, not the
    identity); a bottom named `label` gets valid class indices.
    """
    text = snippet.read_text()
    shapes = {}
    header = re.match(r"# shapes: (.*)\n", text)
    if header:
        for item in header.group(1).split():
            name, dims = item.split("=")
            shapes[name] = [int(d) for d in dims.split(",")]
    layers = re.sub(r"#[^\n]*", "", text)  # the prototxt without its comments
    bottoms = sorted(set(re.findall(r'bottom: "([^"]+)"', layers)))
    tops = set(re.findall(r'top: "([^"]+)"', layers))
    inputs = "".join('layer { name: "in_%s" type: "Input" top: "%s" input_param { shape { %s } } }\n'
                     % (b, b, " ".join("dim: %d" % d for d in shapes.get(b, [2, 3, 4, 4])))
                     for b in bottoms)
    # A loss on every output that is not one already, so backward reaches every layer.
    losses = "".join('layer { name: "sumsq_%s" type: "Reduction" bottom: "%s" top: "sumsq_%s" loss_weight: 1 '
                     'reduction_param { operation: SUMSQ } }\n' % (t, t, t) for t in sorted(tops) if t != "loss")
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    classes = next((dims[1] for name, dims in shapes.items() if name != "label" and len(dims) > 1), 3)
    for source in set(re.findall(r"source: ([\w.]+)", layers)):
        h = rng.random((classes, classes)).astype(np.float32) + 0.1
        blob = caffe.io.array_to_blobproto((h / h.sum(1, keepdims=True)).reshape(1, 1, classes, classes))
        (tmp_path / source).write_bytes(blob.SerializeToString())
    net = make_net('name: "snippet" force_backward: true\n' + inputs + text + losses)
    for b in bottoms:
        data = net.blobs[b].data
        data[...] = (rng.integers(0, classes, data.shape) if b == "label"
                     else rng.standard_normal(data.shape) * 3)
    net.forward()
    net.backward()
    for t in tops:
        assert np.isfinite(net.blobs[t].data).all(), t
    for b in bottoms:
        if b == "label":
            continue
        diff = net.blobs[b].diff
        assert np.isfinite(diff).all() and np.abs(diff).max() > 0, b  # a gradient came back
    assert not list(tmp_path.glob("nan_dumps/*"))  # finite input: no fault, no flight record


def test_the_infogain_snippet_is_a_drop_in_for_the_layer_it_replaces(make_net, caffe, tmp_path,
                                                                      monkeypatch):
    """The snippet beside the stock InfogainLoss its comment quotes, same weights, input and
    H (rows not summing to 1, as real H matrices often are): the same loss and gradient."""
    text = (ROOT / "prototxt_snippets" / "safe_infogain_loss.prototxt").read_text()
    stock = "\n".join(line[4:] if line.startswith("#   ") or line.startswith("#           ") else ""
                      for line in text.split("# Same inputs")[0].splitlines()).strip()
    stock = re.sub(r"^\s+", "", stock, flags=re.M)
    assert 'type: "InfogainLoss"' in stock
    ours = re.sub(r"#[^\n]*", "", text)
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(1)
    h = (rng.random((5, 5)) * 3).astype(np.float32)
    (tmp_path / "infogain_H.binaryproto").write_bytes(
        caffe.io.array_to_blobproto(h.reshape(1, 1, 5, 5)).SerializeToString())
    head = """name: "infogain"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 2 } } }
layer { name: "fc8" type: "InnerProduct" bottom: "x" top: "fc8"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 1 } } }
"""
    nets = [make_net(head + stock), make_net(head + ours)]
    x, label = rng.standard_normal((2, 3)), np.array([1, 3])
    for net in nets:
        net.params["fc8"][0].data[...] = nets[0].params["fc8"][0].data
        net.params["fc8"][1].data[...] = 0
        net.blobs["x"].data[...] = x
        net.blobs["label"].data[...] = label
        net.forward()
        net.backward()
    np.testing.assert_allclose(nets[1].blobs["loss"].data, nets[0].blobs["loss"].data, rtol=1e-6)
    np.testing.assert_allclose(nets[1].blobs["fc8"].diff, nets[0].blobs["fc8"].diff, rtol=1e-5, atol=1e-7)
