"""Compile every CUDA kernel of safe_layers with NVRTC, on a machine without a GPU.

    .venv/bin/python ci/gpu_compile_check.py [--arch 80 90]     (make gpu-compile-check)

CuPy compiles a kernel on its first call, which needs a device; NVRTC itself does not.
So this asks the installed CuPy for the very source it would hand to NVRTC, through
CuPy's own code generators, with the arguments its launcher builds for a contiguous
float blob:

* ``generic``: CuPy's reduction template (any layout; what runs when CUB is off or the
  input is not contiguous);
* ``cub-pass1`` / ``cub-pass2``: the two kernels of CuPy's CUB block reduction (the
  default for a ReductionKernel on a contiguous input);
* ``elementwise``: an ElementwiseKernel's one kernel;
* ``raw``: a RawModule of our own CUDA source, as CuPy's compiler cache gets it.

The final source and options are caught where CuPy passes them to its compiler cache
(``cupy.cuda.compiler._compile_module_with_cache``), then compiled with NVRTC for each
architecture, as CuPy would (``-ftz=true``, ``-arch=sm_XX``,
``--device-as-default-execution-space``). A kernel that does not compile is a failure;
so is a negative control (a kernel with an undefined identifier) that does. One line per
kernel, dtype, path and architecture. Kernels must be declared with
``safe_layers.kernels.xp.declare``: a CuPy kernel made anywhere else is reported as an
error, so none escapes this check. On a real device, the GPU test
``test_compile_check_sources_are_what_cupy_compiles`` (tests/gpu/test_gpu_path.py) checks
that CuPy compiles exactly these sources.
"""

import argparse
import importlib
import pkgutil
import re
import sys
import time
from pathlib import Path

import numpy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from safe_layers import kernels as kernels_package  # noqa: E402
from safe_layers.kernels import xp  # noqa: E402

#: The dtypes a kernel with a type placeholder is checked for: Caffe's blobs are
#: float32; the layers' statistics run in float64.
PLACEHOLDER_DTYPES = (numpy.float32, numpy.float64)
#: Elements of the input the sources are generated for: large enough for CUB's path.
SIZE = 1 << 20
# The error sits in the reduce expression, the one part every path compiles.
NEGATIVE_CONTROL = xp.Reduction(
    name="safe_layers_negative_control", in_ctype="float32", out_ctype="float32",
    map_expr="fabs(in0)", reduce_expr="a + b + safe_layers_undefined_identifier",
    post_map_expr="out0 = a", identity="0")
_KERNEL_CONSTRUCTOR = re.compile(r"\b(ReductionKernel|ElementwiseKernel|RawKernel|RawModule)\s*\(")


class Captured(Exception):
    """Raised in place of CuPy's compiler cache, carrying what CuPy would compile."""

    def __init__(self, source, options):
        super().__init__("captured")
        self.source = source
        self.options = tuple(options)


def _capture(source, options=(), **_):
    raise Captured(source, options)


#: The CuPy internals used here, as the installed CuPy documents them (14.2); a CuPy
#: whose generators take other arguments fails this check instead of checking garbage.
GENERATOR_SIGNATURES = {
    "cupy._core._reduction._ReductionKernel_get_cached_function_code":
        "_ReductionKernel_get_cached_function_code(nin, nout, params, arginfos, _TypeMap type_map, "
        "name, block_size, reduce_type, identity, map_expr, reduce_expr, post_map_expr, preamble, "
        "options)",
    "cupy._core._cub_reduction._SimpleCubReductionKernel_get_cached_function":
        "_SimpleCubReductionKernel_get_cached_function(map_expr, reduce_expr, post_map_expr, "
        "reduce_type, params, arginfos, _TypeMap type_map, name, block_size, identity, preamble, "
        "options, items_per_thread)",
    "cupy._core._reduction._get_block_specs":
        "_get_block_specs(Py_ssize_t in_size, Py_ssize_t out_size, Py_ssize_t contiguous_size, "
        "Py_ssize_t block_size) -> (Py_ssize_t, Py_ssize_t, Py_ssize_t)",
    "cupy._core._kernel._get_elementwise_kernel_code":
        "_get_elementwise_kernel_code(tuple arginfos, _TypeMap type_map, tuple params, str operation, "
        "str name, str preamble, str loop_prep='', str after_loop='', tuple options=())",
    "cupy._core.core.compile_with_cache": None,  # only its presence
}


