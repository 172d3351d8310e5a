"""The README's parameter tables and the snippets users paste must match the code."""

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _table(name):
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- %s params:.*?-->\n(.*?)<!-- end %s params -->" % (name, name), text, re.S)
    assert match, "README has no %s params table" % name
    return match.group(1).strip()


@pytest.mark.parametrize("module", ["nan_guard", "gradient_clip", "safe_infogain_loss", "stable_batch_norm"])
def test_param_tables_match_the_schemas(module):
    import importlib
    schema = importlib.import_module("safe_layers.layers." + module).SCHEMA
    from safe_layers import schemas
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
