"""The GPU path: what can be checked without a GPU here, and on a GPU what only it can.

Without a GPU: the NVRTC compile check proves it can fail (negative control, and the
CUB template's typedefs that a kernel named in0/out0 must declare itself); the flight
recorder sizes device arrays before copying them. On a GPU (marked gpu): the sources the
compile check builds are byte for byte what CuPy compiles at run time, on both paths.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from safe_layers import reporting
from safe_layers.kernels import finite, xp
from support import devices
from support.paths import ROOT, TESTS


def _compile_check():
    spec = importlib.util.spec_from_file_location("gpu_compile_check", ROOT / "ci" / "gpu_compile_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_compile_check", module)
    spec.loader.exec_module(module)
    return module


def _nvrtc_or_skip():
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
    except Exception as exc:  # noqa: BLE001 - CuPy or NVRTC missing: nothing to compile with
        pytest.skip("CuPy with NVRTC is not installed (caffe_build/requirements-gpu.txt): %s" % exc)


class _Lines(list):
    """A stream that keeps the lines printed to it."""

    def write(self, text):
        if text.strip():
            self.append(text)

    def flush(self):
        pass


def test_the_negative_control_fails_to_compile_on_every_path():
    _nvrtc_or_skip()
    check = _compile_check()
    lines = _Lines()
    count, failures = check.check([check.NEGATIVE_CONTROL], ["90"], out=lines)
    assert (count, failures) == (3, 3)  # generic, cub-pass1, cub-pass2
    assert all("FAIL" in line and "safe_layers_undefined_identifier" in line for line in lines)


def test_a_kernel_named_in0_out0_without_the_cub_typedefs_fails_only_on_cubs_path(monkeypatch):
    """Why the factory declares type_in0_raw/type_out0_raw: CuPy's CUB template needs
    them and adds them only when it renames parameters (x -> in0)."""
    _nvrtc_or_skip()
    check = _compile_check()
    monkeypatch.setattr(xp.Reduction, "full_preamble", lambda self: self.preamble)
    xp.kernel.cache_clear()
    try:
        lines = _Lines()
        spec = finite.MAX_ABS_NAN._replace(name="safe_layers_max_abs_nan_bare", in_ctype="float32",
                                           out_ctype="float32")
        count, failures = check.check([spec], ["90"], out=lines)
    finally:
        xp.kernel.cache_clear()
    outcome = {line.split()[2]: line.split()[4] for line in lines}
    assert outcome == {"generic": "ok", "cub-pass1": "FAIL", "cub-pass2": "FAIL"}, lines
    assert all("type_in0_raw" in line or "type_out0_raw" in line for line in lines if "FAIL" in line), lines


def test_every_declared_kernel_names_its_params_in0_out0():
    _compile_check().declared_kernels()
    for spec in xp.KERNELS.values():
        if isinstance(spec, xp.Reduction):
            assert spec.in_params.split()[-1] == "in0" and spec.out_params.split()[-1] == "out0"


def test_a_kernel_made_outside_the_factory_is_reported(tmp_path, monkeypatch):
    check = _compile_check()
    (tmp_path / "safe_layers" / "kernels").mkdir(parents=True)
    (tmp_path / "safe_layers" / "kernels" / "xp.py").write_text("cupy.ReductionKernel(...)\n")
    (tmp_path / "safe_layers" / "fast.py").write_text("import cupy\nk = cupy.RawKernel(src, 'f')\n")
    monkeypatch.setattr(check, "ROOT", tmp_path)
    assert check.undeclared_kernels() == ["safe_layers/fast.py:2: k = cupy.RawKernel(src, 'f')"]
    monkeypatch.setattr(check, "ROOT", ROOT)
    assert check.undeclared_kernels() == []


def test_two_different_kernels_cannot_share_a_name():
    xp.declare(finite.MAX_ABS_NAN)  # the same declaration again: fine
    with pytest.raises(ValueError, match="two different CUDA kernels named 'safe_layers_max_abs_nan'"):
        xp.declare(finite.MAX_ABS_NAN._replace(identity="1"))


class _DeviceArray:
    """The size of a device array is known without copying it; get() is the copy."""

    def __init__(self, shape):
        self.shape = shape
        self.nbytes = int(np.prod(shape)) * 4
        self.copies = 0

    def get(self):
        self.copies += 1
        return np.zeros(self.shape, np.float32)


def test_flight_record_copies_only_device_arrays_under_the_cap(tmp_path):
    big, small = _DeviceArray((1000, 1000)), _DeviceArray((10,))
    report = reporting.FaultReport(
        layer_type="NaNGuard", layer="g", follows=None, phase="TRAIN", pass_="forward data", call=1,
        iteration=0, blob_index=0, shape=(10,), nan=1, posinf=0, neginf=0, over=0, max_abs=None,
        first_index=(0,), first_value=float("nan"), finite_min=None, finite_max=None,
        finite_mean_abs=None, action="warn")
    _, json_path = reporting.write_flight_record(str(tmp_path), "rec", {"big": big, "small": small},
                                                 report, max_bytes=1000)
    assert (big.copies, small.copies) == (0, 1)
    record = json.loads(Path(json_path).read_text())
    assert record["arrays"] == ["small"]
    assert record["skipped_over_size_cap"] == [{"name": "big", "shape": [1000, 1000], "bytes": 4000000}]


# ---- on a GPU ----------------------------------------------------------------------

@pytest.fixture
def cupy_device():
    cupy = devices.cupy_device()
    if cupy is None:
        pytest.skip("no CuPy/GPU here")
    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compile_check_sources_are_what_cupy_compiles(cupy_device, monkeypatch, dtype):
    cupy = cupy_device
    from cupy._core import _accelerator
    from cupy.cuda import compiler
    check = _compile_check()
    seen = []
    real = compiler._compile_module_with_cache

    def recording(source, options=(), *args, **kwargs):
        seen.append((source, tuple(options)))
        return real(source, options, *args, **kwargs)

    expected = check.Generator().sources(finite.MAX_ABS_NAN, dtype)
    monkeypatch.setattr(compiler, "_compile_module_with_cache", recording)
    x = cupy.arange(check.SIZE, dtype=dtype)
    cupy._util.clear_memo()
    kernel = xp.kernel(finite.MAX_ABS_NAN)
    assert float(kernel(x)) == check.SIZE - 1            # CUB (the default for contiguous input)
    accelerators = _accelerator.get_reduction_accelerators()
    _accelerator.set_reduction_accelerators([])
    try:
        cupy._util.clear_memo()
        assert float(kernel(x)) == check.SIZE - 1        # CuPy's generic reduction
    finally:
        _accelerator.set_reduction_accelerators(accelerators)
    compiled = {source for source, _ in seen}
    for path, (source, options) in expected.items():
        assert source in compiled, "CuPy compiled another %s source than the compile check" % path


def test_a_gpu_test_run_that_ran_no_gpu_test_fails_in_ci(tmp_path):
    import os
    import subprocess
    if devices.cupy_device() is not None:
        pytest.skip("a GPU is here: the GPU tests run")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
               str(TESTS / "core" / "test_backend.py")]
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "SAFE_LAYERS_REQUIRE_GPU")}
    quiet = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stdout[-2000:]      # a developer's machine: skips are fine
    ci = subprocess.run(command, cwd=ROOT, env=dict(env, CI="true"), capture_output=True, text=True,
                        timeout=300)
    assert ci.returncode == 1, ci.stdout[-2000:]
    assert "GPU gate: a GPU test run executed no GPU test (2 selected, 2 skipped)" in ci.stdout


def test_gpu_check_counts_tests_from_pytests_junit_file(tmp_path):
    import subprocess
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "ci" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    (tmp_path / "test_three.py").write_text(
        "import pytest\ndef test_ok(): pass\ndef test_bad(): assert 0\n"
        "@pytest.mark.skip(reason='x')\ndef test_skip(): pass\n")
    xml = tmp_path / "out.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(xml),
                    str(tmp_path / "test_three.py")], cwd=tmp_path, capture_output=True, timeout=120)
    counts = gpu_check.junit_counts(xml)
    assert {k: counts[k] for k in ("run", "passed", "failed", "skipped")} == \
        {"run": 2, "passed": 1, "failed": 1, "skipped": 1}
    assert counts["failed_tests"] == ["test_three::test_bad"]
    assert gpu_check.junit_counts(tmp_path / "missing.xml") is None