def generator_mismatches():
    """The CuPy internals that are missing or documented otherwise than expected."""
    problems = []
    for dotted, expected in GENERATOR_SIGNATURES.items():
        module_name, name = dotted.rsplit(".", 1)
        function = getattr(importlib.import_module(module_name), name, None)
        if function is None:
            problems.append("%s is missing" % dotted)
            continue
        doc = (function.__doc__ or "").strip().splitlines()
        if expected is not None and (not doc or doc[0].strip() != expected):
            problems.append("%s is now %r" % (dotted, doc[0] if doc else None))
    return problems


class Generator:
    """CuPy's own code generators, fed as CuPy's launchers feed them."""

    def __init__(self):
        import cupy
        from cupy._core import _carray, _cub_reduction, _kernel, _reduction, _scalar, core
        from cupy.cuda import compiler
        self.cupy, self.core = cupy, core
        self._kernel, self._reduction, self._cub = _kernel, _reduction, _cub_reduction
        self._carray, self._scalar = _carray, _scalar
        self._compiler = compiler

    # _ArgKind in cupy/_core/_kernel.pxd
    NDARRAY, INDEXER, SCALAR, POINTER = 1, 2, 3, 4

    def _arg(self, kind, ndim=0, dtype=None):
        k = self._kernel
        typ = {self.NDARRAY: self.cupy.ndarray, self.INDEXER: self._carray.Indexer,
               self.SCALAR: self._scalar.CScalar, self.POINTER: self.cupy.cuda.MemoryPointer}[kind]
        return k._ArgInfo(kind, typ, dtype, ndim, True, True)

    def _compile_call(self, fn, *args):
        """(source, options) CuPy hands its compiler when ``fn(*args)`` runs."""
        real = self._compiler._compile_module_with_cache
        self._compiler._compile_module_with_cache = _capture
        try:
            fn(*args)
        except Captured as captured:
            return captured.source, captured.options
        finally:
            self._compiler._compile_module_with_cache = real
        raise RuntimeError("CuPy did not reach its compiler for %r" % (args,))

    def sources(self, spec, dtype):
        """{path: (source, options)} for one declaration and input dtype."""
        if isinstance(spec, xp.Reduction):
            return self._reduction_sources(spec, dtype)
        if isinstance(spec, xp.Raw):
            return {"raw": self._raw_source(spec)}
        return {"elementwise": self._elementwise_source(spec, dtype)}

    def _raw_source(self, spec):
        # RawModule -> cupy._core.raw._get_raw_module: our source as it is, no CuPy headers.
        return self._compile_call(lambda: self.core.compile_with_cache(
            spec.code, spec.options, prepend_cupy_headers=False, backend="nvrtc",
            translate_cucomplex=False, enable_cooperative_groups=False, name_expressions=None,
            log_stream=None, jitify=False))

    def _reduction_sources(self, spec, dtype):
        k = self._kernel
        kernel = xp.kernel(spec)
        in_types, out_types, type_map = k._decide_params_type(
            kernel.in_params, kernel.out_params, (dtype,), ())
        out_dtype = out_types[0]
        type_map = k._TypeMap(type_map._pairs + (("IndexT", "int32"),))
        reduce_type = kernel.reduce_type
        out = {}
        # Generic: a full reduction of a contiguous 1-d array (after CuPy's _reduce_dims).
        block_size = self._reduction._get_block_specs(SIZE, 1, 1, -1)[0]
        arginfos = (self._arg(self.NDARRAY, 1, dtype), self._arg(self.NDARRAY, 0, out_dtype),
                    self._arg(self.INDEXER, 1), self._arg(self.INDEXER, 0),
                    self._arg(self.SCALAR, 0, numpy.int32))
        code = self._reduction._ReductionKernel_get_cached_function_code(
            kernel.nin, kernel.nout, kernel._params, arginfos, type_map, kernel.name, block_size,
            reduce_type, kernel.identity, kernel.map_expr, kernel.reduce_expr,
            kernel.post_map_expr, kernel.preamble, kernel.options)
        out["generic"] = self._compile_call(self.core.compile_with_cache, code, kernel.options)
        # CUB: the two passes of a full reduction (_cub_two_pass_launch).
        cub_type_map = k._TypeMap(type_map._pairs + (("sizeT", "int32"),))
        params = (kernel._params[0:2] + k._get_param_info("int32 _segment_size", True)
                  + k._get_param_info("int32 _array_size", True))
        items_per_thread, cub_block = 4, 512  # _get_cub_block_specs for SIZE >= 2048
        cub = self._cub._SimpleCubReductionKernel_get_cached_function.__wrapped__
        size_args = (self._arg(self.SCALAR, 0, numpy.int32), self._arg(self.SCALAR, 0, numpy.int32))
        pass1 = (self._arg(self.NDARRAY, 1, dtype), self._arg(self.POINTER)) + size_args
        pass2 = (self._arg(self.POINTER), self._arg(self.NDARRAY, 0, out_dtype)) + size_args
        out["cub-pass1"] = self._compile_call(
            cub, kernel.map_expr, kernel.reduce_expr, kernel.post_map_expr, reduce_type, params,
            pass1, cub_type_map, kernel.name + "_pass1", cub_block, kernel.identity,
            kernel.preamble, ("-DFIRST_PASS=1",), items_per_thread)
        out["cub-pass2"] = self._compile_call(
            cub, "in0", kernel.reduce_expr, kernel.post_map_expr, reduce_type, params,
            pass2, cub_type_map, kernel.name + "_pass2", cub_block, kernel.identity,
            kernel.preamble, ("-DSECOND_PASS=1",), items_per_thread)
        return out

    def _elementwise_source(self, spec, dtype):
        # As ElementwiseKernel.__call__ builds it for contiguous 1-d arrays of ``dtype`` where
        # a parameter's type is the placeholder, the outputs given, and the parameters named
        # in spec.scalars passed as Python scalars.
        k = self._kernel
        kernel = xp.kernel(spec)
        in_params, out_params = kernel.in_params, kernel.out_params

        def arg_type(p):
            if p.name in spec.scalars:
                return None  # ElementwiseKernel.__call__: a scalar argument has no array type
            return dtype if p.dtype is None else p.dtype.type
        in_types, out_types, type_map = k._decide_params_type(
            in_params, out_params, tuple(arg_type(p) for p in in_params),
            tuple(arg_type(p) for p in out_params))
        arginfos = tuple(self._arg(self.SCALAR, 0, t) if p.name in spec.scalars
                         else self._arg(self.NDARRAY, 1, t)
                         for p, t in zip(in_params + out_params, in_types + out_types))
        arginfos += (self._arg(self.INDEXER, 1),)
        code = k._get_elementwise_kernel_code(arginfos, type_map, kernel.params, kernel.operation,
                                              kernel.name, kernel.preamble, **kernel.kwargs)
        return self._compile_call(self.core.compile_with_cache, code,
                                  tuple(kernel.kwargs.get("options", ())))


