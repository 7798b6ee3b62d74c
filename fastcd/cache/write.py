"""Writing a teacher cache: the config's teacher over E epochs of its training crops, resumably."""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fastcd.cache.identity import differences, identity
from fastcd.cache.store import (
    Contents,
    EpochWriter,
    epoch_dir,
    new_manifest,
    open_epoch,
    read_manifest,
    valid_logits,
    write_manifest,
)
from fastcd.cache.use import check_replays, check_topk
from fastcd.config import Config, TeacherConfig
from fastcd.data import build_loader
from fastcd.data.base import BatchLoader
from fastcd.data_prep.outdir import locked
from fastcd.engine.runtime import Runtime, loader_context, seed_everything, setup_runtime
from fastcd.errors import FastcdError
from fastcd.losses.registry import loss_class
from fastcd.models import teacher_targets
from fastcd.models.teacher import build_teacher, stage_channels, weights_sha256

FLUSH_EVERY = 20  # batches between flushes of the arrays and progress.json
LOCK_NAME = ".cache-teacher.lock"  # one `fastcd cache-teacher` at a time per cache folder


class CacheMismatch(FastcdError):
    """The cache folder holds a cache of another config or options (`write_cache` without `force`)."""


PREPARED = ("torch", "ffcv", "dali")  # backends that read a `fastcd prepare` folder (the cache goes beside its data)


def default_out(cfg: Config) -> Path:
    """`<data.path>/teacher-cache/<name>` beside prepared data, else `runs/teacher-cache/<name>`."""
    prepared = cfg.data.backend in PREPARED and cfg.data.path
    return (Path(cfg.data.path) if prepared else Path("runs")) / "teacher-cache" / cfg.name


def live_teacher(cfg: Config) -> TeacherConfig:
    """The teacher a cache of `cfg` stores: a live one (not itself read from a cache)."""
    t = cfg.teacher
    if t is None:
        raise FastcdError("the config has no teacher (teacher: null); a cache needs the config of the teacher it "
                          "stores")
    if t.cache:
        raise FastcdError("the config reads teacher.cache; write a cache from the config of the live teacher "
                          "(--set teacher.cache= )")
    return t


def contents_for(cfg: Config, logits: str | None = None, embed: bool | None = None, dtype: str = "fp16") -> Contents:
    """What to store: the means always; logits and embedding as asked, else as the config's losses read."""
    t = live_teacher(cfg)
    inputs = {name for spec in cfg.loss_list for name in loss_class(spec.loss_name).inputs}
    logits = logits or ("full" if "tea_logits" in inputs else "none")
    if not valid_logits(logits, t.num_classes):
        raise FastcdError(f"--logits {logits!r}: give full, none or topk=K with 1 <= K <= {t.num_classes}")
    if embed is None:
        embed = "tea_embed" in inputs
    channels = stage_channels(t)
    contents = Contents(tuple(channels), t.num_classes, logits, channels[-1] if embed else 0, dtype)
    check_topk(cfg, contents, f"--logits {logits}")
    return contents


