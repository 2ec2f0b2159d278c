"""Durable file writes: a file is replaced whole (temp file + fsync + rename) or appended to by one complete line.

A crash or a full disk leaves the old content or the new, never half of it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (a no-op where the file system cannot fsync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_temp(tmp_dir: Path, data: bytes, prefix: str) -> Path:
    """Write `data` to a new temp file in `tmp_dir` and fsync it; the caller moves it into place."""
    path = tmp_dir / f"{prefix}-{uuid.uuid4().hex}.tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written <= 0:
                raise OSError(errno.ENOSPC, "short write")
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    return path


def atomic_write(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Replace `path` with `data` whole: readers see the old content or the new one."""
    tmp = write_temp(tmp_dir, data, path.name)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


class AppendFailed(OSError):
    """An append failed; `rolled_back` says whether the file was truncated back to its previous size."""

    def __init__(self, cause: BaseException, rolled_back: bool):
        if isinstance(cause, OSError) and cause.errno is not None:
            super().__init__(cause.errno, cause.strerror)
        else:
            super().__init__(errno.EIO, str(cause))
        self.cause = cause
        self.rolled_back = rolled_back


def append_line(path: Path, line: bytes) -> int:
    """Append one complete line with a single `os.write` + fsync; return its byte offset.

    Call under the exclusive lock. On any failure the file is truncated back to its previous size, so no partial
    line is left behind (`AppendFailed.rolled_back` says whether that worked).
    """
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    start = 0
    try:
        start = os.fstat(fd).st_size
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)")
        os.fsync(fd)
    except Exception as exc:
        rolled_back = True
        try:
            os.ftruncate(fd, start)
            os.fsync(fd)
        except OSError:
            rolled_back = False
        os.close(fd)
        if rolled_back and created and start == 0:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise AppendFailed(exc, rolled_back) from exc
    os.close(fd)
    if created:
        fsync_dir(path.parent)
    return start


def json_line(item: dict) -> bytes:
    return json.dumps(item).encode() + b"\n"


def read_json_lines(path: Path) -> list[dict]:
    """Complete, parsable lines of a small JSONL bookkeeping file (a torn or corrupt line is skipped)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in raw.split(b"\n")[:-1]:
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if isinstance(item, dict):
                out.append(item)
    return out
