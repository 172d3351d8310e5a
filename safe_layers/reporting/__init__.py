"""Fault reports shared by every layer: what went wrong, where and when; written AND read here.

One format, one owner: every line our layers print is made in this package, and
:func:`parse_line` reads each of them back. Which file holds what:

* ``report_lines``: every line a layer prints, each kind's writer beside its reader
  (:class:`Subject`, :class:`FaultReport`, :class:`FaultSummary`, :class:`ClipStatistics`,
  :class:`RecordFailure`), numbers that read back exactly (:func:`format_value`,
  :func:`format_param`, :func:`as_float32`), and :func:`parse_line` / :class:`ReportLine`;
  its docstring lists the line kinds.
* ``glog``: glog's line prefix, written by :func:`glog_prefix` and matched by the parser.
* ``watch_lines``: a watch's ``WATCH`` lines, written and read.
* ``array_faults``: :func:`inspect` (an array's FaultReport at once), :func:`report_from_row`
  and :class:`PendingFault` (the same from a deferred check's row).
* ``fault_log``: :class:`FaultLog` (one per layer: rate-limited printing, escalation to
  abort, the flight recorder), :class:`FaultAbort`, :func:`phase_name`, :func:`iteration`.
* ``live_layers``: :data:`LIVE` (the layers of this process that report),
  :func:`fault_logs`, :func:`clear_fault_logs`, :func:`layers_of`, final summaries at exit.
* ``flight_records``: :class:`FlightRecorder`, :func:`write_flight_record` and its file
  names (:func:`flight_record_stem`, :func:`safe_file_name`).
"""

from safe_layers.reporting import watch_lines
from safe_layers.reporting.array_faults import PendingFault, inspect, report_from_row
from safe_layers.reporting.fault_log import (PHASES, REPAIRS, FaultAbort, FaultLog,
                                             is_replaying, iteration, phase_name, replaying)
from safe_layers.reporting.flight_records import (FlightRecorder, flight_record_stem,
                                                  safe_file_name, write_flight_record)
from safe_layers.reporting.glog import glog_prefix
from safe_layers.reporting.live_layers import (LIVE, LiveLayers, clear_fault_logs, fault_logs,
                                               layers_of)
from safe_layers.reporting.report_lines import (ClipStatistics, FaultReport, FaultSummary,
                                                RecordFailure, ReportLine, Subject, as_float32,
                                                format_param, format_value, parse_line)
from safe_layers.reporting.report_lines import _same  # noqa: F401 - tests compare reports with it

__all__ = [
    "watch_lines",
    "PendingFault", "inspect", "report_from_row",
    "PHASES", "REPAIRS", "FaultAbort", "FaultLog", "is_replaying", "iteration", "phase_name",
    "replaying",
    "FlightRecorder", "flight_record_stem", "safe_file_name", "write_flight_record",
    "glog_prefix",
    "LIVE", "LiveLayers", "clear_fault_logs", "fault_logs", "layers_of",
    "ClipStatistics", "FaultReport", "FaultSummary", "RecordFailure", "ReportLine", "Subject",
    "as_float32", "format_param", "format_value", "parse_line",
]
