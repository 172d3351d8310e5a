"""Fixtures that build small real Caffe nets (pycaffe) and run the real `caffe` binary.

A test that needs Caffe skips when pycaffe is missing, except in CI (CI=true), where a
missing pycaffe fails the run: CI must never go green by skipping the real thing.

GPU gating. Tests marked ``gpu`` run where CuPy sees a CUDA device and skip elsewhere.
A *GPU test run* is one that selects them (``-m gpu``) or one started with
``SAFE_LAYERS_REQUIRE_GPU=1`` (what ``ci/gpu-check`` does); with CI=true, or with that
variable, a GPU test run that executed no GPU test fails, and with the variable any
skipped GPU test fails it too. ``SAFE_LAYERS_TEST_MODE=gpu`` runs the whole suite with
Caffe in GPU mode (``backend.set_mode_gpu()``, ``solver_mode: GPU``), checking after
each test that no Python layer read a blob through pycaffe's host ``.data``/``.diff``
in its forward or backward (each such read is a device-to-host copy).

The tests of a module live where it lives (tests/core/ for safe_layers/core/, ...); what
they share, fixtures aside, is the package ``support`` (tests/support/).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support.nets import solver_text
from support.switches import IN_CI, REQUIRE_GPU, TEST_MODE

# Caffe's INFO/WARNING lines would bury pytest's output; errors still show.
os.environ.setdefault("GLOG_minloglevel", "2")


def _import_caffe():
    try:
        import caffe
    except ImportError as exc:
        message = "pycaffe is not importable (%s); run `make setup`" % exc
        if IN_CI:
            pytest.fail("CI=true: " + message, pytrace=False)
        pytest.skip(message)
    from safe_layers.core import backend
    if TEST_MODE == "gpu":
        backend.set_mode_gpu(0)
    else:
        backend.set_mode_cpu()
    # The fillers of every net a test builds draw from Caffe's RNG, seeded by default from
    # the clock: seeded here, a test's weights no longer depend on the run or on the tests
    # before it (a NaN that stock layers turn into inf - inf only with some weights made a
    # test fail one run in four).
    caffe.set_random_seed(1)
    return caffe


@pytest.fixture(autouse=True)
def _fresh_fault_logs():
    """Each test reads only the fault logs of the layers it built, and the test process
    prints no final summaries for them at exit."""
    from safe_layers import reporting
    reporting.clear_fault_logs()
    yield
    reporting.clear_fault_logs()


@pytest.fixture
def caffe():
    return _import_caffe()


@pytest.fixture
def make_net(caffe, tmp_path):
    """make_net(prototxt_text, phase='TRAIN', weights=None) -> caffe.Net"""
    counter = [0]

    def build(text, phase="TRAIN", weights=None):
        counter[0] += 1
        path = tmp_path / ("net%d.prototxt" % counter[0])
        path.write_text(textwrap.dedent(text))
        phase_value = getattr(caffe, phase)
        if weights is not None:
            return caffe.Net(str(path), str(weights), phase_value)
        return caffe.Net(str(path), phase_value)

    return build


@pytest.fixture
def write_solver(tmp_path):
    """write_solver(net_text, **solver_fields) -> path of a solver file for that net."""
    counter = [0]

    def write(net_text, **fields):
        counter[0] += 1
        net_path = tmp_path / ("train%d.prototxt" % counter[0])
        net_path.write_text(textwrap.dedent(net_text))
        solver_path = tmp_path / ("solver%d.prototxt" % counter[0])
        solver_path.write_text(solver_text(net_path, **fields))
        return solver_path

    return write


@pytest.fixture
def make_solver(caffe, write_solver):
    """make_solver(net_text, **solver_fields) -> caffe.SGDSolver (seeded, CPU)."""
    return lambda net_text, **fields: caffe.SGDSolver(str(write_solver(net_text, **fields)))


@pytest.fixture
def caffe_bin(caffe):
    """Run the real `caffe` binary of this environment; returns CompletedProcess."""
    binary = Path(sys.executable).parent / "caffe"
    if not binary.exists():
        message = "no caffe binary at %s; run `make setup`" % binary
        if IN_CI:
            pytest.fail("CI=true: " + message, pytrace=False)
        pytest.skip(message)

    def run(*args, cwd=None, timeout=300):
        env = dict(os.environ)
        env["GLOG_minloglevel"] = "0"
        return subprocess.run([str(binary), *map(str, args)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def caffe_train(caffe_bin, write_solver, tmp_path):
    """caffe_train(net_text, **solver_fields): `caffe train` on that net in tmp_path."""
    return lambda net_text, **fields: caffe_bin("train", "-solver", write_solver(net_text, **fields),
                                                cwd=tmp_path)


class _GpuGate:
    """Counts what the tests marked gpu did, and fails a GPU test run that ran none."""

    def __init__(self, config):
        markexpr = config.getoption("markexpr", "") or ""
        self.requested = REQUIRE_GPU or ("gpu" in markexpr and "not gpu" not in markexpr)
        self.gpu_ids = set()
        self.passed = self.failed = 0
        self.skipped = []

    def pytest_collection_modifyitems(self, items):
        self.gpu_ids = {item.nodeid for item in items if item.get_closest_marker("gpu")}

    def pytest_runtest_logreport(self, report):
        if report.nodeid not in self.gpu_ids:
            return
        if report.skipped:
            self.skipped.append("%s (%s)" % (report.nodeid, report.longrepr[-1]
                                              if isinstance(report.longrepr, tuple) else report.longrepr))
        elif report.when == "call":
            self.passed += report.passed
            self.failed += report.failed

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session):
        if not self.requested or not (IN_CI or REQUIRE_GPU):
            return
        problems = []
        if self.passed + self.failed == 0:
            problems.append("a GPU test run executed no GPU test (%d selected, %d skipped)"
                            % (len(self.gpu_ids), len(self.skipped)))
        if REQUIRE_GPU and self.skipped:
            problems.append("SAFE_LAYERS_REQUIRE_GPU=1 and %d GPU test(s) skipped" % len(self.skipped))
        if problems:
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.ensure_newline()
            for line in problems + ["  skipped: " + s for s in self.skipped[:10]]:
                if reporter is not None:
                    reporter.write_line("GPU gate: " + line, red=True)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config):
    config.pluginmanager.register(_GpuGate(config), "safe_layers_gpu_gate")


@pytest.fixture(autouse=True)
def _no_host_copies_in_gpu_mode(request):
    """In GPU mode, a Python layer's forward/backward must not read blob.data/.diff."""
    if TEST_MODE != "gpu" or "caffe" not in request.fixturenames:
        yield
        return
    import caffe as caffe_module
    blob = caffe_module._caffe.Blob
    reads = []
    originals = {name: getattr(blob, name) for name in ("data", "diff")}

    def counting(name):
        original = originals[name]

        def read(self):
            frame = sys._getframe(1)
            while frame is not None:
                code = frame.f_code
                if (code.co_name in ("forward", "backward")
                        and "safe_layers" + os.sep + "layers" in code.co_filename):
                    reads.append("%s:%d .%s in %s" % (code.co_filename, frame.f_lineno, name,
                                                      code.co_name))
                    break
                frame = frame.f_back
            return original.__get__(self)
        return property(read)

    for name in originals:
        setattr(blob, name, counting(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(blob, name, original)
    assert not reads, "host copies by Python layers in GPU mode: %s" % "; ".join(reads[:5])
