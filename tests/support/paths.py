"""Where things are: the repository, its tests, the published nets, these helpers."""

from pathlib import Path

SUPPORT = Path(__file__).resolve().parent
TESTS = SUPPORT.parent
ROOT = TESTS.parent
DATA = TESTS / "data"  # Caffe's published nets and solvers (see data/README.md)
