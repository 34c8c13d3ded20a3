"""Atomic output files: complete or untouched, no clobbering, no writing over an input."""
import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import idemrt.fileio as fileio
from idemrt import IdemrtError
from idemrt.fileio import (
    TMP_SUFFIX,
    OutputExistsError,
    SameFileError,
    atomic_write_bytes,
    atomic_writer,
    check_output_path,
)

HAS_O_TMPFILE = fileio._USE_O_TMPFILE


@pytest.fixture(params=["anonymous", "named"])
def mode(request, monkeypatch):
    """Run a test with the O_TMPFILE path (where the OS has it) and with the named-temp-file path."""
    if request.param == "anonymous" and not HAS_O_TMPFILE:
        pytest.skip("no O_TMPFILE on this system")
    monkeypatch.setattr(fileio, "_USE_O_TMPFILE", request.param == "anonymous")
    return request.param


def listing(d):
    return sorted(p.name for p in d.iterdir())


def test_writes_with_the_usual_permissions(tmp_path, mode):
    out = tmp_path / "out.bin"
    atomic_write_bytes(out, b"payload")
    assert out.read_bytes() == b"payload"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert listing(tmp_path) == ["out.bin"]


def test_refuses_to_overwrite_without_force(tmp_path, mode):
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="force") as info:
        atomic_write_bytes(out, b"new")
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, IdemrtError)
    assert info.value.errno == errno.EEXIST and info.value.filename == str(out)
    assert out.read_bytes() == b"old"
    atomic_write_bytes(out, b"new", force=True)
    assert out.read_bytes() == b"new"
    assert listing(tmp_path) == ["out.bin"]


def test_a_file_that_appears_while_writing_is_not_clobbered(tmp_path, mode):
    out = tmp_path / "out.bin"
    with pytest.raises(OutputExistsError):
        with atomic_writer(out) as f:
            f.write(b"mine")
            out.write_bytes(b"someone else's")
    assert out.read_bytes() == b"someone else's"
    assert listing(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("existing", [None, b"old"])
def test_an_exception_leaves_the_destination_untouched(tmp_path, mode, existing):
    out = tmp_path / "out.bin"
    if existing is not None:
        out.write_bytes(existing)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_writer(out, force=True) as f:
            f.write(b"half of it")
            raise RuntimeError("boom")
    assert (out.read_bytes() if out.exists() else None) == existing
    assert listing(tmp_path) == ([] if existing is None else ["out.bin"])


def test_keyboard_interrupt_is_cleaned_up_too(tmp_path, mode):
    with pytest.raises(KeyboardInterrupt):
        with atomic_writer(tmp_path / "out.bin") as f:
            f.write(b"x")
            raise KeyboardInterrupt
    assert listing(tmp_path) == []


def test_output_must_not_be_an_input(tmp_path, mode):
    src = tmp_path / "in.png"
    src.write_bytes(b"input")
    link = tmp_path / "link.png"
    link.symlink_to(src)
    for out in (src, link, tmp_path / "." / "in.png"):
        with pytest.raises(SameFileError, match="is the input"):
            atomic_write_bytes(out, b"x", force=True, inputs=[tmp_path / "other.png", src])
    # An input that does not exist yet is compared by name.
    with pytest.raises(SameFileError):
        check_output_path(tmp_path / "new.png", inputs=[str(tmp_path / "sub" / ".." / "new.png")])
    assert src.read_bytes() == b"input"
    assert listing(tmp_path) == ["in.png", "link.png"]


def test_early_checks(tmp_path):
    (tmp_path / "exists").write_bytes(b"")
    assert check_output_path(tmp_path / "fresh") == tmp_path / "fresh"
    with pytest.raises(OutputExistsError):
        check_output_path(tmp_path / "exists")
    assert check_output_path(tmp_path / "exists", force=True) == tmp_path / "exists"
    with pytest.raises(IsADirectoryError):
        check_output_path(tmp_path, force=True)
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "no" / "such" / "dir", b"x")


def test_without_hard_links_a_rename_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "_USE_O_TMPFILE", False)

    def no_links(*args, **kwargs):
        raise PermissionError(errno.EPERM, "hard links not supported here")

    monkeypatch.setattr(fileio.os, "link", no_links)
    out = tmp_path / "out.bin"
    atomic_write_bytes(out, b"one")
    assert out.read_bytes() == b"one"
    with pytest.raises(OutputExistsError):
        atomic_write_bytes(out, b"two")
    assert out.read_bytes() == b"one"
    assert listing(tmp_path) == ["out.bin"]


@pytest.mark.skipif(not HAS_O_TMPFILE, reason="no O_TMPFILE on this system")
def test_filesystems_without_o_tmpfile_fall_back_to_a_named_file(tmp_path, monkeypatch):
    real_open = os.open
    seen = []

    def open_without_tmpfile(path, flags, *args, **kwargs):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            seen.append(path)
            raise OSError(errno.EOPNOTSUPP, "not supported")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(fileio.os, "open", open_without_tmpfile)
    atomic_write_bytes(tmp_path / "out.bin", b"data")
    assert seen and (tmp_path / "out.bin").read_bytes() == b"data"
    assert listing(tmp_path) == ["out.bin"]


CHILD = textwrap.dedent("""
    import sys, time
    import idemrt.fileio as fileio
    out, force, mode = sys.argv[1], sys.argv[2] == "force", sys.argv[3]
    fileio._USE_O_TMPFILE = mode == "anonymous"
    with fileio.atomic_writer(out, force=force) as f:
        for i in range(100_000):
            f.write(b"x" * 65536)
            f.flush()
            if i == 8:
                print("writing", flush=True)
            time.sleep(0.005)
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("existing", [None, b"previous version"])
def test_a_killed_writer_leaves_no_partial_file(tmp_path, mode, existing):
    out = tmp_path / "big.bin"
    if existing is not None:
        out.write_bytes(existing)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out), "force" if existing else "new", mode],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        if mode == "named":
            temps = [p for p in tmp_path.iterdir() if p.name.endswith(TMP_SUFFIX)]
            assert len(temps) == 1 and temps[0].stat().st_size >= 9 * 65536
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert (out.read_bytes() if out.exists() else None) == existing
    left = [name for name in listing(tmp_path) if name != out.name]
    if mode == "anonymous":
        assert left == []  # an O_TMPFILE file dies with its process
    else:
        # A SIGKILL cannot be cleaned up after: the stale file is hidden and recognisable.
        assert len(left) == 1 and left[0].startswith(".big.bin.") and left[0].endswith(TMP_SUFFIX)
