"""The README's parameter tables and the snippets users paste must match the code."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _table(name):
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- %s params:.*?-->\n(.*?)<!-- end %s params -->" % (name, name), text, re.S)
    assert match, "README has no %s params table" % name
    return match.group(1).strip()


def test_nan_guard_table_matches_schema():
    from safe_layers.layers.nan_guard import SCHEMA
    assert _table("nan_guard") == SCHEMA.describe()


@pytest.mark.parametrize("snippet", sorted((ROOT / "prototxt_snippets").glob("*.prototxt")),
                         ids=lambda p: p.name)
def test_snippet_layers_build_in_a_real_net(make_net, snippet):
    """Every snippet layer, fed by Input blobs named like its bottoms, builds and runs."""
    text = snippet.read_text()
    bottoms = sorted(set(re.findall(r'bottom: "([^"]+)"', text)))
    inputs = "".join('layer { name: "in_%s" type: "Input" top: "%s" '
                     'input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }\n' % (b, b)
                     for b in bottoms)
    net = make_net('name: "snippet"\n' + inputs + text)
    net.forward()
