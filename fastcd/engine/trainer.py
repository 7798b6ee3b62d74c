"""`fastcd train`: the recipe, top to bottom —
runtime -> data -> models -> losses -> optimizer -> schedules -> resume -> DDP -> epochs.

Every `train.log_every` steps it records the interval's losses, loss weights, lr, images/s and data wait,
and after each epoch (and its evaluation: every `train.eval_every` epochs and after the last) the
epoch's record (`<out>/metrics.jsonl`, the console and, with `train.tensorboard`, TensorBoard:
`fastcd.engine.sinks`). Each epoch's `latest.pt` is written (atomically)
before the evaluation, then again with its result, and `best.pt` when the epoch is the best so far. Nothing
in the run folder changes (not even under `--force`) before every input the session reads has been checked,
and `--force` only moves the previous run aside until the new run's first checkpoint: a session that fails
before it (a sample that does not decode, say) puts the previous run back.
"""
from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fastcd.cache.use import cache_epoch, open_cache, set_train_epoch
from fastcd.config import Config
from fastcd.data import build_loader
from fastcd.engine.distributed import describe_failure, is_collective_failure, teardown
from fastcd.engine.elastic import (
    auto_resume,
    check_mid_epoch,
    check_same_config,
    check_world_size,
    decided_by_rank0,
    epoch_start,
    gather_sums,
    reseed,
)
from fastcd.engine.epoch import format_record, raise_if_nonfinite, train_epoch
from fastcd.engine.evaluate import evaluate
from fastcd.engine.metrics import Meter
from fastcd.engine.resume import check_resumable, restore
from fastcd.engine.run_folder import check_run_folder, put_back, record_session, set_aside
from fastcd.engine.runtime import Runtime, loader_context, seed_everything, setup_runtime
from fastcd.engine.sinks import MetricsLog, require_tensorboard
from fastcd.engine.step import DistillStep
from fastcd.errors import FastcdError
from fastcd.losses import build_loss
from fastcd.models import StudentWithConnectors, build_resnet
from fastcd.models.resnet import FeatureResNet
from fastcd.models.teacher import build_teacher, stage_channels
from fastcd.schedules import adjust_loss_alpha, build_lr_scheduler
from fastcd.utils.atomic import check_dir_possible
from fastcd.utils.checkpoint import load_checkpoint, save_checkpoint


def build_models(cfg: Config, rt: Runtime,
                 connector_stages: Sequence[int] = ()) -> tuple[StudentWithConnectors, FeatureResNet | None]:
    """The trainable student with the connectors of `connector_stages` and the frozen teacher (none without a
    teacher section, or with a teacher cache), on the device, in the run's layout."""
    student = build_resnet(cfg.student.arch, cfg.student.num_classes, cfg.student.stem, cfg.student.width)
    t = cfg.teacher
    model = StudentWithConnectors(student, stage_channels(t) if t is not None else None,
                                  connector_stages if t is not None else ())
    model.to(rt.device, memory_format=rt.memory_format)
    # the teacher last: with or without it (a teacher cache), the trained modules start from the same draws
    teacher = build_teacher(t, rt.device, rt.memory_format) if t is not None and not t.cache else None
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
    model, teacher = build_models(cfg, rt, sorted({i for loss in losses for i in loss.connector_stages()}))
    optimizer = build_optimizer(cfg, model, rt)
    scheduler = build_lr_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    if ckpt is not None:
        restore(ckpt, model, optimizer, scheduler, scaler)
    trained: torch.nn.Module = model
    if rt.distributed:
        trained = DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    if compile_mode is not None:  # compile(DDP(model)): dynamo keeps DDP's buckets and their overlap
        trained = torch.compile(trained, mode=compile_mode)
        teacher = torch.compile(teacher, mode=compile_mode) if teacher is not None else None
    return model, DistillStep(trained, teacher, losses, optimizer, scheduler, scaler, rt)


