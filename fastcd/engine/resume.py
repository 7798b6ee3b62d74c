"""Resuming a run from its `latest.pt`: what may change since the checkpoint, and restoring the state.

Every override that can change on resume is applied: the optimizer's hyperparameters (lr, momentum,
weight decay, nesterov, fused), the lr and loss-decay schedules (rebuilt from the config: `train.epochs`,
`optim.schedule`, milestones...), the loss weights and parameters, precision, layout, teacher weights.
The ones that cannot are refused by name: the networks and the losses (the checkpoint's tensors fit
only them), `train.seed` (the RNG states continue from the checkpoint) and whatever changes the steps
per epoch (the schedules' position is a step count).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastcd.config import Config
from fastcd.errors import FastcdError
from fastcd.models import StudentWithConnectors

STEP_FIELDS = (("data", "batch_size"), ("data", "train_subset"), ("train", "max_steps_per_epoch"))


def check_resumable(ckpt: dict[str, Any], cfg: Config, path: Path, steps_per_epoch: int, world_size: int) -> None:
    """A FastcdError naming what differs, if `cfg` cannot continue the run of `ckpt`."""
    then, now = ckpt["config"], cfg.to_dict()
    where = f"cannot resume from {str(path)!r}"
    for part in ("student", "teacher"):
        keys = ("arch", "stem", "width", "num_classes")
        a = {k: then[part][k] for k in keys} if then.get(part) else None
        b = {k: now[part][k] for k in keys} if now[part] else None
        if a != b:
            raise FastcdError(f"{where}: its {part} is {a}, the config's is {b}")
    if [s["loss_name"] for s in then["loss_list"]] != [s.loss_name for s in cfg.loss_list]:
        raise FastcdError(f"{where}: it was trained with losses {[s['loss_name'] for s in then['loss_list']]}, "
                          f"the config has {[s.loss_name for s in cfg.loss_list]}")
    if then["train"]["seed"] != cfg.train.seed:
        raise FastcdError(f"{where}: train.seed {then['train']['seed']} -> {cfg.train.seed} cannot change on "
                          "resume (the RNG states continue from the checkpoint)")
    if ckpt["steps_per_epoch"] != steps_per_epoch:
        changed = [f"{a}.{b} {then[a][b]} -> {now[a][b]}" for a, b in STEP_FIELDS if then[a][b] != now[a][b]]
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
