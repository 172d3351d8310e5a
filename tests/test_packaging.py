"""The package's metadata says what is true: the Pythons CI runs the suite on, one version,
the tools extra the command checks for, the license."""

import re

import safe_layers
from safe_layers.tools import cli
from support.paths import ROOT

try:
    import tomllib
except ImportError:  # Python < 3.11: the TOML reader pip itself carries
    from pip._vendor import tomli as tomllib

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _ci_pythons():
    text = (ROOT / ".ci" / "run").read_text()
    return sorted(tuple(int(p) for p in v.split(".")) for v in re.findall(r"make test PYTHON=(3\.\d+)", text))


def test_requires_python_is_the_range_ci_tests():
    tested = _ci_pythons()
    assert len(tested) == 2, tested  # the oldest and the newest, beside the default
    oldest, newest = tested
    assert PROJECT["requires-python"] == ">=%d.%d,<%d.%d" % (oldest + (newest[0], newest[1] + 1))
    classified = sorted(tuple(int(p) for p in c.rsplit(":: ", 1)[1].split("."))
                        for c in PROJECT["classifiers"] if re.search(r"Python :: 3\.\d+$", c))
    assert classified == [(3, minor) for minor in range(oldest[1], newest[1] + 1)]


def test_one_version():
    assert PROJECT["dynamic"] == ["version"] and "version" not in PROJECT
    assert re.fullmatch(r"\d+\.\d+\.\d+", safe_layers.__version__)


def test_the_layers_need_only_numpy_and_pyyaml_and_the_command_checks_the_tools_extra():
    assert PROJECT["dependencies"] == ["numpy", "pyyaml"]
    from pip._vendor.packaging.requirements import Requirement  # packaging, as pip carries it
    requirements = [Requirement(text) for text in PROJECT["optional-dependencies"]["tools"]]
    names = {r.name for r in requirements if r.marker is None or r.marker.evaluate()}
    assert names == set(cli.TOOLS_EXTRA.values())


def test_the_license_is_shipped():
    assert PROJECT["license"] == {"file": "LICENSE"}
    assert (ROOT / "LICENSE").read_text().startswith("BSD 2-Clause License")
