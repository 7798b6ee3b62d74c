"""`fastcd train`: the recipe, top to bottom —
runtime -> data -> models -> losses -> optimizer -> schedules -> resume -> DDP -> epochs.

Per epoch it logs the loss weights, each loss's mean, train and val top-1/top-5 error and images/s to
`<out>/metrics.jsonl` and the console, and writes `latest.pt` and `best.pt` atomically.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fastcd.config import Config
from fastcd.data import LoaderContext, build_loader
from fastcd.data.base import BatchLoader
from fastcd.engine.checkpoint import load_checkpoint, save_checkpoint, unwrap
from fastcd.engine.distributed import describe_failure, first_nonfinite, is_collective_failure, teardown
from fastcd.engine.evaluate import evaluate
from fastcd.engine.metrics import Meter
from fastcd.engine.resume import check_resumable, restore
from fastcd.engine.run_folder import check_run_folder, clear_run_folder, record_session
from fastcd.engine.runtime import Runtime, rng_state, seed_everything, set_rng_state, setup_runtime
from fastcd.engine.step import DistillStep
from fastcd.engine.timing import DataWait
from fastcd.errors import FastcdError
from fastcd.losses import build_loss
from fastcd.models import StudentWithConnectors, build_resnet, freeze
from fastcd.models.fold import fold_batchnorm
from fastcd.models.resnet import FeatureResNet
from fastcd.models.teacher import load_teacher
from fastcd.schedules import adjust_loss_alpha, build_lr_scheduler
from fastcd.utils.atomic import atomic_write_bytes


def build_models(cfg: Config, rt: Runtime, with_connectors: bool) -> tuple[StudentWithConnectors, FeatureResNet | None]:
    """The trainable student (+connectors) and the frozen teacher, on the device, in the run's layout."""
    student = build_resnet(cfg.student.arch, cfg.student.num_classes, cfg.student.stem, cfg.student.width)
    teacher = freeze(load_teacher(cfg.teacher), cfg.teacher.bn_mode) if cfg.teacher else None
    if teacher is not None and cfg.teacher.fold_bn:
        teacher = fold_batchnorm(teacher)
    conn_channels = teacher.stage_channels if teacher is not None and with_connectors else None
    model = StudentWithConnectors(student, conn_channels)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model.to(rt.device, memory_format=fmt)
    if teacher is not None:
        teacher.to(rt.device, memory_format=fmt)
    return model, teacher


def build_optimizer(cfg: Config, model: torch.nn.Module, rt: Runtime) -> torch.optim.SGD:
    """SGD with momentum and weight decay; the fused kernel on GPU (`fused: null`) or when asked (`true`)."""
    o = cfg.optim
    fused = o.fused if o.fused is not None else rt.device.type == "cuda"
    try:
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               nesterov=o.nesterov, fused=fused or None)
    except RuntimeError as e:
        raise FastcdError(f"optim.fused=true is not supported here ({e}); use null or false") from None


def build_step(cfg: Config, rt: Runtime, steps_per_epoch: int, ckpt: dict[str, Any] | None = None,
               compile_mode: str | None = None) -> tuple[StudentWithConnectors, DistillStep]:
    """The plain student (+connectors) and the training step over it: losses, models, optimizer,
    per-iteration lr schedule and GradScaler, restored from `ckpt` if given, then wrapped
    (DDP under torchrun, then `torch.compile` with `compile_mode`)."""
    losses = [build_loss(s.loss_name, s.params).to(rt.device) for s in cfg.loss_list]
    model, teacher = build_models(cfg, rt, any("conn_feats" in loss.inputs for loss in losses))
    optimizer = build_optimizer(cfg, model, rt)
    scheduler = build_lr_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    if ckpt is not None:
        restore(ckpt, model, optimizer, scheduler, scaler)
    trained: torch.nn.Module = model
    if rt.distributed:
        partial = any(loss.partial_connectors for loss in losses)
        trained = DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
                                          find_unused_parameters=partial)
    if compile_mode is not None:  # compile(DDP(model)): dynamo keeps DDP's buckets and their overlap
        trained = torch.compile(trained, mode=compile_mode)
        teacher = torch.compile(teacher, mode=compile_mode) if teacher is not None else None
    return model, DistillStep(trained, teacher, losses, optimizer, scheduler, scaler, rt)


