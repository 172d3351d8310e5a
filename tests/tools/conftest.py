"""Fixtures the tests of the subcommands share."""

import pytest

from safe_layers.tools import cli


@pytest.fixture
def harden(caffe, tmp_path, monkeypatch, capsys):
    """harden(*args) -> (status, stdout, stderr): `safe-layers harden`, in process, in tmp_path
    (harden reads with Caffe's own schema: pycaffe is needed)."""
    monkeypatch.chdir(tmp_path)

    def run(*argv):
        capsys.readouterr()
        status = cli.main(["harden"] + [str(a) for a in argv])
        out, err = capsys.readouterr()
        return status, out, err

    return run
