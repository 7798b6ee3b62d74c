"""Helper processes end with the process that started them, however it died (SIGKILL, a segfault, the OOM killer).

Two ways, both cheap, used by every place fastcd starts a process:

- `end_with_parent()`, called first in a `multiprocessing` child (a Process target, a Pool initializer, a
  DataLoader `worker_init_fn`), whatever its start method: a daemon thread waits on the child's parent
  sentinel, a pipe whose write end only the starting process holds, and SIGKILLs the child when it closes. The
  parent is the process that asked for the child, also when a fork server forked it: the fork server's
  children hold its "alive" pipe open, so without this the server and its workers keep each other alive after
  the trainer is gone (issue 34). Process death, not thread death, closes the pipe; a parent already dead
  closes it before the watch starts.
- `install()`, in the fastcd process: every child it forks from its main thread (ffcv's writer, a fork Pool)
  gets the parent-death signal `prctl(PR_SET_PDEATHSIG, SIGKILL)`. The kernel sends it when the forking *thread*
  ends, hence the main thread only; a parent that died before the prctl is caught by comparing getppid().

Linux only; elsewhere the prctl is a no-op (the pipe watch works everywhere).
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from multiprocessing.connection import wait

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class _Fork:
    """The fork in progress, as install's before-hook saw it in the parent."""

    installed = False
    parent = 0  # the forking process
    from_main = False  # forked from its main thread


def _die_with_forking_thread(expected_parent: int) -> None:
    """Ask the kernel for SIGKILL when the thread that forked this process ends; end now if the parent
    (`expected_parent`) is already gone. A no-op off Linux."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != expected_parent:  # it died before the prctl: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)


def end_with_parent(_worker_id: int = 0) -> None:
    """In a multiprocessing child: SIGKILL this process as soon as the process that started it is gone. (The
    argument makes it a DataLoader `worker_init_fn`.)"""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        raise RuntimeError("end_with_parent() runs in a multiprocessing child, which has a parent sentinel")
    sentinel = parent.sentinel

    def watch() -> None:
        wait([sentinel])  # readable (EOF) once every copy of the write end is closed: the parent is gone
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="fastcd-lifeline", daemon=True).start()


def _before_fork() -> None:
    _Fork.parent, _Fork.from_main = os.getpid(), threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    if _Fork.from_main:
        _die_with_forking_thread(_Fork.parent)


def install() -> None:
    """Give every child this process forks from its main thread the parent-death signal (once per process)."""
    if not _Fork.installed:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _Fork.installed = True
