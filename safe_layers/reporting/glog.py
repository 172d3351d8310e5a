"""glog's line shape: the prefix we write before each of our lines, and the patterns that find it."""

import datetime
import os
import re

TAG = "safe_layers"

# glog 0.6 writes an 8-digit date (I20261125), older glog 4 digits (I1125); both are read.
ANY_LINE = re.compile(r"^(?P<severity>[IWEF])(?P<time>\d{4}(?:\d{4})? \d\d:\d\d:\d\d\.\d{6}) +"
                      r"(?P<pid>\d+) (?P<source>[^\]\s]+)\] (?P<message>.*)$")

# Our tag, with the glog prefix before it or alone.
OURS = re.compile(r"(?:(?P<severity>[IWEF])(?P<time>\d{4}(?:\d{4})? \d\d:\d\d:\d\d\.\d{6}) +"
                  r"(?P<pid>\d+) )?%s\] " % TAG)


def glog_prefix(severity, now=None):
    """'W20261125 03:10:23.123456  4242 safe_layers] ': the shape of the lines glog 0.6
    (the one Caffe links here) writes, so our lines sort and read with Caffe's."""
    now = now or datetime.datetime.now()
    return "%s%s %s %5d %s] " % (severity, now.strftime("%Y%m%d"), now.strftime("%H:%M:%S.%f"),
                                 os.getpid(), TAG)