class NVRTC:
    def __init__(self):
        from cupy.cuda import nvrtc
        self.nvrtc = nvrtc

    def version(self):
        return "%d.%d" % self.nvrtc.getVersion()

    def compile(self, name, source, options, arch):
        """(True, cubin size) or (False, first lines of the log)."""
        nvrtc = self.nvrtc
        prog = nvrtc.createProgram(source, name + ".cu", [], [])
        try:
            nvrtc.compileProgram(prog, list(options) + [
                "-ftz=true", "-arch=sm_%s" % arch, "--device-as-default-execution-space"])
            return True, "cubin %d bytes" % len(nvrtc.getCUBIN(prog))
        except nvrtc.NVRTCError:
            errors = [line.strip() for line in nvrtc.getProgramLog(prog).splitlines() if "error" in line]
            return False, "; ".join(errors[:2]) or "NVRTC failed"
        finally:
            nvrtc.destroyProgram(prog)


def declared_kernels():
    """Import every module of safe_layers.kernels; every declared kernel, by name."""
    for module in pkgutil.iter_modules(kernels_package.__path__):
        importlib.import_module("safe_layers.kernels." + module.name)
    return dict(xp.KERNELS)


def undeclared_kernels():
    """'path:line: ...' for each CuPy kernel made outside kernels.xp (never checked)."""
    found = []
    for path in sorted((ROOT / "safe_layers").rglob("*.py")):
        if path == ROOT / "safe_layers" / "kernels" / "xp.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _KERNEL_CONSTRUCTOR.search(line) and not line.lstrip().startswith("#"):
                found.append("%s:%d: %s" % (path.relative_to(ROOT), number, line.strip()))
    return found


