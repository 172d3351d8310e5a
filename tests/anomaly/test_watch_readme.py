"""The README's table of watch options is the one the code accepts."""

from safe_layers.anomaly import OPTIONS
from support.paths import ROOT

README = ROOT / "README.md"


def test_readme_lists_the_watch_options():
    text = README.read_text()
    start = text.index("<!-- watch options:")
    block = text[text.index("\n", start) + 1:text.index("<!-- end watch options -->")].strip()
    rows = ["| option | default | allowed | meaning |", "|---|---|---|---|"]
    rows += ["| `%s` | `%s` | %s | %s |" % (f.name, f.default, f.allowed(), f.doc) for f in OPTIONS]
    assert block == "\n".join(rows)
