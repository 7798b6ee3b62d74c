"""Atomic file output: write to a temporary name beside the target, fsync it, rename it into place, then fsync
the folder, so after a crash or a power loss the target is either the old file or the whole new one."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastcd.errors import FastcdError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def disk_full_as_error(path: str | os.PathLike) -> Iterator[None]:
    """Turn an out-of-space OSError while writing `path` into a one-line FastcdError."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise FastcdError(f"no space left writing {str(path)!r} ({e.strerror}); free space on its device and "
                          "run again") from None


def check_dir_possible(folder: str | os.PathLike) -> None:
    """A one-line error if a file stands where `folder` or one of its parents should be."""
    folder = Path(folder)
    in_the_way = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if in_the_way is not None:
        raise FastcdError(f"cannot create folder {str(folder)!r}: {str(in_the_way)!r} is a file; "
                          "choose another output folder")


def make_dir(folder: str | os.PathLike) -> None:
    """Create `folder` (and its parents); a file in the way is a one-line error."""
    check_dir_possible(folder)
    Path(folder).mkdir(parents=True, exist_ok=True)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's data and metadata to the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; only if the block succeeds, fsync it, rename it to
    `path` and fsync the folder (the rename). Running out of space is a one-line error."""
    path = Path(path)
    make_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with disk_full_as_error(path):
            yield tmp_path
            fsync_path(tmp_path)
        umask = os.umask(0)  # mkstemp makes 0600 files: give the output the usual permissions
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
