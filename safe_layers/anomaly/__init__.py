"""Anomaly mode for Caffe training: :func:`watch` a pycaffe solver or net.

``safe_layers.watch`` is this package's :func:`watch`. See :mod:`.solver_watch` for
what is checked and what skip and rollback do, :mod:`.report` for the report lines and
their parser, :mod:`.record` for replayable records.
"""

from safe_layers.anomaly.record import read_record, replay
from safe_layers.reporting.watch_lines import Event, ProducerFault, SolverFault, parse_line
from safe_layers.anomaly.solver_watch import (OPTIONS, NonFiniteError, Watch, WatchOptions,
                                              read_solver_param, watch)

__all__ = ["Event", "NonFiniteError", "OPTIONS", "ProducerFault", "SolverFault", "Watch",
           "WatchOptions", "parse_line", "read_record", "read_solver_param", "replay", "watch"]