def write_cache(cfg: Config, out: Path, epochs: int, contents: Contents, force: bool = False) -> dict[str, Any]:
    """Run `cfg`'s teacher over `epochs` epochs of its training crops and store `contents` of its targets in
    `out`, going on from what an interrupted write left (a cache of another config is refused unless
    `force`, which rebuilds it); one run at a time per folder (a lock). Every epoch's files are checked
    before it counts as done: an epoch the manifest lists whose files are missing or damaged is written
    again. Returns the manifest."""
    t = live_teacher(cfg)
    if t.bn_mode != "eval":
        raise FastcdError("teacher.bn_mode=train: batch statistics make a crop's targets depend on its batch, "
                          "so they cannot be stored; use bn_mode eval")
    if epochs < 1:
        raise FastcdError(f"--epochs must be at least 1, got {epochs}")
    rt = setup_runtime(cfg)
    if rt.distributed:
        raise FastcdError("fastcd cache-teacher runs in one process; start it without torchrun")
    seed_everything(cfg.train.seed)
    loader = build_loader(cfg.data, "train", dataclasses.replace(loader_context(cfg, rt), keep_last=True))
    check_replays(cfg, loader)
    digest = weights_sha256(t)
    manifest = new_manifest(identity(cfg, loader, epochs, digest), contents, epochs, loader.size)
    with locked(out, LOCK_NAME, "fastcd cache-teacher", "cache folder (--out)"):
        if (out / "manifest.json").is_file() and not force:
            wrong = _mismatch(out, manifest)
            if wrong:
                raise CacheMismatch(f"{out} holds a cache for another config or options ({wrong}); pick another "
                                  "--out, or --force to rebuild it")
            done = read_manifest(out)["epochs_done"]
            manifest["epochs_done"] = [e for e in done if e < epochs and _intact(out, e, contents, loader.size)]
        else:
            for stale in out.glob("epoch-*"):
                shutil.rmtree(stale)
        write_manifest(out, manifest)
        _write_epochs(cfg, rt, loader, out, manifest, contents)
        for epoch in range(epochs):  # what the manifest now claims is there
            open_epoch(out, epoch, contents, manifest["samples"])
    manifest["bytes"] = sum(f.stat().st_size for e in range(epochs) for f in epoch_dir(out, e).glob("*.npy"))
    return manifest


def _mismatch(out: Path, manifest: dict[str, Any]) -> str:
    """The first way the cache in `out` (another format, damaged, or of other targets) is not the one
    `manifest` describes; empty if it is."""
    try:
        old = read_manifest(out)
    except FastcdError as e:
        return str(e)
    wrong = differences(old["identity"], manifest["identity"])
    wrong += [f"{k}: the cache has {old[k]!r}, now {manifest[k]!r}" for k in ("contents", "samples")
              if old[k] != manifest[k]]
    return wrong[0] if wrong else ""


def _intact(out: Path, epoch: int, contents: Contents, samples: int) -> bool:
    """Epoch `epoch`, listed as done, holds its files with their shapes; if not, say that it is written again."""
    try:
        open_epoch(out, epoch, contents, samples)
    except FastcdError as e:
        print(f"cache-teacher: epoch {epoch} is listed as done, but {e}; writing it again")
        return False
    return True


def _write_epochs(cfg: Config, rt: Runtime, loader: BatchLoader, out: Path, manifest: dict[str, Any],
                  contents: Contents) -> None:
    """The teacher's targets of every epoch of `manifest` not yet done, each recorded as done once renamed."""
    epochs = manifest["epochs"]
    teacher = build_teacher(cfg.teacher, rt.device, rt.memory_format)
    bar = tqdm(total=len(loader) * epochs, desc=f"cache-teacher {cfg.name}", unit="batch", dynamic_ncols=True,
               disable=not cfg.train.progress)
    start, crops = time.perf_counter(), 0
    for epoch in range(epochs):
        if epoch in manifest["epochs_done"]:
            bar.update(len(loader))
            continue
        loader.set_epoch(epoch)
        writer = EpochWriter(out, epoch, contents, loader.size)
        indices = loader.batch_indices()
        try:
            for b, (images, _labels) in enumerate(loader):
                if b < writer.batches_done:  # written before an interruption
                    bar.update()
                    continue
                with torch.no_grad(), rt.autocast():
                    targets = teacher_targets(teacher, images, means=True, feats=False)
                writer.write(indices[b], contents.rows(targets))
                crops += len(indices[b])
                if (b + 1) % FLUSH_EVERY == 0:
                    writer.checkpoint(b + 1)
                bar.update()
                bar.set_postfix(crops_s=f"{crops / (time.perf_counter() - start):.0f}")
            writer.checkpoint(len(indices))
            writer.finish()
        finally:
            writer.close()
        manifest["epochs_done"] = sorted({*manifest["epochs_done"], epoch})
        write_manifest(out, manifest)
    bar.close()
