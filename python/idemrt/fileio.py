"""Atomic output files: a destination is either untouched or completely written.

Data goes to a temporary file in the destination's directory, is flushed and
fsynced, and only then takes the destination's name. On Linux the temporary
file is anonymous (O_TMPFILE), so a process killed mid-write leaves nothing
behind; elsewhere it is a hidden ``.NAME.XXXXXXXX.idemrt-tmp`` file that is
removed on any error but can survive a SIGKILL or a power cut.

Without ``force`` the final step is a hard link, which fails if the
destination exists: no other writer can be clobbered, even one racing us.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import IdemrtError

TMP_SUFFIX = ".idemrt-tmp"
# Cleared by tests to exercise the named-temp-file path on Linux.
_USE_O_TMPFILE = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


class OutputExistsError(IdemrtError, FileExistsError):
    """The output file exists and overwriting was not requested (``force``)."""


class SameFileError(IdemrtError, ValueError):
    """The output path names one of the inputs."""


def check_output_path(path, *, force: bool = False, inputs: Iterable = ()) -> Path:
    """Fail early, before expensive work, if ``path`` cannot be written as requested."""
    path = Path(os.fspath(path))
    for src in inputs:
        if _same_file(path, Path(os.fspath(src))):
            raise SameFileError(f"the output {str(path)!r} is the input {os.fspath(src)!r}; "
                                f"choose another output name")
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "the output is a directory", str(path))
    if not force and os.path.lexists(path):
        raise _exists(path)
    return path


@contextlib.contextmanager
def atomic_writer(path, *, force: bool = False, inputs: Iterable = ()) -> Iterator[BinaryIO]:
    """Yield a binary file; on a clean exit it becomes ``path``, on any exception nothing changes.

    Raises OutputExistsError if ``path`` exists and ``force`` is false, and
    SameFileError if ``path`` is one of ``inputs`` (even with ``force``).
    """
    path = check_output_path(path, force=force, inputs=inputs)
    fd, tmp_name = _open_temp(path.parent, path.name)
    try:
        with open(fd, "wb", closefd=False) as f:
            yield f
            f.flush()
            os.fsync(fd)
        if tmp_name is None and not force:
            _link_anonymous(fd, path)
        else:
            if tmp_name is None:
                tmp_name = _temp_name(path)
                _link_anonymous(fd, tmp_name)
            _rename_temp(tmp_name, path, force)
        _fsync_dir(path.parent)
    finally:
        os.close(fd)
        if tmp_name is not None:
            _unlink_quietly(tmp_name)


def atomic_write_bytes(path, data: bytes, *, force: bool = False, inputs: Iterable = ()) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, force=force, inputs=inputs) as f:
        f.write(data)


def _open_temp(directory: Path, name: str) -> tuple[int, Path | None]:
    """Open a temporary file in ``directory``: (fd, None) if anonymous, else (fd, its path)."""
    if _USE_O_TMPFILE:
        try:
            return os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o666), None
        except OSError as exc:
            # Filesystems without O_TMPFILE support report one of these; use a named file.
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    while True:
        tmp = _temp_name(directory / name)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def _temp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def _link_anonymous(fd: int, path: Path) -> None:
    """Give the O_TMPFILE file ``fd`` the name ``path``, failing if ``path`` exists."""
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # With a dir fd CPython calls linkat(AT_SYMLINK_FOLLOW), which links the
        # file the /proc entry points to rather than the /proc symlink itself.
        os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=dfd, follow_symlinks=True)
    except FileExistsError:
        raise _exists(path) from None
    finally:
        os.close(dfd)


def _link_new(source, path: Path) -> None:
    """Give ``source`` the name ``path``, failing if ``path`` exists (atomic no-clobber)."""
    try:
        os.link(source, path)
    except FileExistsError:
        raise _exists(path) from None


def _rename_temp(tmp: Path, path: Path, force: bool) -> None:
    if force:
        os.replace(tmp, path)
        return
    try:
        _link_new(tmp, path)
    except OutputExistsError:
        raise
    except OSError:
        # No hard links here (FAT, some network filesystems): the existence
        # check and the rename are then two steps, not one.
        if os.path.lexists(path):
            raise _exists(path) from None
        os.replace(tmp, path)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        # One of them does not exist yet: compare the resolved names instead.
        return a.resolve() == b.resolve()


def _exists(path: Path) -> OutputExistsError:
    return OutputExistsError(errno.EEXIST, "the output exists; pass force=True (--force) to overwrite it",
                             str(path))


def _unlink_quietly(path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_dir(directory: Path) -> None:
    """Make the new name durable; directories cannot be opened for fsync on Windows."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