def loss_weights(cfg: Config, epoch: int) -> list[float]:
    """Each loss's weight at 1-based `epoch`, milestones scaled to the run's length."""
    return [adjust_loss_alpha(s.loss_rate, epoch, s.factor, s.loss_type, s.loss_rate_decay,
                              cfg.train.dataset_type, cfg.train.epochs) for s in cfg.loss_list]


def _raise_if_nonfinite(meter: Meter, cfg: Config, rt: Runtime, epoch: int, latest: Path) -> None:
    """Every rank raises the same error when any rank met a non-finite loss (intentional sync: log time)."""
    found = first_nonfinite(meter, rt)
    if found is not None:
        bad, rank, terms = found
        values = ", ".join(f"{s.loss_name}={v:.4g}" for s, v in zip(cfg.loss_list, terms))
        where = f" on rank {rank}" if rt.distributed else ""
        kept = f"the last good checkpoint {str(latest)!r} is kept" if latest.exists() else "no checkpoint yet"
        raise FastcdError(f"non-finite loss at epoch {epoch}, step {bad}{where}: {values}; training stopped, {kept}")


def train_epoch(step: DistillStep, loader: BatchLoader, steps: int, cfg: Config, rt: Runtime, epoch: int,
                first_step: int, latest: Path) -> dict[str, Any]:
    """One epoch of `steps` iterations; returns the epoch's train statistics."""
    meter = Meter(len(step.losses), rt.device)
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.train.epochs}", leave=False, dynamic_ncols=True,
               disable=not (cfg.train.progress and rt.is_main))
    batches, wait = iter(loader), DataWait(rt.device)
    start = time.perf_counter()
    for i in range(steps):
        wait.start()
        images, labels = next(batches)
        wait.stop()
        logits, terms, total = step(images, labels)
        meter.update(terms, total, logits, labels, first_step + i)
        if (i + 1) % cfg.train.log_every == 0 or i + 1 == steps:
            _raise_if_nonfinite(meter, cfg, rt, epoch, latest)  # intentional syncs: log time only
            bar.set_postfix(loss=f"{meter.read()['total']:.4f}",
                            img_s=f"{meter.sums[-1].item() * rt.world_size / (time.perf_counter() - start):.0f}")
        bar.update()
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    bar.close()
    meter.reduce()
    stats = meter.read()
    return {**stats, "images_per_s": stats["samples"] / elapsed, "data_wait_s": wait.read(), "time_s": elapsed}


def _format(record: dict[str, Any], cfg: Config) -> str:
    losses = ", ".join(f"{s.loss_name} {v:.4f}x{w:g}" for s, v, w in
                       zip(cfg.loss_list, record["losses"], record["weights"]))
    return (f"epoch {record['epoch']}/{cfg.train.epochs}  loss {record['loss']:.4f} ({losses})  "
            f"train err {record['train_top1_err']:.2f}/{record['train_top5_err']:.2f}  "
            f"val err {record['val_top1_err']:.2f}/{record['val_top5_err']:.2f}  "
            f"{record['images_per_s']:.0f} img/s")


def train(cfg: Config, resume: bool = False, stop_after_epoch: int | None = None,
          force: bool = False) -> list[dict[str, Any]]:
    """Train `cfg`; return the per-epoch history. `resume` continues from `<out>/latest.pt` exactly; a new
    run into a folder that holds another is an error unless `force` (which removes the old run's files)."""
    check_run_folder(cfg.out_path, resume, force)
    rt = setup_runtime(cfg.train)
    try:
        return _train(cfg, rt, resume, stop_after_epoch)
    except RuntimeError as e:
        if rt.distributed and is_collective_failure(e):
            raise FastcdError(describe_failure(rt, e, cfg.train.dist_timeout_s)) from e
        raise
    finally:
        teardown(rt)


