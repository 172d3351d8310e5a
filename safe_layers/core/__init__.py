"""The core every part of safe_layers stands on; imports no ``caffe`` and nothing above it.

* :mod:`.params`, :mod:`.schemas`: typed ``param_str`` fields and every layer's schema.
* :mod:`.backend`: the blob backend (CPU or GPU, checks at once or deferred).
* :mod:`.deferred`: the boards of deferred GPU checks.
* :mod:`.lr_policy`: Caffe's learning-rate policies, as ``sgd_solver.cpp`` computes them.
* :mod:`.solver_iteration`: the true solver iteration a report names.
* :mod:`.caffe_process`: which process we are in (the ``caffe`` binary's flags, a resume).
* :mod:`.errors`: input a tool cannot read.
* :mod:`.float_text`: numbers as text (JSON, Caffe's own printing).
"""
