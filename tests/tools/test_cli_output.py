"""Where a command's output goes wrong: a closed pipe ends quietly (never the status of a
finding), a full disk behind stdout is an error (never exit 0 with the output lost)."""

import os
import subprocess
import sys

import pytest

COMMANDS = [["lint", "--list-rules"], ["diagnose", "--list-rules"], ["scan", "--list-rules"],
            ["rule", "--list"]]


def _run(args, stdout):
    return subprocess.run([sys.executable, "-m", "safe_layers.tools.cli"] + args, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=120)


@pytest.mark.parametrize("args", COMMANDS)
def test_a_closed_pipe_ends_quietly_with_sigpipes_status(args):
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that has already gone
    try:
        result = _run(args, write_end)
    finally:
        os.close(write_end)
    assert result.returncode == 128 + 13 and result.stderr == ""


@pytest.mark.parametrize("args", COMMANDS)
def test_a_full_disk_behind_stdout_is_exit_2_saying_so(args):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as full:
        result = _run(args, full)
    assert result.returncode == 2
    assert result.stderr == "safe-layers %s: error: cannot write: No space left on device\n" % args[0]
