"""A run's folder: refuse to overwrite another run (or to resume none), and record how the run was made.

`config.yaml` is the resolved config (every default and override applied); `run.json` lists each session
that trained in the folder (the first run and every resume): date, git commit, machine, library versions,
command line, the epoch it started from, and the CPU kernel check's verdict (`kernels`: the memory format and
autocast dtype the session ran, and why).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from fastcd.config import Config
from fastcd.engine.runtime import Runtime
from fastcd.errors import FastcdError
from fastcd.utils.atomic import atomic_write_bytes, atomic_write_json, check_dir_possible
from fastcd.utils.machine import machine_info

ASIDE_PREFIX = ".replaced-"  # where `--force` keeps the previous run until the new one's first checkpoint
RUN_FILES = ("latest.pt", "best.pt", "metrics.jsonl", "config.yaml", "run.json", "tensorboard")
LIBRARIES = ("torch", "torchvision", "numpy", "triton", "ffcv", "nvidia-dali-cuda130", "tensorboard", "PyYAML")


def existing_run_files(out: Path) -> list[str]:
    """The files of a previous run in `out`."""
    return [name for name in RUN_FILES if (out / name).exists()]


def _resolved(cfg: Config) -> str:
    """The config as `config.yaml` holds it."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def check_run_folder(cfg: Config, resume: bool, force: bool) -> None:
    """Before anything is read or written: `resume` needs the folder's checkpoint and excludes `force`; a new
    run into a folder that holds another run is an error unless `force`. A folder whose run stopped before its
    first checkpoint (no latest.pt) holds nothing to keep: the same config starts in it again."""
    out = cfg.out_path
    check_dir_possible(out)
    if resume:
        if force:
            raise FastcdError("--resume continues the run in its folder, --force deletes that run and starts "
                              "afresh: give one of them, not both")
        if not (out / "latest.pt").is_file():
            why = ("the run there stopped before its first checkpoint: start it again without --resume"
                   if existing_run_files(out) else "no run was started in that folder")
            raise FastcdError(f"cannot resume: checkpoint {str(out / 'latest.pt')!r} does not exist ({why})")
        return
    found = existing_run_files(out)
    if not found or force:
        return
    if not {"latest.pt", "best.pt"} & set(found):
        config = out / "config.yaml"
        if config.is_file() and config.read_text() == _resolved(cfg):
            return
        raise FastcdError(f"run folder {str(out)!r} already holds a run of another config that stopped before its "
                          f"first checkpoint ({', '.join(found)}); replace it with --force (or set train.out_dir "
                          "elsewhere)")
    raise FastcdError(f"run folder {str(out)!r} already holds a run ({', '.join(found)}); continue it with "
                      "--resume, or replace it with --force (or set train.out_dir elsewhere)")


def clear_run_folder(out: Path) -> None:
    """Remove a run's files from `out`, so no stale best.pt or log survives."""
    for name in existing_run_files(out):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def set_aside(out: Path) -> Path | None:
    """Move a previous run's files (for `--force`) into `out/.replaced-<time>-<pid>`, from where `put_back`
    restores them if the new run fails before its first checkpoint; None when `out` holds no run. Renames
    within the folder: nothing is copied or deleted."""
    found = existing_run_files(out)
    if not found:
        return None
    aside = out / f"{ASIDE_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    aside.mkdir()
    for name in found:
        (out / name).rename(aside / name)
    return aside


def put_back(out: Path, aside: Path) -> None:
    """Undo `set_aside`: the new run's files go, the previous run's return."""
    clear_run_folder(out)
    for path in aside.iterdir():
        path.rename(out / path.name)
    aside.rmdir()


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a run's results depend on (torch's with its build, e.g. +cu130)."""
    versions = {"python": platform.python_version()}
    for dist in LIBRARIES:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    versions.update(torch=torch.__version__, cuda=torch.version.cuda or "none")
    return versions


def record_session(out: Path, cfg: Config, start_epoch: int, rt: Runtime, start_step: int = 0) -> None:
    """Write `config.yaml` and append this session (machine, commit, versions, command, kernels; where it started:
    after epoch `start_epoch`, `start_step` steps into the next) to `run.json`."""
    atomic_write_bytes(out / "config.yaml", _resolved(cfg).encode())
    sessions: list[dict[str, Any]] = []
    if (start_epoch or start_step) and (out / "run.json").is_file():
        sessions = json.loads((out / "run.json").read_text())["sessions"]
    sessions.append({**machine_info(), "libraries": library_versions(), "command": sys.argv,
                     "world_size": rt.world_size, "start_epoch": start_epoch, "start_step": start_step,
                     "kernels": rt.kernel_check.to_json() if rt.kernel_check is not None else None})
    atomic_write_json(out / "run.json", {"name": cfg.name, "sessions": sessions})
