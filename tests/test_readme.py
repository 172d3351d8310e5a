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
def test_snippet_layers_build_and_run_in_a_real_net(make_net, snippet, tmp_path, monkeypatch, caffe):
    """Every snippet layer, fed by Input blobs named like its bottoms, builds and runs.

    A snippet's first line may give bottom shapes (`# shapes: fc8=2,5 label=2`; default
    2x3x4x4); an H file it names in `source:` is made here as the identity.
    """
    text = snippet.read_text()
    shapes = {}
    header = re.match(r"# shapes: (.*)\n", text)
    if header:
        for item in header.group(1).split():
            name, dims = item.split("=")
            shapes[name] = [int(d) for d in dims.split(",")]
    bottoms = sorted(set(re.findall(r'bottom: "([^"]+)"', text)))
    inputs = "".join('layer { name: "in_%s" type: "Input" top: "%s" input_param { shape { %s } } }\n'
                     % (b, b, " ".join("dim: %d" % d for d in shapes.get(b, [2, 3, 4, 4])))
                     for b in bottoms)
    monkeypatch.chdir(tmp_path)
    for source in set(re.findall(r"source: ([\w.]+)", text)):
        k = next(dims[1] for dims in shapes.values() if len(dims) > 1)
        blob = caffe.io.array_to_blobproto(np.eye(k, dtype=np.float32).reshape(1, 1, k, k))
        (tmp_path / source).write_bytes(blob.SerializeToString())
    net = make_net('name: "snippet"\n' + inputs + text)
    net.forward()
