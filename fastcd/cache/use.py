"""Opening a cache for a training run: it must match the run and hold what its losses read."""
from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator

import torch

from fastcd.cache.identity import check_identity, identity
from fastcd.cache.store import CacheReader, Contents
from fastcd.config import Config
from fastcd.data.base import REPLAYING_NAMES, BatchLoader
from fastcd.data.resolution import train_res
from fastcd.errors import FastcdError
from fastcd.losses.registry import loss_class
from fastcd.models import TeacherTargets

STORED = {"tea_means": "stage means", "tea_logits": "logits", "tea_embed": "pooled embedding"}


def check_replays(cfg: Config, loader: BatchLoader) -> None:
    """Refuse a backend that does not replay fastcd's crops (`replays_crops`): a cache cannot match them."""
    if not loader.replays_crops:
        raise FastcdError(f"data.backend {cfg.data.backend!r} cannot be used with a teacher cache: its crops are "
                          f"not fastcd's per-sample plan; use data.backend {REPLAYING_NAMES}")


def check_topk(cfg: Config, contents: Contents, where: str) -> None:
    """Refuse top-k logits (fewer than every class) to a loss that reads them at a temperature other than 1:
    the cache knows the missing classes only by their total probability at T=1 (`Contents.targets`), and at
    another T how that mass spreads over them changes the loss."""
    if not contents.topk or contents.topk == contents.num_classes:
        return
    for spec in cfg.loss_list:
        signature = inspect.signature(loss_class(spec.loss_name).__init__).parameters
        T = spec.params.get("T", signature["T"].default if "T" in signature else 1)
        if "tea_logits" in loss_class(spec.loss_name).inputs and T != 1:
            raise FastcdError(f"{where} holds the top {contents.topk} of {contents.num_classes} logits, and "
                              f"{spec.loss_name} reads them at T={T}: only at T=1 are the missing classes' "
                              "probabilities exact (their total); store full logits (`fastcd cache-teacher "
                              "--logits full`)")


def check_cycle(cfg: Config, epochs: int, path: str) -> None:
    """Under `cache_reuse: cycle` training epoch e replays cache epoch e mod E with its crops' resolution: refuse
    a resolution schedule that gives an epoch past the cache another resolution than the one it replays."""
    d = cfg.data
    for e in range(epochs, cfg.train.epochs):
        if train_res(d, e) != train_res(d, e % epochs):
            raise FastcdError(f"teacher cache {path!r} holds {epochs} epochs; with teacher.cache_reuse=cycle "
                              f"epoch {e + 1} would replay cache epoch {e % epochs + 1} at "
                              f"{train_res(d, e % epochs)} px, where the resolution schedule (data.min_res/"
                              f"max_res/start_ramp/end_ramp) gives {train_res(d, e)} px; write all "
                              f"{cfg.train.epochs} epochs (`fastcd cache-teacher --epochs {cfg.train.epochs}`) "
                              "or keep the resolution fixed past the cache's epochs")


def open_cache(cfg: Config, loader: BatchLoader, inputs: Iterable[str]) -> CacheReader:
    """The cache `cfg.teacher.cache`, checked against the run: its train `loader` replays fastcd's crops,
    the teacher, its input pixels and the seed match, it holds the run's epochs (or `cache_reuse: cycle` at
    the same resolutions), every file of every epoch the run reads is there with its shape, and it holds every
    teacher target the losses read (`inputs`), top-k logits only at T=1; otherwise a one-line error naming
    the mismatch."""
    path = cfg.teacher.cache
    check_replays(cfg, loader)
    reader = CacheReader(path)
    check_identity(reader.manifest["identity"], identity(cfg, loader, reader.epochs), path)
    if cfg.train.epochs > reader.epochs and cfg.teacher.cache_reuse == "exact":
        raise FastcdError(f"teacher cache {path!r} holds {reader.epochs} epochs of crops, this run trains "
                          f"{cfg.train.epochs}: write more with `fastcd cache-teacher --epochs {cfg.train.epochs}`, "
                          "or replay them with teacher.cache_reuse=cycle")
    check_cycle(cfg, reader.epochs, path)
    have = {"tea_means": True, "tea_logits": reader.contents.logits != "none",
            "tea_embed": reader.contents.embed_dim > 0}
    for name in inputs:
        if name in STORED and not have[name]:
            raise FastcdError(f"teacher cache {path!r} holds no {STORED[name]}, which a loss of this run reads; "
                              f"write it with `fastcd cache-teacher` and its --logits/--embed options")
    check_topk(cfg, reader.contents, f"teacher cache {path!r}")
    reader.check(range(min(cfg.train.epochs, reader.epochs)))
    return reader


def cache_epoch(cfg: Config, reader: CacheReader, epoch: int) -> int:
    """The cache epoch (0-based) that training epoch `epoch` (0-based) replays: itself, or it modulo the
    cache's epochs under `cache_reuse: cycle`."""
    return epoch % reader.epochs if cfg.teacher.cache_reuse == "cycle" else epoch


def set_train_epoch(cfg: Config, loader: BatchLoader, cache: CacheReader | None, epoch: int, start_batch: int,
                device: torch.device) -> Iterator[TeacherTargets] | None:
    """Set the train `loader` to training epoch `epoch` (0-based) from its batch `start_batch`: with a `cache`,
    to the crops of the cache epoch it replays, whose stored targets (per batch, on `device`) are returned;
    without one, None."""
    if cache is None:
        loader.set_epoch(epoch, start_batch)
        return None
    replayed = cache_epoch(cfg, cache, epoch)
    loader.set_epoch(replayed, start_batch)
    return cache.batches(replayed, loader.batch_indices(), device)
