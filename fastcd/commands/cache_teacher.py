"""`fastcd cache-teacher CONFIG`: run the config's teacher once over E epochs of its training crops and store
what the losses read of it (stage channel means, logits, embedding) per crop, for `teacher.cache`.

The crops are the ones training will see (`fastcd.data.crops`: a pure function of seed, epoch and sample),
read through the config's own loader, so a run of the same config replays exactly these targets. Written
resumably: a killed run, started again, goes on from the last batches it flushed.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fastcd.cache.identity import differences, identity
from fastcd.cache.store import Contents, EpochWriter, epoch_dir, new_manifest, read_manifest, write_manifest
from fastcd.config import Config, add_set_argument, load_config
from fastcd.data import build_loader
from fastcd.engine.runtime import loader_context, seed_everything, setup_runtime
from fastcd.errors import FastcdError
from fastcd.losses.registry import loss_class
from fastcd.models import teacher_targets
from fastcd.models.teacher import build_teacher, stage_channels, weights_sha256

FLUSH_EVERY = 20  # batches between flushes of the arrays and progress.json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML whose teacher, data and crops the cache is for")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of crops (default: train.epochs)")
    parser.add_argument("--logits", default=None, metavar="full|topk=K|none",
                        help="logits to store (default: full when a loss of the config reads them, else none)")
    parser.add_argument("--embed", action=argparse.BooleanOptionalAction, default=None,
                        help="store the pooled embedding (default: when a loss reads it, e.g. RKD)")
    parser.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16", help="stored precision")
    parser.add_argument("--out", default="", help="cache folder (default: <data.path>/teacher-cache/<name>, or "
                        "runs/teacher-cache/<name> for data without a path)")
    parser.add_argument("--force", action="store_true", help="rebuild a cache made for another config or options")
    add_set_argument(parser)


def default_out(cfg: Config) -> Path:
    return (Path(cfg.data.path) if cfg.data.path else Path("runs")) / "teacher-cache" / cfg.name


def contents_for(cfg: Config, logits: str | None, embed: bool | None, dtype: str) -> Contents:
    """What to store: the means always; logits and embedding as asked, else as the config's losses read."""
    inputs = {name for spec in cfg.loss_list for name in loss_class(spec.loss_name).inputs}
    logits = logits or ("full" if "tea_logits" in inputs else "none")
    if logits not in ("full", "none") and not (logits.startswith("topk=") and logits[5:].isdigit()
                                               and 0 < int(logits[5:]) <= cfg.teacher.num_classes):
        raise FastcdError(f"--logits {logits!r}: give full, none or topk=K with 1 <= K <= {cfg.teacher.num_classes}")
    if embed is None:
        embed = "tea_embed" in inputs
    channels = stage_channels(cfg.teacher)
    return Contents(tuple(channels), cfg.teacher.num_classes, logits, channels[-1] if embed else 0, dtype)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    t = cfg.teacher
    if t is None:
        raise FastcdError(f"{args.config}: teacher is null; a cache needs the config of the teacher it stores")
    if t.cache:
        raise FastcdError("the config reads teacher.cache; write a cache from the config of the live teacher "
                          "(--set teacher.cache= )")
    if t.bn_mode != "eval":
        raise FastcdError("teacher.bn_mode=train: batch statistics make a crop's targets depend on its batch, "
                          "so they cannot be stored; use bn_mode eval")
    epochs = args.epochs or cfg.train.epochs
    if epochs < 1:
        raise FastcdError(f"--epochs must be at least 1, got {epochs}")
    rt = setup_runtime(cfg.train)
    if rt.distributed:
        raise FastcdError("fastcd cache-teacher runs in one process; start it without torchrun")
    seed_everything(cfg.train.seed)
    loader = build_loader(cfg.data, "train", dataclasses.replace(loader_context(cfg, rt), keep_last=True))
    if not loader.replays_crops:
        loader.fingerprint()  # a one-line error: this backend's crops cannot be replayed
    contents = contents_for(cfg, args.logits, args.embed, args.dtype)
    out = Path(args.out) if args.out else default_out(cfg)
    digest = weights_sha256(t)
    manifest = new_manifest(identity(cfg, loader, epochs, digest), contents, epochs, loader.size)
    if (out / "manifest.json").is_file() and not args.force:
        old = read_manifest(out)
        wrong = differences(old["identity"], manifest["identity"])
        wrong += [f"{k}: the cache has {old[k]!r}, now {manifest[k]!r}" for k in ("contents", "samples")
                  if old[k] != manifest[k]]
        if wrong:
            raise FastcdError(f"{out} holds a cache for another config or options ({wrong[0]}); pick another "
                              "--out, or --force to rebuild it")
        manifest["epochs_done"] = [e for e in old["epochs_done"] if e < epochs]  # resumed (or extended)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("epoch-*"):
            shutil.rmtree(stale)
    write_manifest(out, manifest)
    teacher = build_teacher(t, rt.device, cfg.train.channels_last)
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
        for b, (images, _labels) in enumerate(loader):
            if b < writer.batches_done:  # written before an interruption
                bar.update()
                continue
            with torch.no_grad(), rt.autocast():
                targets = teacher_targets(teacher, images, means=True)
            writer.write(indices[b], contents.rows(targets))
            crops += len(indices[b])
            if (b + 1) % FLUSH_EVERY == 0:
                writer.checkpoint(b + 1)
            bar.update()
            bar.set_postfix(crops_s=f"{crops / (time.perf_counter() - start):.0f}")
        writer.checkpoint(len(indices))
        writer.finish()
        manifest["epochs_done"] = sorted({*manifest["epochs_done"], epoch})
        write_manifest(out, manifest)
    bar.close()
    size = sum(f.stat().st_size for e in range(epochs) for f in epoch_dir(out, e).glob("*.npy"))
    print(f"{out}: {epochs} epochs x {loader.size} crops, {contents.bytes_per_crop()} bytes per crop "
          f"({contents.logits} logits, {'with' if contents.embed_dim else 'no'} embedding, {contents.dtype}), "
          f"{size / 2**20:.1f} MiB; teacher weights sha256 {digest[:12]}")
    return 0
