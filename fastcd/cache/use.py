"""Opening a cache for a training run: it must match the run and hold what its losses read."""
from __future__ import annotations

from collections.abc import Iterable

from fastcd.cache.identity import check_identity, identity
from fastcd.cache.store import CacheReader
from fastcd.config import Config
from fastcd.data.base import BatchLoader
from fastcd.errors import FastcdError

STORED = {"tea_means": "stage means", "tea_logits": "logits", "tea_embed": "pooled embedding"}


def open_cache(cfg: Config, loader: BatchLoader, inputs: Iterable[str]) -> CacheReader:
    """The cache `cfg.teacher.cache`, checked against the run: its train `loader` replays fastcd's crops,
    the teacher, data, crops and seed match, it holds the run's epochs (or `cache_reuse: cycle`) and every
    teacher target the losses read (`inputs`); otherwise a one-line error naming the mismatch."""
    path = cfg.teacher.cache
    if not loader.replays_crops:
        loader.fingerprint()  # raises: this backend's crops cannot be replayed
    reader = CacheReader(path)
    check_identity(reader.manifest["identity"], identity(cfg, loader, reader.epochs), path)
    if cfg.train.epochs > reader.epochs and cfg.teacher.cache_reuse == "exact":
        raise FastcdError(f"teacher cache {path!r} holds {reader.epochs} epochs of crops, this run trains "
                          f"{cfg.train.epochs}: write more with `fastcd cache-teacher --epochs {cfg.train.epochs}`, "
                          "or replay them with teacher.cache_reuse=cycle")
    have = {"tea_means": True, "tea_logits": reader.contents.logits != "none",
            "tea_embed": reader.contents.embed_dim > 0}
    for name in inputs:
        if name in STORED and not have[name]:
            raise FastcdError(f"teacher cache {path!r} holds no {STORED[name]}, which a loss of this run reads; "
                              f"write it with `fastcd cache-teacher` and its --logits/--embed options")
    return reader


def cache_epoch(cfg: Config, reader: CacheReader, epoch: int) -> int:
    """The cache epoch (0-based) that training epoch `epoch` (0-based) replays: itself, or it modulo the
    cache's epochs under `cache_reuse: cycle`."""
    return epoch % reader.epochs if cfg.teacher.cache_reuse == "cycle" else epoch
