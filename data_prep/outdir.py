"""Claim OUT for one run of `fastcd prepare`: check where it is, create it, lock it.

OUT must be a folder (or not exist yet) outside SRC, and SRC must not lie in a folder prepare
writes (OUT/<split>, OUT/.prepare): otherwise the outputs would be read as data by the next run.
One run at a time per OUT: an exclusive, non-blocking `flock` on `OUT/.prepare.lock`, which names
its holder (pid and host) for the error a second run gives. The file is removed when the run ends;
a run that got the lock on a file removed in the meantime takes it again on the new file, so two
runs never hold locks on two different files. The kernel drops the lock of a killed run, so a
stale lock file never blocks a resume. `locked` is that lock alone (`fastcd cache-teacher` takes it on
its folder too).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from fastcd.data_prep.sources import FASHION_MNIST
from fastcd.errors import FastcdError

LOCK_NAME = ".prepare.lock"


def _check_place(out: Path, src: str, written: list[str]) -> None:
    if out.exists() and not out.is_dir():
        raise FastcdError(f"OUT {out} is a file; give a folder (new or empty) for the prepared data")
    if src == FASHION_MNIST:
        return
    s, o = Path(src).resolve(), out.resolve()
    if o == s or s in o.parents:
        raise FastcdError(f"OUT {out} is inside SRC {src}: a later prepare of SRC would read the outputs as "
                          f"data; choose an OUT outside SRC")
    for folder in (o / name for name in written):
        if s == folder or folder in s.parents:
            raise FastcdError(f"SRC {src} lies in {folder}, which prepare writes into; choose another OUT")


def _holder(fd: int) -> str:
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    return text or "a process that has just started"


@contextlib.contextmanager
def claimed(out: Path, src: str, written: list[str]) -> Iterator[None]:
    """Check OUT's place against SRC, create it and hold its lock for the block; `written` names the
    folders of OUT the run writes into. FastcdError when OUT is unfit or another run holds it."""
    _check_place(out, src, written)
    with locked(out, LOCK_NAME, "fastcd prepare", "OUT"):
        yield


@contextlib.contextmanager
def locked(folder: Path, lock_name: str, command: str, what: str) -> Iterator[None]:
    """Create `folder` and hold an exclusive lock on `folder/lock_name` for the block: one run of `command`
    at a time per folder (`what` names the folder in the errors). FastcdError when the folder cannot be
    created or written, or another run holds it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastcdError(f"cannot create {what} {folder} ({e.strerror}); choose a folder you can write to") from e
    path = folder / lock_name
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise FastcdError(f"cannot write in {what} {folder} ({e.strerror}); choose a folder you can write "
                              "to") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FastcdError(f"{folder} is being written by another `{command}` ({holder}); wait for it "
                              f"to end, or choose another {what}") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)  # the holder removed this file as we locked it: lock the current one
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError as e:
            raise FastcdError(f"cannot write in {what} {folder} ({e.strerror}); free space there or choose "
                              "another folder") from e
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a run that opened it sees it removed, retries
        os.close(fd)
