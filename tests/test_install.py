"""pip into a user's own Caffe: the wheel built from the package's files alone, installed into
a fresh venv that has no project file, with the cached pycaffe as the user's Caffe.

One venv, in the order a user meets it: the wheel with its base dependencies only (the
layers' NumPy and PyYAML: the tools say which extra they need), then the tools extra,
then the subcommands without pycaffe (lint, harden and train say how to make it
importable; diagnose and scan work), then with pycaffe on PYTHONPATH as the README says:
`caffe train` with a NaNGuard layer and `safe-layers train`.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from support.caffe_data import caffe_prefix, datum, write_lmdb
from support.nets import regression_net, solver_text
from support.paths import ROOT

# What a wheel is built from: the package and the files pyproject.toml names.
WHEEL_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "safe_layers")


def _run(args, env, cwd, timeout=600):
    return subprocess.run([str(a) for a in args], env=env, cwd=str(cwd), capture_output=True,
                          text=True, timeout=timeout)


def _checked(done):
    assert done.returncode == 0, "%s\nstdout:\n%s\nstderr:\n%s" % (
        done.args, done.stdout[-3000:], done.stderr[-3000:])
    return done


def _build_wheel(tmp_path, env):
    source = tmp_path / "source"
    source.mkdir()
    for name in WHEEL_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    dist = tmp_path / "dist"
    _checked(_run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                   "-w", dist, source], env, tmp_path))
    wheels = list(dist.glob("safe_layers-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _user_env(venv, pycaffe=None):
    """The environment of a user's shell with ``venv`` activated (its bin/ first on PATH),
    nothing of this checkout on sys.path, and ``pycaffe`` (a folder) on PYTHONPATH."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = "%s%s%s" % (venv / "bin", os.pathsep, env.get("PATH", ""))
    env["VIRTUAL_ENV"] = str(venv)
    if pycaffe is not None:
        env["PYTHONPATH"] = str(pycaffe)
    return env


def _one_line_error(done, *words):
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.skipif(importlib.util.find_spec("pip") is None or importlib.util.find_spec("venv") is None,
                    reason="this Python cannot make a venv and pip into it (the GPU bundle's has no pip)")
def test_pip_install_into_an_existing_caffe(caffe, tmp_path):
    prefix = caffe_prefix()
    pycaffe = prefix / "lib" / "python3" / "dist-packages"
    build_env = dict(os.environ)
    build_env.pop("PYTHONPATH", None)
    wheel = _build_wheel(tmp_path, build_env)

    venv = tmp_path / "venv"
    _checked(_run([sys.executable, "-m", "venv", venv], build_env, tmp_path))
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    work = tmp_path / "work"
    work.mkdir()
    bare = _user_env(venv)

    # The wheel alone: the layers' dependencies, and the tools name their extra.
    _checked(_run(pip + [wheel], bare, work))
    installed = _checked(_run(["python", "-c", "import safe_layers, yaml, numpy; print(safe_layers.__file__)"],
                              bare, work)).stdout
    assert str(venv) in installed and str(ROOT) not in installed
    _one_line_error(_run(["safe-layers", "scan", "nothing.lmdb"], bare, work),
                    "safe_layers[tools]", "protobuf")

    # The tools extra, and what the user's Caffe imports (their environment has it).
    _checked(_run(pip + ["%s[tools]" % wheel, "-r", ROOT / "caffe_build" / "requirements.txt"], bare, work))
    _checked(_run(["python", "-m", "safe_layers", "--version"], bare, work))

    # No pycaffe: what needs Caffe says how to make it importable; diagnose and scan work.
    net = work / "train.prototxt"
    net.write_text(regression_net())
    solver = work / "solver.prototxt"
    solver.write_text(solver_text(net, max_iter=3, solver_mode="CPU"))
    for command in (["lint", solver], ["harden", net, "-o", work / "hardened.prototxt"],
                    ["train", "-solver", solver]):
        _one_line_error(_run(["safe-layers"] + command, bare, work), "pycaffe is not importable",
                        "PYTHONPATH=<caffe>/python")
    assert not (work / "hardened.prototxt").exists()
    db = write_lmdb(work / "train_lmdb", [(b"%08d" % i, datum(np.full((1, 2, 2), i, np.uint8), i % 2))
                                          for i in range(8)])
    scanned = _run(["safe-layers", "scan", db, "--num-classes", "2"], bare, work)
    assert scanned.returncode == 0, scanned.stderr
    assert "8 records" in scanned.stdout + scanned.stderr
    log = work / "train.log"
    log.write_text("".join(
        "I20261207 10:00:0%d.000000  7 solver.cpp:239] Iteration %d (9 iter/s, 0.1s/1 iters), "
        "loss = %s\n" % (i, i, loss) for i, loss in enumerate(["2.3", "40", "900", "nan"])))
    diagnosed = _run(["safe-layers", "diagnose", log], bare, work)
    assert diagnosed.returncode == 1 and "SL802" in diagnosed.stdout, diagnosed.stdout + diagnosed.stderr

    # The user's Caffe on PYTHONPATH: the caffe binary finds the layers in the active venv.
    user = _user_env(venv, pycaffe)
    guarded = work / "guarded.prototxt"
    guarded.write_text(regression_net(after_fc=textwrap.dedent("""\
        layer { name: "guard" type: "Python" bottom: "y" top: "y"
          python_param { module: "safe_layers" layer: "NaNGuard" param_str: "action: abort" } }
        """)))
    guarded_solver = work / "guarded_solver.prototxt"
    guarded_solver.write_text(solver_text(guarded, max_iter=3, solver_mode="CPU"))
    caffe_train = [prefix / "bin" / "caffe", "train", "-solver", guarded_solver]
    trained = _checked(_run(caffe_train, dict(user, GLOG_minloglevel="0"), work))
    assert "Optimization Done" in trained.stderr
    assert "guard" in trained.stderr and "Python" in trained.stderr
    # ... and only there (README, "Install"): outside the venv the layer's module is not found.
    outside = dict(user, PATH=os.pathsep.join(
        folder for folder in os.environ["PATH"].split(os.pathsep)
        if folder and not os.path.exists(os.path.join(folder, "..", "pyvenv.cfg"))))  # no venv
    del outside["VIRTUAL_ENV"]
    refused = _run(caffe_train, outside, work)
    assert refused.returncode != 0 and "safe_layers" in refused.stderr, refused.stderr[-2000:]
    _checked(_run(["safe-layers", "train", "-solver", guarded_solver], user, work))
    _checked(_run(["safe-layers", "lint", solver], user, work))
