"""The replaying backends execute the same crops: on the same prepared images, ffcv, dali and torch (both
decode paths) give each train crop (shrinking and enlarging boxes, flips) and each val crop within 2 grey levels
mean and 12 max per image. JPEG decoders and the two resampling definitions differ by a few levels; a box
shifted by one pixel or a flip left out must fail the same check (shown by breaking ffcv's crop table)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastcd.config import DataConfig
from fastcd.data import LoaderContext, build_loader
from fastcd.data.ffcv_crops import CropTable
from fastcd.data_prep.prepare import prepare

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MEAN_BOUND, MAX_BOUND = 2.0, 12.0  # grey levels, per image
EXECUTORS = {"ffcv": {}, "dali": {}, "torch-workers": {"decode": "workers"}, "torch-device": {"decode": "device"}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Textured images of 48-119 px a side (structure at ~10 px, so a one-pixel shift shows), prepared."""
    root = tmp_path_factory.mktemp("agreement")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 12), ("val", 4)):
        for cls in ("a", "b"):
            (root / "src" / split / cls).mkdir(parents=True)
            for i in range(per_class):
                w, h = (int(v) for v in rng.integers(48, 120, 2))
                cells = rng.uniform(-60, 60, (8, 8, 3)) + rng.uniform(70, 180, 3)
                img = Image.fromarray(cells.clip(0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
                img.save(root / "src" / split / cls / f"{i}.jpg", quality=95)
    prepare(root / "src", root / "out", workers=1, shard_samples=10, progress=False)
    return root / "out"


def crops(out: Path, executor: str, split: str) -> torch.Tensor:
    """Every crop of epoch 0 of `split` through `executor`, in 0-255 grey levels."""
    backend = executor.split("-")[0]
    cfg = DataConfig(backend=backend, path=str(out), batch_size=16, val_batch_size=16, workers=1, res=56,
                     val_res=56, scale_min=0.25, **EXECUTORS[executor])
    loader = build_loader(cfg, split, LoaderContext(torch.device("cpu"), num_classes=2, seed=1, keep_last=True))
    loader.set_epoch(0)
    x = torch.cat([images for images, _ in loader]).float()
    return x * torch.tensor(STD).view(1, 3, 1, 1) * 255 + torch.tensor(MEAN).view(1, 3, 1, 1) * 255


def agreeing(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image: whether two batches of crops agree within the bounds."""
    diff = (a - b).abs()
    return (diff.mean((1, 2, 3)) <= MEAN_BOUND) & (diff.amax((1, 2, 3)) <= MAX_BOUND)


@pytest.mark.parametrize("split", ["train", "val"])
def test_backends_agree_crop_for_crop(prepared: Path, split: str) -> None:
    got = {name: crops(prepared, name, split) for name in EXECUTORS}
    ref = got.pop("torch-workers")
    for name, images in got.items():
        ok = agreeing(images, ref)
        assert ok.all(), (name, split, (images - ref).abs().mean((1, 2, 3)).max(), (images - ref).abs().max())


def test_a_shifted_box_or_a_missing_flip_fails(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ffcv with each box moved by one pixel (inside the image), or with every flip inverted, disagrees with
    torch on every image the change applies to."""
    ref = crops(prepared, "torch-workers", "train")
    loader = build_loader(DataConfig(backend="ffcv", path=str(prepared)), "train",
                          LoaderContext(torch.device("cpu"), num_classes=2))
    heights, widths = loader.heights.numpy(), loader.widths.numpy()
    write = CropTable.write
    changed: dict[str, np.ndarray] = {}

    def shifted(table: CropTable, indices: np.ndarray, boxes: np.ndarray) -> None:
        b = boxes.copy()
        x_room, y_room = b[:, 0] + b[:, 2] < widths[indices], b[:, 1] + b[:, 3] < heights[indices]
        axis = np.where((b[:, 0] > 0) | x_room, 0, 1)  # move x0, else y0 where x can't move
        rows = np.arange(len(b))
        start, room = b[rows, axis], np.where(axis == 0, x_room, y_room)
        b[rows, axis] = np.where(start > 0, start - 1, np.where(room, start + 1, start))
        changed["shift"] = np.concatenate([changed.get("shift", []), b[rows, axis] != start]).astype(bool)
        write(table, indices, b)

    def unflipped(table: CropTable, indices: np.ndarray, boxes: np.ndarray) -> None:
        changed["flip"] = np.ones(len(ref), dtype=bool)
        write(table, indices, np.concatenate([boxes[:, :4], 1 - boxes[:, 4:5]], axis=1))

    for name, broken in (("shift", shifted), ("flip", unflipped)):
        monkeypatch.setattr(CropTable, "write", broken)
        ok = agreeing(crops(prepared, "ffcv", "train"), ref)
        assert changed[name].sum() > len(ref) // 2, name
        assert not ok[changed[name]].any(), (name, ok[changed[name]].sum())
