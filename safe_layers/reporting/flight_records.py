"""Flight records: a layer's first fault saved (its arrays and report) as ``.npz`` + ``.json``."""

import json
import os
import re
import zlib

import numpy

from safe_layers.core import atomic
from safe_layers.kernels.xp import to_numpy


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME = 80


def safe_file_name(name):
    """``name`` as one file-name component: only letters, digits, '.', '_' and '-', at
    most 80 characters; a name that had to change gets a checksum of the original, so two
    different names ('ip/guard', 'ip_guard') never share a file."""
    cleaned = _UNSAFE.sub("_", name).strip("._") or "layer"
    if cleaned != name or len(cleaned) > _MAX_NAME:
        cleaned = "%s-%08x" % (cleaned[:_MAX_NAME - 9], zlib.crc32(name.encode("utf-8")))
    return cleaned


def flight_record_stem(report):
    """'TRAIN-ip_guard-4f3a2c1d-forward-data-iter37-call38': phase, layer, pass, when."""
    when = ("iter%d-call%d" % (report.iteration, report.call) if report.iteration is not None
            else "call%d" % report.call)
    return "%s-%s-%s-%s" % (report.phase, safe_file_name(report.layer),
                            report.pass_.replace(" ", "-"), when)


def write_flight_record(directory, stem, arrays, report, max_bytes):
    """Save ``arrays`` (name -> array) and ``report`` as ``<stem>.npz`` + ``<stem>.json``.

    Arrays are taken in order until ``max_bytes`` would be exceeded; the ones left out
    are listed in the JSON. Both files are written to temporary files first and then
    linked into place, so a reader never sees a partial file; an existing record is never
    overwritten (the stem gets '-2', '-3', ...). Returns the two paths; raises OSError
    (or whatever the write raised) on failure, leaving no file behind.
    """
    os.makedirs(directory, exist_ok=True)
    kept, skipped, used = {}, [], 0
    for name, array in arrays.items():
        # The size is known on the device: only arrays under the cap are copied to the host.
        if used + array.nbytes > max_bytes:
            skipped.append({"name": name, "shape": list(array.shape), "bytes": int(array.nbytes)})
            continue
        kept[name] = to_numpy(array)
        used += array.nbytes
    temporaries = []
    try:
        npz_tmp = atomic.temporary(directory)
        temporaries.append(npz_tmp)
        with open(npz_tmp, "wb") as f:
            numpy.savez_compressed(f, **kept)
            f.flush()
            os.fsync(f.fileno())
        record = {"report": json.loads(report.to_json()), "line": report.line(),
                  "arrays": sorted(kept), "skipped_over_size_cap": skipped, "max_bytes": max_bytes}
        json_tmp = atomic.temporary(directory)
        temporaries.append(json_tmp)
        with open(json_tmp, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        paths = atomic.publish(directory, stem, {".npz": npz_tmp, ".json": json_tmp})
        return paths[".npz"], paths[".json"]
    finally:
        for path in temporaries:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


class FlightRecorder:
    """Writes a layer's first fault (its arrays and report) to ``directory``, once.

    Reporting comes first; recording never raises: a failure (a read-only folder, a full
    disk, a file where the folder should be) is reported once through the layer's log and
    the fault's action goes ahead. Only one record is attempted per layer.
    """

    def __init__(self, log, directory, max_bytes):
        self.log = log
        self.directory = directory
        self.max_bytes = int(max_bytes)
        self.attempted = False
        self.paths = None

    def record(self, report, arrays):
        if self.attempted:
            return None
        self.attempted = True
        try:
            self.paths = write_flight_record(self.directory, flight_record_stem(report), arrays,
                                             report, self.max_bytes)
        except Exception as exc:  # noqa: BLE001 - a failure to record must not end training
            self.log.record_failure(self.directory, report.action,
                                    "%s: %s" % (type(exc).__name__, exc))
            return None
        return self.paths