def _train(cfg: Config, rt: Runtime, resume: bool, stop_after_epoch: int | None) -> list[dict[str, Any]]:
    seed_everything(cfg.train.seed)
    out = cfg.out_path
    latest, best_path = out / "latest.pt", out / "best.pt"

    # Data
    ctx = LoaderContext(rt.device, rt.amp_dtype, cfg.train.channels_last, cfg.student.num_classes,
                        rt.rank, rt.world_size, cfg.train.seed)
    train_loader, val_loader = build_loader(cfg.data, "train", ctx), build_loader(cfg.data, "val", ctx)
    steps = len(train_loader)
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    if steps == 0:
        raise FastcdError(f"data.batch_size={cfg.data.batch_size} is larger than this rank's "
                          f"{train_loader.num_samples} training samples: no full batch per epoch")

    # Resume state, then models, losses, optimizer, schedules and wrappers
    ckpt = None
    if resume:
        ckpt = load_checkpoint(latest)
        check_resumable(ckpt, cfg, latest, steps, rt.world_size)
    model, step = build_step(cfg, rt, steps, ckpt, "default" if cfg.train.compile else None)
    optimizer, scheduler, scaler = step.optimizer, step.scheduler, step.scaler
    start_epoch, history, best = 0, [], math.inf
    if ckpt is not None:
        start_epoch, history, best = ckpt["epoch"], ckpt["history"], ckpt["best_top1_err"]
        set_rng_state(ckpt["rng"])
        if rt.is_main:
            print(f"resumed from {latest} after epoch {start_epoch}")
    if rt.is_main:
        if not resume:
            clear_run_folder(out)
        record_session(out, cfg, start_epoch, rt.world_size)

    def save(epoch: int, is_best: bool) -> None:
        """latest.pt (and best.pt), then metrics.jsonl; rank 0 only."""
        if not rt.is_main:
            return
        state = {"config": cfg.to_dict(), "model": model.student.state_dict(),
                 "connectors": model.connectors.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                 "rng": rng_state(), "history": history, "best_top1_err": best, "steps_per_epoch": steps,
                 "world_size": rt.world_size}
        save_checkpoint(latest, state)
        if is_best:
            save_checkpoint(best_path, state)
        atomic_write_bytes(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history).encode())

    def evaluate_epoch(record: dict[str, Any]) -> None:
        """Validation errors into `record`, then the checkpoints that include them."""
        nonlocal best
        val_loader.set_epoch(record["epoch"] - 1)
        val = evaluate(model.student, val_loader, rt, cfg.data.flip_tta)
        record.update(val_top1_err=val["top1_err"], val_top5_err=val["top5_err"])
        is_best = val["top1_err"] < best
        best = min(best, val["top1_err"])
        save(record["epoch"], is_best)
        if rt.is_main:
            tqdm.write(_format(record, cfg))

    if history and history[-1]["val_top1_err"] is None:  # the checkpoint's epoch was never evaluated
        evaluate_epoch(history[-1])
    for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
        weights = loss_weights(cfg, epoch)
        step.set_weights(weights)
        train_loader.set_epoch(epoch - 1)
        model.train()
        stats = train_epoch(step, train_loader, steps, cfg, rt, epoch, (epoch - 1) * steps, latest)
        record = {"epoch": epoch, "weights": weights, "losses": stats["terms"], "loss": stats["total"],
                  "lr": optimizer.param_groups[0]["lr"], "train_top1_err": stats["top1_err"],
                  "train_top5_err": stats["top5_err"], "val_top1_err": None, "val_top5_err": None,
                  "images_per_s": stats["images_per_s"], "data_wait_s": stats["data_wait_s"],
                  "epoch_time_s": stats["time_s"]}
        history.append(record)
        save(epoch, is_best=False)  # before evaluating: an evaluation that fails costs no training
        evaluate_epoch(record)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    if rt.distributed:
        torch.distributed.barrier()
    return history


__all__ = ["build_models", "build_optimizer", "build_step", "loss_weights", "train", "unwrap"]
