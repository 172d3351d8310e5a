"""The prototxt reader on input no one should write, but someone does: deep nesting,
binary files, endless devices, huge nets. Each ends in a clear error (exit 2) or a read
whose cost grows with the file, never a traceback or a hang."""

import os
import random
import subprocess
import sys
import threading

import pytest

from safe_layers.core.errors import InputError
from safe_layers.readers import prototxt


def test_line_index_agrees_with_counting_from_the_start():
    rng = random.Random(7)
    text = "".join(rng.choice("ab \n{}") for _ in range(3000))
    index = prototxt.LineIndex(text)
    for offset in list(range(0, len(text), 37)) + [0, len(text)]:
        assert index.line_col(offset) == prototxt.line_col(text, offset)


def test_nesting_past_the_limit_is_an_input_error_naming_the_spot():
    depth = 2000  # well past Python's recursion limit if it were followed
    text = "a { " * depth + "}" * depth
    with pytest.raises(InputError, match=r"<t>:1:%d: 'a' is nested deeper than 100" % (100 * 4 + 1)):
        prototxt.index_text(text, "<t>")


def test_lint_of_a_deeply_nested_file_exits_2_without_a_traceback(tmp_path):
    net = tmp_path / "deep.prototxt"
    net.write_text("layer { " * 3000 + "}" * 3000)
    result = subprocess.run([sys.executable, "-m", "safe_layers.tools.cli", "lint", "--no-shapes",
                             str(net)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "deep.prototxt:1:" in result.stderr


def test_dev_zero_is_refused_as_binary_at_once():
    with pytest.raises(InputError, match="/dev/zero:1:1: not a text prototxt"):
        prototxt.read_text("/dev/zero")


def _fifo_writer(path, payload, hold):
    """Write ``payload`` into the FIFO and keep it open until ``hold`` is set; the
    returned event is set once the writer has closed it."""
    closed = threading.Event()

    def run():
        with open(path, "wb") as f:
            f.write(payload)
            f.flush()
            hold.wait(20)
        closed.set()
    threading.Thread(target=run, daemon=True).start()
    return closed


def test_a_binary_stream_is_judged_by_its_head_without_waiting_for_its_end(tmp_path):
    fifo = tmp_path / "model.caffemodel"
    os.mkfifo(fifo)
    hold = threading.Event()
    closed = _fifo_writer(fifo, b"\x08\x00" * 1024, hold)
    try:
        with pytest.raises(InputError, match="is a NUL"):
            prototxt.read_text(str(fifo))
        assert not closed.is_set(), "the reader waited for the end of the stream"
    finally:
        hold.set()


def test_an_endless_text_stream_is_cut_off_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(prototxt, "MAX_STREAM_BYTES", 4096)
    fifo = tmp_path / "net.prototxt"
    os.mkfifo(fifo)
    hold = threading.Event()
    _fifo_writer(fifo, b"# comment\n" * 1000, hold)
    try:
        with pytest.raises(InputError, match="not a regular file, and more than"):
            prototxt.read_text(str(fifo))
    finally:
        hold.set()


def test_a_nul_after_the_first_kilobyte_is_still_refused(tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_bytes(b'name: "x"\n' * 200 + b"\0")
    with pytest.raises(InputError, match=r"net.prototxt:201:1: not a text prototxt"):
        prototxt.read_text(str(net))
