# Two commands: `make demo` (set up everything, run the main job) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench bench-tools bench-watch clean-venv

# Debian packages, the cached Caffe build, .venv with pycaffe + safe_layers + .venv/bin/caffe.
setup:
	caffe_build/setup_env.sh

demo: setup
	$(PY) examples/guard_demo.py

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench/bench_nan_guard.py
	$(PY) bench/bench_stable_batch_norm.py

# diagnose on a generated 1 GB log, scan on a 100k-record LMDB (a few minutes).
bench-tools: setup
	$(PY) bench/bench_tools.py

# The watch against plain, NaNGuards and debug_info on LeNet, CIFAR-10 quick, ResNet-50
# (about 15 minutes on 2 cores).
bench-watch: setup
	$(PY) bench/bench_watch.py

clean-venv:
	rm -rf $(VENV)
