"""Which files of a LevelDB directory a private reader may link to: those numbered below
the next file number its MANIFEST has logged.

A LevelDB opened only to be read still writes: on open, a new journal, a new MANIFEST
and a table of the replayed journal (leveldb's db/db_impl.cc, DBImpl::Recover and
DB::Open), each named by a fresh number from the MANIFEST's counter (db/version_set.cc,
VersionSet::NewFileNumber). ``datasets`` opens a LevelDB through a private directory of
symbolic links to its files; if a fresh name there were a link (a table or journal that
a live writer has begun and not yet logged in its MANIFEST), LevelDB's ``open(O_TRUNC)``
would follow it and write into the source. Files numbered at or past the counter are
left out of the private directory: they are no part of the state the MANIFEST describes.

The MANIFEST is a log (db/log_format.h: 32 KiB blocks of records, each with a 7-byte
header: masked crc32c, length, type FULL/FIRST/MIDDLE/LAST) of VersionEdits
(db/version_edit.cc: a varint tag, then its field); tag 3 is the next file number. A torn
or damaged tail (a writer mid-append) ends the read, so the number found is never past
the one LevelDB itself will read: fewer files are linked, never more.
"""

import os
import re

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
NEXT_FILE_NUMBER = 3

_NUMBERED = re.compile(r"^(?:(\d+)\.(?:log|ldb|sst|dbtmp)|MANIFEST-(\d+))$")


def file_number(name):
    """The file number in a LevelDB file name (``000012.ldb``, ``MANIFEST-000005``), or
    None for a name without one (CURRENT, LOCK, LOG)."""
    match = _NUMBERED.match(name)
    if match is None:
        return None
    return int(match.group(1) or match.group(2))


def next_file_number(path):
    """The next file number the MANIFEST that ``path``'s CURRENT names has logged; 0 where
    there is none to read (then no numbered file is linked, and the open fails)."""
    try:
        with open(os.path.join(path, "CURRENT"), "rb") as f:
            manifest = f.read(256).decode("ascii", "replace").strip()
        if file_number(manifest) is None or not manifest.startswith("MANIFEST-"):
            return 0
        with open(os.path.join(path, manifest), "rb") as f:
            data = f.read()
    except OSError:
        return 0
    found = 0
    for edit in _records(data):
        try:
            numbers = list(_next_numbers(edit))
        except ValueError:
            break
        found = max([found] + numbers)
    return found


def _records(data):
    """The whole records of a LevelDB log, up to the first torn or damaged one."""
    pending = None
    pos = 0
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's trailer: zeros
            pos += left
            continue
        length = data[pos + 4] | data[pos + 5] << 8
        kind = data[pos + 6]
        end = pos + HEADER + length
        if kind == 0 and length == 0:  # zeros a writer preallocated: the end
            return
        if end > len(data) or length > left - HEADER:
            return
        masked = int.from_bytes(data[pos:pos + 4], "little")
        if masked != _mask(_crc32c(data[pos + 6:end])):
            return
        fragment = data[pos + HEADER:end]
        pos = end
        if kind == FULL:
            pending = None
            yield fragment
        elif kind == FIRST:
            pending = fragment
        elif kind == MIDDLE and pending is not None:
            pending += fragment
        elif kind == LAST and pending is not None:
            yield pending + fragment
            pending = None
        else:
            return


def _next_numbers(edit):
    """The next-file numbers in one encoded VersionEdit (ValueError: not one)."""
    pos = 0
    while pos < len(edit):
        tag, pos = _varint(edit, pos)
        if tag in (2, 3, 4, 9):  # log number, next file number, last sequence, prev log
            value, pos = _varint(edit, pos)
            if tag == NEXT_FILE_NUMBER:
                yield value
        elif tag == 1:  # comparator name
            size, pos = _varint(edit, pos)
            pos += size
        elif tag == 5:  # compact pointer: level, internal key
            _, pos = _varint(edit, pos)
            size, pos = _varint(edit, pos)
            pos += size
        elif tag == 6:  # deleted file: level, number
            _, pos = _varint(edit, pos)
            _, pos = _varint(edit, pos)
        elif tag == 7:  # new file: level, number, size, smallest key, largest key
            for _ in range(3):
                _, pos = _varint(edit, pos)
            for _ in range(2):
                size, pos = _varint(edit, pos)
                pos += size
        else:
            raise ValueError("VersionEdit tag %d" % tag)
        if pos > len(edit):
            raise ValueError("VersionEdit cut short")


def _varint(data, pos):
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("varint cut short")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _crc32c_table():
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def _crc32c(data):
    crc = 0xFFFFFFFF
    table = _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _mask(crc):
    """LevelDB's masked CRC (util/crc32c.h: Mask)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
