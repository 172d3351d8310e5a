"""What the tests share: paths, the small nets they build, datasets, devices, and the
test-only Caffe Python layers (``module: "support.poison"``, ``"support.read_counter"``).

tests/ is on ``sys.path`` (pytest.ini ``pythonpath``), so a test imports ``support.<module>``;
a child process that builds these Python layers (the ``caffe`` binary, ``safe-layers
train``) is given tests/ on its ``PYTHONPATH`` (``support.paths.TESTS``).
"""
