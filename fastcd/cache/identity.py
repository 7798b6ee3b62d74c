"""What a cache's targets depend on, recorded in its manifest and checked against the run that reads it: the
teacher as it runs, and what makes its input pixels. Neither the backend's name nor its JPEG decoder is part of
it, only the crop definition and the named resampling (`data.base.RESAMPLING`) the loader executes, so every
backend that executes the same crops with the same resampling reads the same caches."""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from fastcd.config import Config
from fastcd.data.base import BatchLoader
from fastcd.data.crops import RATIO, CropPlan
from fastcd.data.resolution import train_res
from fastcd.errors import FastcdError
from fastcd.models.teacher import weights_sha256

PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
PROBE_SIZES = ((37, 53), (224, 224), (500, 281), (20, 2000))  # image sizes the crop definition is probed on


def crop_definition() -> str:
    """A digest of the training crops `crops.CropPlan` draws for a fixed probe (samples, sizes, a seed and two
    epochs): it changes when the definition of the crops does, which a cache's crops must share."""
    digest = hashlib.sha256()
    heights, widths = (torch.tensor(side).repeat(16) for side in zip(*PROBE_SIZES, strict=True))
    for epoch in (0, 1):
        plan = CropPlan(True, 0, 0.08, 1.0, seed=1, epoch=epoch)
        digest.update(plan.boxes(range(len(heights)), heights, widths).numpy().tobytes())
    return digest.hexdigest()


def identity(cfg: Config, loader: BatchLoader, epochs: int, weights_digest: str | None = None) -> dict[str, Any]:
    """What `cfg`'s teacher targets over `epochs` epochs read through its train `loader` depend on: the teacher
    (architecture, the sha256 of the weights it runs, BatchNorm handling, precision) and its input pixels
    (the data's digest and subset, the loader's named resampling, the crop definition and parameters,
    normalisation, each epoch's resolution, the seed)."""
    t, d = cfg.teacher, cfg.data
    return {
        "teacher": {"arch": t.arch, "stem": t.stem, "width": t.width, "num_classes": t.num_classes,
                    "weights_sha256": weights_digest or weights_sha256(t), "bn_mode": t.bn_mode,
                    "fold_bn": t.fold_bn, "precision": PRECISION[loader.ctx.dtype]},
        "data": {"fingerprint": loader.fingerprint(), "train_subset": d.train_subset,
                 "resampling": loader.resampling},
        "crops": {"definition": crop_definition(), "scale_min": d.scale_min, "ratio": list(RATIO),
                  "mean": list(d.mean), "std": list(d.std), "resolutions": [train_res(d, e) for e in range(epochs)]},
        "seed": cfg.train.seed,
    }


def _differences(cached: Any, run: Any, where: str) -> list[str]:
    if isinstance(cached, dict) and isinstance(run, dict):
        return [d for key in sorted(set(cached) | set(run))
                for d in _differences(cached.get(key), run.get(key), f"{where}.{key}" if where else key)]
    return [] if cached == run else [f"{where}: the cache has {cached!r}, this run {run!r}"]


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between two identities, each epoch's resolution compared as far as both go."""
    def resolutions(x: dict[str, Any]) -> list[int]:
        crops = x.get("crops")
        return crops.get("resolutions", []) if isinstance(crops, dict) else []

    n = min(len(resolutions(a)), len(resolutions(b)))
    a, b = ({**x, "crops": {**x["crops"], "resolutions": resolutions(x)[:n]}} if resolutions(x) else x
            for x in (a, b))
    return _differences(a, b, "")


def check_identity(cached: dict[str, Any], run: dict[str, Any], path: str) -> None:
    """A one-line error naming what differs between a cache's identity and a run's."""
    wrong = differences(cached, run)
    if wrong:
        raise FastcdError(f"teacher cache {path!r} does not match this run: {'; '.join(wrong)}; write a cache "
                          "for this config with `fastcd cache-teacher`")