def loss_weights(cfg: Config, epoch: int) -> list[float]:
    """Each loss's weight at 1-based `epoch`, milestones scaled to the run's length."""
    return [adjust_loss_alpha(s.loss_rate, epoch, s.factor, s.loss_type, s.loss_rate_decay,
                              cfg.train.dataset_type, cfg.train.epochs) for s in cfg.loss_list]


def pending_evaluation(cfg: Config, history: list[dict[str, Any]]) -> bool:
    """Whether the checkpoint's last epoch is due an evaluation (`train.eval_every`) it never got."""
    return bool(history) and history[-1]["val_top1_err"] is None and cfg.train.evaluates(history[-1]["epoch"])


def last_epoch(cfg: Config, start_epoch: int, history: list[dict[str, Any]], stop_after_epoch: int | None) -> int:
    """The last epoch this session trains (`train.epochs`, or `stop_after_epoch` if earlier). A session with
    nothing to do (no epoch to train and no evaluation pending) is an error naming why, raised before the run
    folder is touched."""
    out, epochs = str(cfg.out_path), cfg.train.epochs
    if stop_after_epoch is not None and stop_after_epoch < 1:
        raise FastcdError(f"--stop-after must be at least 1, got {stop_after_epoch}")
    last = min(epochs, stop_after_epoch) if stop_after_epoch is not None else epochs
    if last > start_epoch or (pending_evaluation(cfg, history) and last == start_epoch):
        return last
    if epochs < start_epoch:
        raise FastcdError(f"train.epochs={epochs} but the run in {out!r} is already at epoch {start_epoch}: nothing "
                          f"to train, the folder is left as it is (set train.epochs above {start_epoch} to continue)")
    if epochs == start_epoch:
        raise FastcdError(f"the run in {out!r} has finished its train.epochs={epochs} epochs: nothing to train, the "
                          "folder is left as it is (raise train.epochs to continue it)")
    raise FastcdError(f"--stop-after {stop_after_epoch}: the run in {out!r} is already at epoch {start_epoch}; "
                      f"nothing to train (give an epoch after {start_epoch}, or leave --stop-after out)")


