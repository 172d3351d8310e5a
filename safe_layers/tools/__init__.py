"""The ``safe-layers`` command: one package per subcommand over the readers below.

* :mod:`safe_layers.tools.cli`: the entry point (``safe-layers SUBCOMMAND ...``).
* :mod:`safe_layers.tools.findings`: what every subcommand reports, how it prints
  (``path:line:col: RULE severity message — fix`` or ``--format json``) and the exit status
  (0 clean, 1 found a problem, 2 unreadable input).
* ``lint/``, ``harden/``, ``train/``, ``diagnose/``, ``scan/``: the subcommands. Each has
  a ``command`` module that defines ``HELP`` (one line), ``add_arguments(parser)`` and
  ``run(args) -> int``, and imports its heavy dependencies inside ``run`` so that
  ``safe-layers --help`` stays fast.

Caffe's own files are read by :mod:`safe_layers.readers`, never here.
"""
