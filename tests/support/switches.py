"""The test run's switches, read from the environment once (see conftest.py's docstring)."""

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
REQUIRE_GPU = os.environ.get("SAFE_LAYERS_REQUIRE_GPU", "") == "1"
TEST_MODE = os.environ.get("SAFE_LAYERS_TEST_MODE", "cpu").strip().lower()
if TEST_MODE not in ("cpu", "gpu"):
    raise pytest.UsageError("SAFE_LAYERS_TEST_MODE=%r; allowed: cpu, gpu" % TEST_MODE)
