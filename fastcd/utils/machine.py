"""Describe the machine, date and code version a result came from."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess

import torch


def git_commit() -> str:
    """The checkout's HEAD commit (with '+dirty' if it has uncommitted changes); outside a checkout, the
    FASTCD_COMMIT environment variable, else 'unknown'."""
    from fastcd.paths import SOURCE_ROOT

    if SOURCE_ROOT is None:
        return os.environ.get("FASTCD_COMMIT", "unknown")
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=SOURCE_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=SOURCE_ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # not a checkout (e.g. a copy on a GPU machine)
        return os.environ.get("FASTCD_COMMIT", "unknown")
    return head + ("+dirty" if dirty else "")


def machine_name() -> str:
    """Short machine label for file names: the GPU's name or 'cpu<N>'."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-").lower()
    return f"cpu{os.cpu_count()}"


def machine_info() -> dict:
    """Machine, date and commit, stored beside every benchmark result."""
    info = {
        "machine": machine_name(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