def dtypes_of(spec):
    """The input dtypes a declaration is checked for (a RawModule: its own source, once)."""
    if isinstance(spec, xp.Raw):
        return (None,)
    if isinstance(spec, xp.Reduction):
        ctype = spec.in_ctype
        return PLACEHOLDER_DTYPES if len(ctype) == 1 else (numpy.dtype(ctype).type,)
    types = [param.split()[-2] for param in (spec.in_params + "," + spec.out_params).split(",")]
    return PLACEHOLDER_DTYPES if any(len(t) == 1 for t in types) else (numpy.float64,)


def check(specs, archs, out=sys.stdout):
    """Compile each spec's sources for each arch, one line each; (lines, failures)."""
    generator, compiler = Generator(), NVRTC()
    lines = failures = 0
    for spec in specs:
        for dtype in dtypes_of(spec):
            for path, (source, options) in generator.sources(spec, dtype).items():
                for arch in archs:
                    start = time.perf_counter()
                    ok, detail = compiler.compile(spec.name, source, options, arch)
                    lines += 1
                    failures += not ok
                    print("%-34s %-8s %-11s sm_%s  %s  %s (%.1f s)"
                          % (spec.name, numpy.dtype(dtype).name if dtype else "-", path, arch,
                             "ok  " if ok else "FAIL",
                             detail, time.perf_counter() - start), file=out, flush=True)
    return lines, failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["80", "90"],
                        help="compute capabilities to compile for (default: 80 90)")
    args = parser.parse_args(argv)
    try:
        import cupy
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
    except Exception as exc:  # noqa: BLE001 - any failure to load is the same answer
        print("gpu-compile-check: error: CuPy with NVRTC is needed (caffe_build/requirements-gpu.txt): %s"
              % exc, file=sys.stderr)
        return 2
    print("gpu-compile-check: CuPy %s, NVRTC %s, archs %s"
          % (cupy.__version__, NVRTC().version(), " ".join("sm_" + a for a in args.arch)))
    mismatches = generator_mismatches()
    if mismatches:
        print("gpu-compile-check: FAIL: this CuPy's code generators are not the ones this check "
              "was written for (CuPy 14.2): " + "; ".join(mismatches))
        return 1
    stray = undeclared_kernels()
    for line in stray:
        print("%s  FAIL  a CuPy kernel made outside safe_layers.kernels.xp.declare is never "
              "compile-checked" % line)
    specs = declared_kernels()
    if not specs:
        print("gpu-compile-check: FAIL no kernel declared (safe_layers.kernels.xp.KERNELS is empty)")
        return 1
    lines, failures = check(specs.values(), args.arch)
    print("negative control (an undefined identifier: every line must FAIL):")
    control_lines, control_failures = check([NEGATIVE_CONTROL], args.arch)
    problems = []
    if stray:
        problems.append("%d kernel(s) outside the factory" % len(stray))
    if failures:
        problems.append("%d of %d compilations failed" % (failures, lines))
    if control_failures != control_lines:
        problems.append("the negative control compiled %d of %d times: this check proves nothing"
                        % (control_lines - control_failures, control_lines))
    if problems:
        print("gpu-compile-check: FAIL: " + "; ".join(problems))
        return 1
    print("gpu-compile-check: ok: %d kernel(s), %d compilations, negative control failed %d of %d"
          % (len(specs), lines, control_failures, control_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
