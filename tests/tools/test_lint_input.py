"""lint on files that are not nets: each is unreadable input (exit 2), never 'clean'."""

import subprocess
import sys

import pytest


def lint(*args, cwd=None):
    result = subprocess.run([sys.executable, "-m", "safe_layers.tools.cli", "lint", "--no-shapes"]
                            + [str(a) for a in args], capture_output=True, text=True, cwd=cwd)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("text", ["", "\n\n", "# a net will go here\n"])
def test_an_empty_or_comment_only_file_exits_2(tmp_path, text):
    net = tmp_path / "net.prototxt"
    net.write_text(text)
    status, _, err = lint(net)
    assert status == 2
    assert "%s: no field in it (an empty or comment-only file" % net in err


def test_a_net_without_layers_exits_2_and_a_solver_naming_one_too(tmp_path):
    (tmp_path / "net.prototxt").write_text('name: "placeholder"\n')
    (tmp_path / "solver.prototxt").write_text('net: "net.prototxt"\nbase_lr: 0.01\nmax_iter: 10\n'
                                              'lr_policy: "fixed"\n')
    for given in ("net.prototxt", "solver.prototxt"):
        status, _, err = lint(given, cwd=tmp_path)
        assert status == 2 and "net.prototxt: a net without layers" in err, err
