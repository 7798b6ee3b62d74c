"""The replaying backends execute the same crops: on the same prepared images, ffcv, dali and torch (both
decode paths) give each train crop (shrinking and enlarging boxes, flips) and each val crop within 2 grey levels
mean and 12 max per image, on images of 48-119 px and on 5-12 px ones enlarged to 32 px (where every executor
must clamp to the box's edge pixels, not read the pixels around it; ffcv's decoder alone needs 3 mean there).
JPEG decoders and the two resampling definitions differ by a few levels; a box shifted by one pixel or a flip
left out must fail the same check (shown by breaking ffcv's crop table)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from fastcd.config import DataConfig
from fastcd.data import LoaderContext, build_loader
from fastcd.data.ffcv_crops import CropTable, resample_box
from fastcd.data_prep.prepare import prepare

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MEAN_BOUND, MAX_BOUND = 2.0, 12.0  # grey levels, per image
SMALL_FFCV_MEAN_BOUND = 3.0  # ffcv on 5-12 px images: its decoder differs more on JPEGs of a few blocks
EXECUTORS = {"ffcv": {}, "dali": {}, "torch-workers": {"decode": "workers"}, "torch-device": {"decode": "device"}}


def textured(root: Path, sides: tuple[int, int], cells: int) -> Path:
    """Textured images of `sides` px a side (`cells` x `cells` structure, so a one-pixel shift shows), prepared."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 12), ("val", 4)):
        for cls in ("a", "b"):
            (root / "src" / split / cls).mkdir(parents=True)
            for i in range(per_class):
                w, h = (int(v) for v in rng.integers(*sides, 2))
                pixels = rng.uniform(-60, 60, (cells, cells, 3)) + rng.uniform(70, 180, 3)
                img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
                img.save(root / "src" / split / cls / f"{i}.jpg", quality=95)
    prepare(root / "src", root / "out", workers=1, shard_samples=10, progress=False)
    return root / "out"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images of 48-119 px a side: crops that shrink and crops that enlarge."""
    return textured(tmp_path_factory.mktemp("agreement"), (48, 120), 8)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images of 5-12 px a side: every crop enlarged, most of its pixels near the box's edge."""
    return textured(tmp_path_factory.mktemp("small"), (5, 13), 4)


def crops(out: Path, executor: str, split: str, res: int = 56) -> torch.Tensor:
    """Every crop of epoch 0 of `split` through `executor` at `res`, in 0-255 grey levels."""
    backend = executor.split("-")[0]
    cfg = DataConfig(backend=backend, path=str(out), batch_size=16, val_batch_size=16, workers=1, res=res,
                     val_res=res, scale_min=0.25, **EXECUTORS[executor])
    loader = build_loader(cfg, split, LoaderContext(torch.device("cpu"), num_classes=2, seed=1, keep_last=True))
    loader.set_epoch(0)
    x = torch.cat([images for images, _ in loader]).float()
    return x * torch.tensor(STD).view(1, 3, 1, 1) * 255 + torch.tensor(MEAN).view(1, 3, 1, 1) * 255


def agreeing(a: torch.Tensor, b: torch.Tensor, mean_bound: float = MEAN_BOUND) -> torch.Tensor:
    """Per image: whether two batches of crops agree within the bounds."""
    diff = (a - b).abs()
    return (diff.mean((1, 2, 3)) <= mean_bound) & (diff.amax((1, 2, 3)) <= MAX_BOUND)


@pytest.mark.parametrize("split", ["train", "val"])
def test_backends_agree_crop_for_crop(prepared: Path, split: str) -> None:
    got = {name: crops(prepared, name, split) for name in EXECUTORS}
    ref = got.pop("torch-workers")
    for name, images in got.items():
        ok = agreeing(images, ref)
        assert ok.all(), (name, split, (images - ref).abs().mean((1, 2, 3)).max(), (images - ref).abs().max())


@pytest.mark.parametrize("split", ["train", "val"])
def test_backends_agree_on_enlarged_crops_of_small_images(small: Path, split: str) -> None:
    """5-12 px images resized to 32 px: each executor reads only the box (bilinear between pixel centres,
    clamped to the box's edge pixels), as torchvision's crop-then-resize does. ffcv's turbojpeg decode alone
    differs from libjpeg-turbo's by up to 2.6 levels mean on JPEGs this small, hence its own mean bound."""
    got = {name: crops(small, name, split, res=32) for name in EXECUTORS}
    ref = got.pop("torch-workers")
    for name, images in got.items():
        ok = agreeing(images, ref, SMALL_FFCV_MEAN_BOUND if name == "ffcv" else MEAN_BOUND)
        assert ok.all(), (name, split, (images - ref).abs().mean((1, 2, 3)).max(), (images - ref).abs().max())


def test_ffcv_resamples_an_enlarged_box_as_torchvision_does() -> None:
    """On the same pixels (no decoder between them), `resample_box` gives torchvision's crop-then-resize of
    boxes of 5-12 px images enlarged to 32 px within rounding to uint8."""
    rng = np.random.default_rng(2)
    for _ in range(8):
        h, w = (int(v) for v in rng.integers(5, 13, 2))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        bh, bw = int(rng.integers(2, h + 1)), int(rng.integers(2, w + 1))
        y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        want = TF.resized_crop(torch.from_numpy(image).permute(2, 0, 1).double(), y0, x0, bh, bw, [32, 32],
                               antialias=True)
        out = np.zeros((32, 32, 3), dtype=np.uint8)
        resample_box(image, y0, x0, bh, bw, out, False)
        got = torch.from_numpy(out).permute(2, 0, 1).double()
        assert (got - want).abs().max() <= 0.5 + 1e-3, (h, w, y0, x0, bh, bw)


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
