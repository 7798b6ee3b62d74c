"""One training epoch: the steps, the per-step records at log time, the non-finite check."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fastcd.config import Config
from fastcd.data.base import BatchLoader
from fastcd.engine.distributed import first_nonfinite
from fastcd.engine.elastic import FROM_THE_START, EpochStart
from fastcd.engine.metrics import Meter
from fastcd.engine.runtime import Runtime
from fastcd.engine.sinks import MetricsLog
from fastcd.engine.step import DistillStep
from fastcd.engine.timing import DataWait
from fastcd.errors import FastcdError
from fastcd.models import TeacherTargets


def raise_if_nonfinite(meter: Meter, cfg: Config, rt: Runtime, epoch: int, latest: Path) -> None:
    """Every rank raises the same error when any rank met a non-finite loss (intentional sync: log time)."""
    found = first_nonfinite(meter, rt)
    if found is not None:
        bad, rank, terms = found
        values = ", ".join(f"{s.loss_name}={v:.4g}" for s, v in zip(cfg.loss_list, terms))
        where = f" on rank {rank}" if rt.distributed else ""
        kept = f"the last good checkpoint {str(latest)!r} is kept" if latest.exists() else "no checkpoint yet"
        raise FastcdError(f"non-finite loss at epoch {epoch}, step {bad}{where}: {values}; training stopped, {kept}")


def train_epoch(step: DistillStep, loader: BatchLoader, steps: int, cfg: Config, rt: Runtime, epoch: int,
                weights: list[float], latest: Path, log: MetricsLog,
                cached: Iterator[TeacherTargets] | None = None, start: EpochStart = FROM_THE_START,
                after_step: Callable[[int, Meter], None] | None = None) -> dict[str, Any]:
    """One epoch of `steps` iterations, a `kind: step` record every `train.log_every` steps (rank 0's share
    of the batch); returns the epoch's train statistics (over every rank). `cached`: the teacher's stored
    targets of each batch, in the loader's order (read as part of the data wait). `start`: a resume within
    the epoch (the loader then yields its batches from `start.step` on). `after_step(k, meter)` runs after
    the epoch's k-th step."""
    first_step = (epoch - 1) * steps
    meter = Meter(len(step.losses), rt.device)
    if start.sums is not None:
        meter.sums += start.sums
    bar = tqdm(total=steps, initial=start.step, desc=f"epoch {epoch}/{cfg.train.epochs}", leave=False,
               dynamic_ncols=True, disable=not (cfg.train.progress and rt.is_main))
    batches, wait = iter(loader), DataWait(rt.device)
    begin = time.perf_counter()
    mark = meter.sums.tolist() if start.step else None  # intentional sync, once
    mark_time, mark_wait = begin, 0.0
    for i in range(start.step, steps):
        wait.start()
        images, labels = next(batches)
        targets = next(cached) if cached is not None else None
        wait.stop()
        logits, terms, total = step(images, labels, cached=targets)
        meter.update(terms, total, logits, labels, first_step + i + 1)  # step numbers as in the records
        if (i + 1) % cfg.train.log_every == 0 or i + 1 == steps:
            raise_if_nonfinite(meter, cfg, rt, epoch, latest)  # intentional syncs: log time only
            interval, mark = meter.read_since(mark)
            now, waited = time.perf_counter(), wait.read()
            record = {"epoch": epoch, "step": first_step + i + 1, "loss": interval["total"],
                      "losses": interval["terms"], "weights": weights, "lr": step.optimizer.param_groups[0]["lr"],
                      "images_per_s": interval["samples"] * rt.world_size / (now - mark_time),
                      "data_wait_s": waited - mark_wait}
            mark_time, mark_wait = now, waited
            log.step(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
        if after_step is not None:
            after_step(i + 1, meter)
        bar.update()
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - begin
    bar.close()
    meter.reduce()
    stats = meter.read()
    return {**stats, "images_per_s": (stats["samples"] - start.samples) / elapsed, "data_wait_s": wait.read(),
            "time_s": elapsed}


def val_errors(record: dict[str, Any]) -> str:
    """`val err top1/top5` of an epoch's record, or `not evaluated` (`train.eval_every`)."""
    if record["val_top1_err"] is None:
        return "not evaluated"
    return f"val err {record['val_top1_err']:.2f}/{record['val_top5_err']:.2f}"


def format_record(record: dict[str, Any], cfg: Config) -> str:
    losses = ", ".join(f"{s.loss_name} {v:.4f}x{w:g}" for s, v, w in
                       zip(cfg.loss_list, record["losses"], record["weights"]))
    return (f"epoch {record['epoch']}/{cfg.train.epochs}  loss {record['loss']:.4f} ({losses})  "
            f"train err {record['train_top1_err']:.2f}/{record['train_top5_err']:.2f}  "
            f"{val_errors(record)}  "
            f"{record['images_per_s']:.0f} img/s")
