"""Where a run's scalars go while it trains: `metrics.jsonl`, and TensorBoard when `train.tensorboard` is on.

`metrics.jsonl` holds one JSON object per line: `kind: step` every `train.log_every` steps (the interval's
mean loss and each loss's, the loss weights, lr, images/s, data-wait seconds; `step` counts optimizer steps
from 1) and `kind: epoch` after each epoch and its evaluation (the epoch's record, as in the checkpoint's history; its
`val_*` fields are null when `train.eval_every` skips the epoch's evaluation).
It is a log, appended line by line: a crash loses at most a torn last line, and a resume first rewrites
it (atomically) to agree with its checkpoint: the step records up to the checkpoint's epoch, and the epoch
records from the checkpoint's history (so a crash between the checkpoint and the record loses nothing).
TensorBoard gets the same scalars under `train/...`, `loss/<i>_<name>`, `weight/<i>_<name>`, `val/...`,
with the optimizer step as x axis.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastcd.config import Config, TrainConfig
from fastcd.errors import FastcdError
from fastcd.utils.atomic import atomic_write_bytes, disk_full_as_error


def require_tensorboard() -> None:
    """A one-line error when `train.tensorboard` is on and the package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise FastcdError("train.tensorboard=true needs the tensorboard package (pip install tensorboard; it is in "
                          "requirements.txt), or set train.tensorboard=false") from None


def _kept_lines(path: Path, last_epoch: int, last_step: int, history: list[dict[str, Any]],
                train: TrainConfig) -> list[str]:
    """The whole step records of `path` up to optimizer step `last_step` (the checkpoint's: `last_epoch` epochs,
    and maybe some steps of the next), each finished epoch's steps followed by that epoch's record from the
    checkpoint's `history` (an epoch due an evaluation only once it has one): the log agrees with the
    checkpoint whatever a crash between writing the two left (a record missing, or one for an epoch the
    checkpoint does not hold)."""
    steps: dict[int, list[str]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a crash
            continue
        if record.get("kind") == "step" and record["step"] <= last_step:
            steps.setdefault(record["epoch"], []).append(line + "\n")
    done = {r["epoch"]: json.dumps(r) + "\n" for r in history
            if r["val_top1_err"] is not None or not train.evaluates(r["epoch"])}
    return [line for epoch in range(1, last_epoch + 2)
            for line in [*steps.get(epoch, []), *([done[epoch]] if epoch in done else [])]]


class MetricsLog:
    """The run's sinks on rank 0 (`enabled`); a no-op on the other ranks."""

    def __init__(self, cfg: Config, enabled: bool, start_epoch: int, steps_per_epoch: int,
                 history: list[dict[str, Any]], start_step: int = 0) -> None:
        """Keep the records up to epoch `start_epoch` and `start_step` steps into the next (a resume)."""
        self.enabled, self.names = enabled, [f"{i}_{s.loss_name}" for i, s in enumerate(cfg.loss_list)]
        self.steps_per_epoch, self.writer = steps_per_epoch, None
        if not enabled:
            return
        out = cfg.out_path
        self.path = out / "metrics.jsonl"
        done = start_epoch * steps_per_epoch + start_step
        atomic_write_bytes(self.path, "".join(_kept_lines(self.path, start_epoch, done, history, cfg.train)).encode())
        self.file = open(self.path, "ab", buffering=0)  # unbuffered: each record reaches the file at once; close()
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=done + 1)

    def _append(self, record: dict[str, Any]) -> None:
        line = memoryview((json.dumps(record) + "\n").encode())
        with disk_full_as_error(self.path):
            while line:  # a raw write may be short
                line = line[self.file.write(line):]

    def _scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def step(self, record: dict[str, Any]) -> None:
        """A `kind: step` record (see the module docstring)."""
        if not self.enabled:
            return
        self._append({"kind": "step", **record})
        if self.writer is not None:
            self._scalars({"train/loss": record["loss"], "train/lr": record["lr"],
                           "train/images_per_s": record["images_per_s"], "train/data_wait_s": record["data_wait_s"],
                           **{f"loss/{n}": v for n, v in zip(self.names, record["losses"])},
                           **{f"weight/{n}": w for n, w in zip(self.names, record["weights"])}}, record["step"])

    def epoch(self, record: dict[str, Any]) -> None:
        """A `kind: epoch` record, after the epoch's evaluation (or without one: `train.eval_every`)."""
        if not self.enabled:
            return
        self._append(record)
        if self.writer is not None:
            val = {f"val/{k}": record[f"val_{k}"] for k in ("top1_err", "top5_err") if record[f"val_{k}"] is not None}
            train = {"train/top1_err": record["train_top1_err"], "train/top5_err": record["train_top5_err"],
                     "train/epoch_loss": record["loss"]}
            self._scalars({**val, **train}, record["epoch"] * self.steps_per_epoch)
            self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()
