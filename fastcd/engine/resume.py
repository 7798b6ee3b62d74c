"""Resuming a run from its `latest.pt`: what may change since the checkpoint, and restoring the state.

Every config field is in exactly one of three lists (a test checks that a new field is placed):
- `KEPT` cannot change on resume and is refused by name: the networks and the losses (the checkpoint's
  tensors fit only them), `train.seed` (the RNGs are reseeded from it wherever a run resumes), the
  training set (`data.train_subset`) and everything that defines the evaluation (`data.val_subset`, `val_res`,
  `val_resize_ratio`, `flip_tta`, `mean`, `std`: `best.pt` compares errors measured one way).
- `STEP_FIELDS` may change only while the steps per epoch stay the same (the schedules' position is a
  step count).
- `CHANGEABLE` applies on resume: the optimizer's hyperparameters, the lr and loss-decay schedules (rebuilt
  from the config: `train.epochs`, `optim.schedule`, milestones...), the loss weights and parameters, the
  training augmentation and resolution, the backend and decode path (they execute the same crops), the data's
  location (`data.path`: a moved copy; a different training set shows as other steps per epoch), precision,
  layout, the teacher's weights or cache, logging, and where the run lives.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastcd.config import Config
from fastcd.errors import FastcdError
from fastcd.models import StudentWithConnectors

KEPT = ("student.arch", "student.stem", "student.width", "student.num_classes",
        "teacher.arch", "teacher.stem", "teacher.width", "teacher.num_classes", "loss_list.loss_name",
        "data.train_subset", "data.val_subset", "data.val_res", "data.val_resize_ratio", "data.flip_tta",
        "data.mean", "data.std", "train.seed")
STEP_FIELDS = ("data.batch_size", "train.max_steps_per_epoch")
CHANGEABLE = ("name", "teacher.weights", "teacher.bn_mode", "teacher.fold_bn", "teacher.cache",
              "teacher.cache_reuse", "loss_list.loss_rate", "loss_list.factor", "loss_list.loss_type",
              "loss_list.loss_rate_decay", "loss_list.params",
              "data.backend", "data.path", "data.val_batch_size", "data.workers", "data.res", "data.scale_min",
              "data.min_res", "data.max_res", "data.start_ramp", "data.end_ramp", "data.decode",
              "data.dali_hw_decoder_load", "data.dali_prefetch", "data.dali_preallocate",
              "data.ffcv_os_cache", "optim.lr", "optim.momentum", "optim.weight_decay", "optim.nesterov",
              "optim.fused", "optim.schedule", "optim.milestones", "optim.gamma", "optim.step_size",
              "optim.warmup_epochs", "optim.peak_epoch", "optim.end_lr_ratio", "train.epochs",
              "train.dataset_type", "train.amp", "train.channels_last", "train.compile", "train.device",
              "train.out_dir", "train.log_every", "train.progress", "train.tensorboard", "train.dist_timeout_s",
              "train.resume", "train.checkpoint_every_steps", "train.eval_every")


def _value(config: dict[str, Any], dotted: str) -> Any:
    """A field of a config's plain values by its dotted name; `loss_list.x` is the list of every loss's x;
    inside a null section (`teacher: null`), None."""
    section, name = dotted.split(".")
    if section == "loss_list":
        return [spec.get(name) for spec in config["loss_list"]]
    part = config.get(section)
    return part.get(name) if part is not None else None


def _changes(then: dict[str, Any], now: dict[str, Any], names: tuple[str, ...]) -> list[str]:
    """'name old -> new' for each of `names` that differs."""
    return [f"{name} {_value(then, name)!r} -> {_value(now, name)!r}" for name in names
            if _value(then, name) != _value(now, name)]


def check_resumable(ckpt: dict[str, Any], cfg: Config, path: Path, steps_per_epoch: int, world_size: int) -> None:
    """A FastcdError naming what differs, if `cfg` cannot continue the run of `ckpt`."""
    then, now = ckpt["config"], cfg.to_dict()
    where = f"cannot resume from {str(path)!r}"
    if (then["teacher"] is None) != (now["teacher"] is None):
        raise FastcdError(f"{where}: it was trained {'without' if then['teacher'] is None else 'with'} a teacher, "
                          f"the config has {'none' if now['teacher'] is None else 'one'}")
    changed = _changes(then, now, KEPT)
    if changed:
        raise FastcdError(f"{where}: {', '.join(changed)}; {'these' if len(changed) > 1 else 'this'} cannot change "
                          "on resume (the checkpoint's networks, losses, RNG streams and evaluation set depend on "
                          "them): start a new run in another train.out_dir")
    if ckpt["steps_per_epoch"] != steps_per_epoch:
        changed = _changes(then, now, STEP_FIELDS)
        if ckpt["world_size"] != world_size:
            changed.append(f"world size {ckpt['world_size']} -> {world_size}")
        raise FastcdError(f"{where}: {ckpt['steps_per_epoch']} steps per epoch then, {steps_per_epoch} now "
                          f"({', '.join(changed) or 'the training set changed'}); the schedules' position is a "
                          "step count, so these cannot change on resume")


def restore(ckpt: dict[str, Any], model: StudentWithConnectors, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LambdaLR, scaler: torch.amp.GradScaler) -> None:
    """Load the checkpoint's weights and states; keep the hyperparameters the optimizer and schedule were
    built with (this config's), so overrides apply."""
    model.student.load_state_dict(ckpt["model"])
    model.connectors.load_state_dict(ckpt["connectors"])
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])  # the momentum buffers
    for group, mine in zip(optimizer.param_groups, settings, strict=True):
        group.update(mine)
    scheduler.load_state_dict(ckpt["scheduler"])  # the step count
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if scaler.is_enabled() and ckpt["scaler"]:  # fp16 then and now; otherwise the scaler starts afresh
        scaler.load_state_dict(ckpt["scaler"])
