"""The ``safe-layers`` command: one module per subcommand over one prototxt reader.

* :mod:`safe_layers.tools.cli`: the entry point (``safe-layers SUBCOMMAND ...``).
* :mod:`safe_layers.tools.findings`: what every subcommand reports, how it prints
  (``path:line:col: RULE severity message — fix`` or ``--format json``) and the exit status
  (0 clean, 1 found a problem, 2 unreadable input).
* :mod:`safe_layers.tools.prototxt`: the one reader of net and solver prototxts (Caffe's
  own ``caffe_pb2`` + protobuf ``text_format``), with the line and column of every field.

A subcommand module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; it imports its heavy dependencies inside ``run`` so that
``safe-layers --help`` stays fast.
"""
