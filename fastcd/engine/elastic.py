"""What lets a run lose a worker and go on with no one at the keyboard (`torchrun --max-restarts`).

- `train.resume: auto`: a run continues `<out>/latest.pt` when its folder holds the same run (the
  `config.yaml` it recorded and the checkpoint's own config both equal this config), starts afresh in an empty
  folder or one whose run never wrote a checkpoint, and refuses a folder that holds another run, naming what
  differs. Rank 0 decides; every rank follows (one broadcast).
- `train.checkpoint_every_steps`: `latest.pt` also every N optimizer steps, with the position in the epoch
  (`Position`); a resume starts the epoch at that step, with the same remaining samples in the same order
  (`sharding.epoch_indices`), the same crops (a function of seed, epoch and sample) and the same teacher-cache
  rows (read by sample index), and continues the epoch's statistics.
- Randomness needs no saving: the global RNGs are reseeded from (seed, epoch, step, rank) at every point a run
  can resume from (each epoch's start, each mid-epoch checkpoint), so they do not depend on a saved state, the
  GPU count or the process's history.
- Every rank must be given the same config (checked once, by name).
- The world size may change across a restart when the global batch (ranks x `data.batch_size`) does not:
  the global order of samples and steps is kept, only their split across ranks changes. Otherwise the resume
  is refused by name.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import Tensor

from fastcd.config import Config
from fastcd.data.base import REPLAYING_NAMES, BatchLoader
from fastcd.engine.run_folder import existing_run_files
from fastcd.engine.runtime import Runtime, seed_everything
from fastcd.errors import FastcdError
from fastcd.utils.checkpoint import load_checkpoint

NOT_IDENTITY = (("train", "resume"),)  # config fields that may differ between the sessions of one run


def differences(then: Any, now: Any, where: str = "") -> list[str]:
    """`key: a -> b` for each leaf that differs between two plain-value trees (dicts, lists, scalars)."""
    if isinstance(then, dict) and isinstance(now, dict):
        return [d for k in {**then, **now} for d in differences(then.get(k), now.get(k), f"{where}{k}.")]
    return [] if then == now else [f"{where.rstrip('.')}: {then!r} -> {now!r}"]


def identity(values: Any) -> Any:
    """A config's plain values (`Config.to_dict`, or as `config.yaml` or a checkpoint holds them) as YAML
    records them, without the fields that are not the run's identity."""
    values = yaml.safe_load(yaml.safe_dump(values, sort_keys=False))
    for part, key in NOT_IDENTITY:
        if isinstance(values, dict) and isinstance(values.get(part), dict):
            values[part].pop(key, None)
    return values


def plain_config(cfg: Config) -> dict[str, Any]:
    """The config as `config.yaml` records it, without the fields that are not the run's identity."""
    return identity(cfg.to_dict())


def auto_resume(cfg: Config) -> bool:
    """`train.resume: auto`: whether to continue `<out>/latest.pt` (the folder holds this run and its
    checkpoint) or start afresh (no run there, or this run before its first checkpoint); a FastcdError when
    the folder holds another run."""
    out = cfg.out_path
    found = existing_run_files(out)
    if not found:
        return False
    fix = "continue it with --resume (which applies overrides), replace it with --force, or set train.out_dir elsewhere"
    recorded = out / "config.yaml"
    try:
        then = yaml.safe_load(recorded.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise FastcdError(f"train.resume=auto: run folder {str(out)!r} holds a run ({', '.join(found)}) whose "
                          f"config.yaml cannot be read ({type(e).__name__}); {fix}") from None
    now = plain_config(cfg)
    changed = differences(identity(then), now)
    if changed:
        raise FastcdError(f"train.resume=auto: run folder {str(out)!r} holds another run (its config.yaml differs: "
                          f"{_listed(changed)}); {fix}")
    latest = out / "latest.pt"
    if not latest.is_file():
        return False
    changed = differences(identity(load_checkpoint(latest)["config"]), now)
    if changed:  # a checkpoint of another run, copied or left here: its config, not only config.yaml, is the run's
        raise FastcdError(f"train.resume=auto: checkpoint {str(latest)!r} was written by another run (its config "
                          f"differs: {_listed(changed)}); {fix}")
    return True


def _listed(changed: list[str]) -> str:
    """The first three differences, and how many more."""
    return "; ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")


