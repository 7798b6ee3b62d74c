"""The torch backend's device decode (`data.decode: device`): one batched decode_jpeg and one crop launch
per batch, in a prefetch thread; on a CPU the same code runs with CPU tensors. It must execute the same
crops as the worker path, keep the epoch order, stop cleanly and pass errors on."""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import fastcd.data.shards_torch as shards_torch
from fastcd.config import DataConfig
from fastcd.data import LoaderContext, build_loader
from fastcd.data_prep.prepare import prepare
from tests.test_loaders import smooth_image

CLASSES = 3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards only (as on a machine without FFCV), of non-square smooth images of many sizes."""
    root = tmp_path_factory.mktemp("device-decode")
    rng = np.random.default_rng()
    odd = [(500, 281), (389, 257)]  # sizes whose val crops two rounding rules once placed a pixel apart
    for split, per_class in (("train", 8), ("val", 5)):
        for c in range(CLASSES):
            folder = root / "src" / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                w, h = odd.pop() if split == "val" and odd else (int(v) for v in rng.integers(40, 120, 2))
                smooth_image(rng, w, h).save(folder / f"{i}.jpg", quality=95)
    prepare(root / "src", root / "out", formats=["dali"], workers=1, shard_samples=7, progress=False)
    return root / "out"


def batches(path: Path, split: str, decode: str, epoch: int = 1, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = DataConfig(backend="torch", path=str(path), batch_size=8, val_batch_size=4, workers=1, res=32, val_res=32,
                     decode=decode, **kw)
    loader = build_loader(cfg, split, LoaderContext(torch.device("cpu"), num_classes=CLASSES, seed=5))
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("split", ["train", "val"])
def test_device_decode_executes_the_workers_crops(prepared: Path, split: str) -> None:
    workers, device = batches(prepared, split, "workers"), batches(prepared, split, "device")
    assert len(workers) == len(device) > 1
    for (a, ya), (b, yb) in zip(workers, device, strict=True):
        assert torch.equal(ya, yb)  # the same samples in the same order
        assert b.shape == a.shape and b.is_contiguous(memory_format=torch.channels_last)
        levels = (a - b).abs() * 255 * min(DataConfig().std)  # normalised units -> about grey levels
        # the same box and flip, image by image; only the resize filter differs (area average vs antialiased
        # bilinear). A box a pixel off, or a flip missed, breaks these bounds on some image.
        per_image_mean, per_image_max = levels.mean((1, 2, 3)), levels.amax((1, 2, 3))
        assert per_image_mean.max() < 1.5 and per_image_max.max() < 12, (per_image_mean, per_image_max)


def test_device_decode_follows_the_epoch_and_dtype(prepared: Path) -> None:
    one, two = batches(prepared, "train", "device", 1), batches(prepared, "train", "device", 2)
    assert not torch.equal(torch.cat([y for _, y in one]), torch.cat([y for _, y in two]))
    cfg = DataConfig(backend="torch", path=str(prepared), batch_size=8, workers=0, res=24, decode="device")
    loader = build_loader(cfg, "train", LoaderContext(torch.device("cpu"), torch.bfloat16, num_classes=CLASSES))
    x, _ = next(iter(loader))
    assert x.dtype == torch.bfloat16 and x.shape[-2:] == (24, 24)


def _decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fastcd-decode"]


def test_stopping_early_stops_the_prefetch_thread(prepared: Path) -> None:
    cfg = DataConfig(backend="torch", path=str(prepared), batch_size=4, workers=0, res=16, decode="device")
    loader = build_loader(cfg, "train", LoaderContext(torch.device("cpu"), num_classes=CLASSES))
    it = iter(loader)
    next(it)
    it.close()
    assert not _decode_threads()


def test_a_decode_error_reaches_the_training_loop(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch's decode that fails though each of its JPEGs decodes alone (not a damaged sample) reaches the
    loop as it is."""
    decode = shards_torch.decode_jpeg

    def broken(data, *args, **kwargs):
        if isinstance(data, list):
            raise RuntimeError("nvjpeg says no")
        return decode(data, *args, **kwargs)

    monkeypatch.setattr(shards_torch, "decode_jpeg", broken)
    with pytest.raises(RuntimeError, match="nvjpeg says no"):
        batches(prepared, "train", "device")
    assert not _decode_threads()


def test_two_backends_execute_the_same_crops(tmp_path: Path) -> None:
    """The in-memory backend (grid_sample over tensors), the torch backend (decode + resized_crop in its
    workers) and DALI (crop windows fed to its ROI decoder), given the same images, seed and epoch, produce the
    same training crops: the same samples in the same order, equal up to the decoders' and resize filters'
    differences (what a teacher cache relies on)."""
    from torchvision.io import decode_jpeg

    from fastcd.data.in_memory import InMemoryLoader
    from fastcd.data.prepared import ShardSamples, open_prepared

    rng = np.random.default_rng()
    for c in range(CLASSES):
        (tmp_path / "src" / "train" / f"c{c}").mkdir(parents=True)
        for i in range(6):
            smooth_image(rng, 40, 40).save(tmp_path / "src" / "train" / f"c{c}" / f"{i}.jpg", quality=95)
    prepare(tmp_path / "src", tmp_path / "out", formats=["dali"], workers=1, shard_samples=5, progress=False)
    cfg = DataConfig(backend="torch", path=str(tmp_path / "out"), batch_size=6, workers=1, res=32, scale_min=0.3,
                     decode="workers")
    ctx = LoaderContext(torch.device("cpu"), num_classes=CLASSES, seed=11)
    shards = ShardSamples(open_prepared(cfg.path, "train", ctx, "dali"))
    images = torch.stack([decode_jpeg(torch.from_numpy(shards.jpeg(i).copy())) for i in range(len(shards))])
    labels = torch.from_numpy(shards.labels)
    backends = [build_loader(cfg, "train", ctx), InMemoryLoader(images, labels, cfg, "train", ctx),
                build_loader(dataclasses.replace(cfg, backend="dali"), "train", ctx)]
    for loader in backends:
        loader.set_epoch(3)
    torch_batches, *others = (list(loader) for loader in backends)
    for loader, batches in zip(backends[1:], others, strict=True):
        assert all(torch.equal(i, j) for i, j in zip(backends[0].batch_indices(), loader.batch_indices()))
        for (xa, ya), (xb, yb) in zip(torch_batches, batches, strict=True):
            assert torch.equal(ya, yb)
            levels = (xa - xb).abs() * 255 * min(DataConfig().std)
            assert levels.mean() < 1.5, (type(loader).__name__, levels.mean())
