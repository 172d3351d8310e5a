"""Anomaly mode for Caffe training: :func:`watch` a pycaffe solver or net.

``safe_layers.watch`` is this package's :func:`watch`. :mod:`.watcher` holds the
:class:`Watch` (what is checked, how it wires the rest), :mod:`.checks` and
:mod:`.checkpoints` what skip and rollback do, :mod:`.options` the options,
:mod:`safe_layers.reporting.watch_lines` the report lines and their parser, :mod:`.record`
and :mod:`.replaying` the replayable records.

Names are imported on first use, so that ``safe-layers`` (which reads :data:`OPTIONS`
for its flags) does not load the watch to print its help.
"""

import importlib

_EXPORTS = {
    "OPTIONS": "safe_layers.anomaly.options",
    "WatchOptions": "safe_layers.anomaly.options",
    "read_record": "safe_layers.anomaly.record",
    "NonFiniteError": "safe_layers.anomaly.reports",
    "Event": "safe_layers.reporting.watch_lines",
    "ProducerFault": "safe_layers.reporting.watch_lines",
    "SolverFault": "safe_layers.reporting.watch_lines",
    "parse_line": "safe_layers.reporting.watch_lines",
    "replay": "safe_layers.anomaly.replaying",
    "Watch": "safe_layers.anomaly.watcher",
    "read_solver_param": "safe_layers.readers.prototxt",  # also here: its first home
    "watch": "safe_layers.anomaly.watcher",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError("module 'safe_layers.anomaly' has no attribute %r" % name)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