def decided_by_rank0(rt: Runtime, decide: Callable[[], bool]) -> bool:
    """`decide()` on rank 0, the same answer (or the same FastcdError) on every rank."""
    answer: list[bool | str | None] = [None]
    if rt.is_main:
        try:
            answer = [decide()]
        except FastcdError as e:
            answer = [str(e)]
    if rt.distributed:
        dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], str):
        raise FastcdError(answer[0])
    return bool(answer[0])


def check_same_config(cfg: Config, rt: Runtime) -> None:
    """The same FastcdError on every rank when a rank was given another config than rank 0 (one all-gather)."""
    if not rt.distributed:
        return
    configs: list[dict[str, Any] | None] = [None] * rt.world_size
    dist.all_gather_object(configs, plain_config(cfg))
    for rank, other in enumerate(configs):
        changed = differences(configs[0], other)
        if changed:
            raise FastcdError(f"rank {rank} has another config than rank 0 ({'; '.join(changed[:3])}): start every "
                              "node with the same config file and --set overrides")


def reseed(seed: int, epoch: int, step: int, rank: int) -> None:
    """Seed Python, numpy and torch (every device) from (seed, epoch, step, rank)."""
    digest = hashlib.sha256(f"fastcd/{seed}/{epoch}/{step}/{rank}".encode()).digest()
    seed_everything(int.from_bytes(digest[:8], "little") >> 1)


def check_world_size(ckpt: dict[str, Any], cfg: Config, path: Path, world_size: int) -> None:
    """A FastcdError when the checkpoint ran on another world size with another global batch."""
    ranks, batch = ckpt["world_size"], ckpt["config"]["data"]["batch_size"]
    if ranks == world_size or ranks * batch == world_size * cfg.data.batch_size:
        return
    same, keep = ranks * batch, f"run on {ranks} rank{'s' if ranks > 1 else ''}"
    if same % world_size == 0:
        keep += f", or keep the global batch with --set data.batch_size={same // world_size}"
    raise FastcdError(f"cannot resume from {str(path)!r} on {world_size} rank{'s' if world_size > 1 else ''}: it "
                      f"ran on {ranks} with data.batch_size={batch} (a global batch of {same}), now "
                      f"{world_size * cfg.data.batch_size}; the steps per epoch and the schedules would change: "
                      f"{keep}")


def check_mid_epoch(cfg: Config, loader: BatchLoader, position: dict[str, Any] | None, path: Path) -> None:
    """Mid-epoch checkpoints and resumes need a loader that can start an epoch at a batch and replay its crops."""
    if (cfg.train.checkpoint_every_steps or position) and not loader.replays_crops:
        what = (f"resume {str(path)!r}, written mid-epoch" if position else
                f"use train.checkpoint_every_steps={cfg.train.checkpoint_every_steps}")
        raise FastcdError(f"cannot {what}: data.backend {cfg.data.backend!r} cannot start an epoch mid-way with the "
                          f"same crops; use data.backend {REPLAYING_NAMES}, or "
                          "train.checkpoint_every_steps=0")


@dataclass(frozen=True)
class EpochStart:
    """Where an epoch starts: its first step (0, or a mid-epoch checkpoint's), this rank's statistics of the
    steps before it (`Meter.sums`) and their sample count over all ranks."""

    step: int = 0
    sums: Tensor | None = None
    samples: int = 0


FROM_THE_START = EpochStart()


def gather_sums(sums: Tensor, rt: Runtime) -> Tensor:
    """(world size, n) every rank's `Meter.sums`, on the CPU (a collective: checkpoint time only)."""
    rows = [sums]
    if rt.distributed:
        rows = [torch.empty_like(sums) for _ in range(rt.world_size)]
        dist.all_gather(rows, sums)
    return torch.stack(rows).cpu()


def epoch_start(position: dict[str, Any] | None, epoch: int, rt: Runtime) -> EpochStart:
    """Where epoch `epoch` starts: at the checkpoint's `position` if it was written in this epoch. Each rank
    continues its own statistics, or rank 0 all of them on another world size."""
    if position is None or position["epoch"] != epoch:
        return EpochStart()
    sums: Tensor = position["sums"]
    if len(sums) == rt.world_size:
        mine = sums[rt.rank]
    else:
        mine = sums.sum(0) if rt.is_main else torch.zeros_like(sums[0])
    return EpochStart(position["step"], mine.to(rt.device), int(sums[:, -1].sum()))
