"""safe_layers.core.atomic: the one way every file is written (outputs and records)."""

import errno
import os
import stat
import threading

import pytest

from safe_layers.core import atomic


def _leftovers(folder):
    return [name for name in os.listdir(folder) if name.endswith(".tmp")]


def test_a_new_output_is_written_whole_with_the_umask_mode(tmp_path):
    out = tmp_path / "net.prototxt"
    old = os.umask(0o027)
    try:
        atomic.replace_file(out, "layer {}\r\n")
    finally:
        os.umask(old)
    assert out.read_bytes() == b"layer {}\r\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert _leftovers(tmp_path) == []


def test_a_replaced_file_keeps_its_mode(tmp_path):
    out = tmp_path / "net.prototxt"
    out.write_text("old")
    out.chmod(0o604)
    atomic.replace_file(out, b"new")
    assert out.read_text() == "new"
    assert stat.S_IMODE(out.stat().st_mode) == 0o604


def test_a_link_to_a_file_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "out.prototxt"
    link.symlink_to(target)
    with pytest.raises(atomic.UnsafeOutput, match="symbolic link") as caught:
        atomic.replace_file(link, "x")
    assert caught.value.filename == str(link)
    assert target.read_text() == "keep me" and link.is_symlink()


def test_a_dangling_link_is_refused_and_nothing_is_created(tmp_path):
    link = tmp_path / "out.prototxt"
    link.symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(atomic.UnsafeOutput):
        atomic.replace_file(link, "x")
    assert not (tmp_path / "elsewhere.txt").exists()


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(atomic.UnsafeOutput, match="folder"):
        atomic.replace_file(tmp_path, "x")


def test_a_null_device_is_written_into_never_replaced(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    null = tmp_path / "null"  # /dev/null's twin: the machine's own is never put at risk
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    atomic.replace_file(null, "x" * 100)
    assert stat.S_ISCHR(os.lstat(null).st_mode) and os.listdir(tmp_path) == ["null"]


def test_dev_stdout_is_written_into(capfd):
    atomic.replace_file("/dev/stdout", "to the terminal\n")
    assert "to the terminal" in capfd.readouterr().out
    assert os.path.islink("/dev/stdout")


def test_a_full_device_is_an_os_error_naming_it():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(OSError) as caught:
        atomic.replace_file("/dev/full", "x")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == "/dev/full"
    assert stat.S_ISCHR(os.lstat("/dev/full").st_mode)


def test_a_fifo_without_a_reader_is_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(atomic.UnsafeOutput, match="no process is reading"):
        atomic.replace_file(fifo, "x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_fifo_with_a_reader_gets_the_data(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    reader = threading.Thread(target=lambda: got.append(os.read(fd, 100)))
    atomic.replace_file(fifo, b"through the pipe")
    reader.start()
    reader.join(5)
    os.close(fd)
    assert got == [b"through the pipe"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "net.prototxt"
    out.write_text("old")

    def refuse(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError) as caught:
        atomic.replace_file(out, "new")
    assert caught.value.filename == str(out)
    assert out.read_text() == "old" and _leftovers(tmp_path) == []


def test_check_output_names_a_missing_folder(tmp_path):
    with pytest.raises(atomic.UnsafeOutput, match="does not exist"):
        atomic.check_output(tmp_path / "nowhere" / "x.png")
    assert atomic.check_output(tmp_path / "x.png") == "new"


def _record(folder, stem, text):
    parts = {}
    for suffix in (".json", ".npz"):
        parts[suffix] = atomic.temporary(folder)
        with open(parts[suffix], "w") as f:
            f.write(text + suffix)
    return atomic.publish(folder, stem, parts)


def test_publish_never_overwrites_and_never_follows_a_planted_link(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    records = tmp_path / "records"
    records.mkdir()
    (records / "iter14.json").symlink_to(outside)
    first = _record(str(records), "iter14", "first")
    assert first[".json"].endswith("iter14-2.json")
    second = _record(str(records), "iter14", "second")
    assert second[".json"].endswith("iter14-3.json") and second[".npz"].endswith("iter14-3.npz")
    assert outside.read_text() == "not yours"
    assert open(first[".json"]).read() == "first.json"
    assert not os.path.lexists(records / "iter14.npz")  # the stem is taken as a whole
    assert _leftovers(records) == []


def test_temporary_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic.temporary(str(tmp_path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_dev_stdout_redirected_to_a_file_appends_where_the_shell_points(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "captured.txt"
    out.write_text("before\n")
    code = "from safe_layers.core import atomic; atomic.replace_file('/dev/stdout', 'after\\n')"
    with open(out, "a") as f:
        subprocess.run([sys.executable, "-c", code], stdout=f, check=True)
    assert out.read_text() == "before\nafter\n" and not os.path.islink(out)
