"""What a cache's targets depend on, recorded in its manifest and checked against the run that reads it."""
from __future__ import annotations

from typing import Any

from fastcd.config import Config
from fastcd.data.base import BatchLoader
from fastcd.data.crops import RATIO
from fastcd.data.resolution import train_res
from fastcd.errors import FastcdError
from fastcd.models.teacher import weights_sha256


def identity(cfg: Config, loader: BatchLoader, epochs: int, weights_digest: str | None = None) -> dict[str, Any]:
    """The teacher (architecture, weights and their sha256, BatchNorm handling), the data (backend, digest,
    subset), the crops (scale, ratio, normalisation, each epoch's resolution) and the seed of `cfg`'s run,
    over `epochs` epochs read through its train `loader`."""
    t, d = cfg.teacher, cfg.data
    return {
        "teacher": {"arch": t.arch, "stem": t.stem, "width": t.width, "num_classes": t.num_classes,
                    "weights": t.weights, "weights_sha256": weights_digest or weights_sha256(t),
                    "bn_mode": t.bn_mode, "fold_bn": t.fold_bn},
        "data": {"backend": d.backend, "fingerprint": loader.fingerprint(), "train_subset": d.train_subset},
        "crops": {"scale_min": d.scale_min, "ratio": list(RATIO), "mean": list(d.mean), "std": list(d.std),
                  "resolutions": [train_res(d, e) for e in range(epochs)]},
        "seed": cfg.train.seed,
    }


def _differences(cached: Any, run: Any, where: str) -> list[str]:
    if isinstance(cached, dict) and isinstance(run, dict):
        return [d for key in sorted(set(cached) | set(run))
                for d in _differences(cached.get(key), run.get(key), f"{where}.{key}" if where else key)]
    return [] if cached == run else [f"{where}: the cache has {cached!r}, this run {run!r}"]


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between two identities, each epoch's resolution compared as far as both go."""
    n = min(len(a["crops"]["resolutions"]), len(b["crops"]["resolutions"]))
    a, b = ({**x, "crops": {**x["crops"], "resolutions": x["crops"]["resolutions"][:n]}} for x in (a, b))
    return _differences(a, b, "")


def check_identity(cached: dict[str, Any], run: dict[str, Any], path: str) -> None:
    """A one-line error naming what differs between a cache's identity and a run's."""
    wrong = differences(cached, run)
    if wrong:
        raise FastcdError(f"teacher cache {path!r} does not match this run: {'; '.join(wrong)}; write a cache "
                          "for this config with `fastcd cache-teacher`")