class Run:
    """One run in its folder: data, the step (restored on resume), the history and best error, the sinks;
    `epoch(e)` trains and evaluates epoch e."""

    def __init__(self, cfg: Config, rt: Runtime, resume: bool, stop_after_epoch: int | None) -> None:
        self.cfg, self.rt = cfg, rt
        out = cfg.out_path
        self.latest, self.best_path = out / "latest.pt", out / "best.pt"
        seed_everything(cfg.train.seed)
        ctx = loader_context(cfg, rt)
        self.train_loader, self.val_loader = build_loader(cfg.data, "train", ctx), build_loader(cfg.data, "val", ctx)
        steps = len(self.train_loader)
        self.steps = min(steps, cfg.train.max_steps_per_epoch) if cfg.train.max_steps_per_epoch else steps
        if self.steps == 0:
            raise FastcdError(f"data.batch_size={cfg.data.batch_size} is larger than this rank's "
                              f"{self.train_loader.num_samples} training samples: no full batch per epoch")
        ckpt = None
        if resume:
            ckpt = load_checkpoint(self.latest)
            check_world_size(ckpt, cfg, self.latest, rt.world_size)
            check_resumable(ckpt, cfg, self.latest, self.steps, rt.world_size)
        self.position = ckpt.get("position") if ckpt is not None else None  # a mid-epoch checkpoint's
        check_mid_epoch(cfg, self.train_loader, self.position, self.latest)
        self.model, self.step = build_step(cfg, rt, self.steps, ckpt, "default" if cfg.train.compile else None)
        self.start_epoch, self.history, self.best = 0, [], math.inf
        if ckpt is not None:
            self.start_epoch, self.history, self.best = ckpt["epoch"], ckpt["history"], ckpt["best_top1_err"]
        self.last_epoch = last_epoch(cfg, self.start_epoch, self.history, stop_after_epoch)
        self.cache = None
        if cfg.teacher is not None and cfg.teacher.cache:  # no teacher was built: its targets come from here
            self.cache = open_cache(cfg, self.train_loader, {n for loss in self.step.losses for n in loss.inputs})
            self.cache.check(cache_epoch(cfg, self.cache, e - 1) for e in range(self.start_epoch + 1,
                                                                                 self.last_epoch + 1))
        if ckpt is not None and rt.is_main:
            within = f", step {self.position['step']} of epoch {self.position['epoch']}" if self.position else ""
            print(f"resumed from {self.latest} after epoch {self.start_epoch}{within}")
        done = self.position["step"] if self.position else 0  # steps done in the epoch after start_epoch
        # every input the session reads is checked (data, checkpoint, teacher or cache): now the folder changes
        self.replaced = set_aside(out) if rt.is_main and not resume else None  # `--force`: the previous run
        try:
            if rt.is_main:
                record_session(out, cfg, self.start_epoch, rt, done)
            self.log = MetricsLog(cfg, rt.is_main, self.start_epoch, self.steps, self.history, done)
        except BaseException:
            self.put_back()
            raise

    def put_back(self) -> None:
        """After a failure before this run's first checkpoint: the run `--force` replaces returns to the folder."""
        if self.replaced is not None:
            put_back(self.cfg.out_path, self.replaced)
            self.replaced = None

    def save(self, epoch: int, is_best: bool, position: dict[str, Any] | None = None) -> None:
        """latest.pt (and best.pt) after epoch `epoch`, and `position` in the next (`engine.elastic`); rank 0
        only. No RNG state: the RNGs are reseeded at every point a run resumes from."""
        if not self.rt.is_main:
            return
        s = self.step
        state = {"config": self.cfg.to_dict(), "model": self.model.student.state_dict(),
                 "connectors": self.model.connectors.state_dict(), "optimizer": s.optimizer.state_dict(),
                 "scheduler": s.scheduler.state_dict(), "scaler": s.scaler.state_dict(), "epoch": epoch,
                 "history": self.history, "best_top1_err": self.best,
                 "steps_per_epoch": self.steps, "world_size": self.rt.world_size}
        if position is not None:
            state["position"] = position
        save_checkpoint(self.latest, state)
        if self.replaced is not None:  # the first checkpoint: the run `--force` replaces may go now
            shutil.rmtree(self.replaced)
            self.replaced = None
        if is_best:
            save_checkpoint(self.best_path, state)

    def evaluate(self, record: dict[str, Any]) -> None:
        """Validation errors into the epoch's `record`, then the checkpoints and sinks that include them."""
        self.val_loader.set_epoch(record["epoch"] - 1)
        val = evaluate(self.model.student, self.val_loader, self.rt, self.cfg.data.flip_tta)
        record.update(val_top1_err=val["top1_err"], val_top5_err=val["top5_err"])
        is_best = val["top1_err"] < self.best
        self.best = min(self.best, val["top1_err"])
        self.save(record["epoch"], is_best)
        self.report(record)

    def report(self, record: dict[str, Any]) -> None:
        """The epoch's record to the sinks and the console."""
        self.log.epoch(record)
        if self.rt.is_main:
            tqdm.write(format_record(record, self.cfg))

    def within_epoch(self, epoch: int, step: int, meter: Meter) -> None:
        """After step `step` of epoch `epoch`: every `train.checkpoint_every_steps` optimizer steps (short of
        the epoch's end, which has its own), check the losses, write latest.pt with the position, reseed."""
        every = self.cfg.train.checkpoint_every_steps
        if not every or ((epoch - 1) * self.steps + step) % every or step == self.steps:
            return
        raise_if_nonfinite(meter, self.cfg, self.rt, epoch, self.latest)  # intentional syncs: checkpoint time
        sums = gather_sums(meter.sums, self.rt)
        self.save(epoch - 1, is_best=False, position={"epoch": epoch, "step": step, "sums": sums})
        reseed(self.cfg.train.seed, epoch, step, self.rt.rank)

    def epoch(self, epoch: int) -> None:
        """Train epoch `epoch` (1-based), checkpoint it, then evaluate it. Epochs are 1-based here, in the
        records and in the loss-rate decay (as the seed's schedule counts them); loaders, crops and the teacher
        cache count from 0, hence `epoch - 1` below."""
        weights = loss_weights(self.cfg, epoch)
        self.step.set_weights(weights)
        start = epoch_start(self.position, epoch, self.rt)
        reseed(self.cfg.train.seed, epoch, start.step, self.rt.rank)
        cached = set_train_epoch(self.cfg, self.train_loader, self.cache, epoch - 1, start.step, self.rt.device)
        self.model.train()
        stats = train_epoch(self.step, self.train_loader, self.steps, self.cfg, self.rt, epoch, weights,
                            self.latest, self.log, cached, start, lambda k, meter: self.within_epoch(epoch, k, meter))
        self.position = None
        record = {"kind": "epoch", "epoch": epoch, "weights": weights, "losses": stats["terms"],
                  "loss": stats["total"], "lr": self.step.optimizer.param_groups[0]["lr"],
                  "train_top1_err": stats["top1_err"], "train_top5_err": stats["top5_err"], "val_top1_err": None,
                  "val_top5_err": None, "images_per_s": stats["images_per_s"], "data_wait_s": stats["data_wait_s"],
                  "epoch_time_s": stats["time_s"]}
        self.history.append(record)
        self.save(epoch, is_best=False)  # before evaluating: an evaluation that fails costs no training
        if self.cfg.train.evaluates(epoch):
            self.evaluate(record)
        else:
            self.report(record)


def train(cfg: Config, resume: bool = False, stop_after_epoch: int | None = None,
          force: bool = False) -> list[dict[str, Any]]:
    """Train `cfg` (up to `stop_after_epoch`); return the per-epoch history. `resume` continues from
    `<out>/latest.pt` exactly; a new run into a folder that holds another is an error unless `force` (which
    moves the old run's files aside once every input of the new run has been checked, puts them back if the
    session fails before its first checkpoint, and deletes them after it). With
    `train.resume: auto` (and neither flag) a run continues its own latest.pt when there is one."""
    auto = cfg.train.resume == "auto" and not (resume or force)
    if auto:  # `auto_resume` decides below, once the runtime is up
        check_dir_possible(cfg.out_path)
    else:
        check_run_folder(cfg, resume, force)
    if cfg.train.tensorboard:
        require_tensorboard()
    rt = setup_runtime(cfg)
    try:
        check_same_config(cfg, rt)
        if auto:  # under torchrun --max-restarts: continue this run's latest.pt, if any
            resume = decided_by_rank0(rt, lambda: auto_resume(cfg))
        run = Run(cfg, rt, resume, stop_after_epoch)
        try:
            return _train(run)
        except BaseException:
            run.put_back()
            raise
    except RuntimeError as e:
        if rt.distributed and is_collective_failure(e):
            raise FastcdError(describe_failure(rt, e, cfg.train.dist_timeout_s)) from e
        raise
    finally:
        teardown(rt)


def _train(run: Run) -> list[dict[str, Any]]:
    try:
        if pending_evaluation(run.cfg, run.history):
            run.evaluate(run.history[-1])
        for epoch in range(run.start_epoch + 1, run.last_epoch + 1):
            run.epoch(epoch)
    finally:
        run.log.close()
    if run.rt.distributed:
        torch.distributed.barrier()
    return run.history


__all__ = ["build_models", "build_optimizer", "build_step", "loss_weights", "train"]
