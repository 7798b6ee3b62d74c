"""Core data pieces: batched crops, sharding, resolution schedule, idx files, in-memory and ImageFolder loaders."""
import gzip
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from fastcd.config import DataConfig
from fastcd.data import LoaderContext, build_loader
from fastcd.data.crops import DRAWS, CropPlan, crop_boxes, uniforms
from fastcd.data.fashion_mnist import FASHION_MNIST_DIR, read_idx
from fastcd.data.resolution import train_res
from fastcd.data.sharding import epoch_indices
from fastcd.data.transforms import normalize, resized_crop_affine
from fastcd.errors import FastcdError


def test_crop_boxes_follow_random_resized_crop_bounds():
    h, w = 37, 53
    u = uniforms(int(torch.randint(0, 2**31, ())), 0, range(4000), DRAWS)
    boxes = crop_boxes(torch.full((4000,), h), torch.full((4000,), w), u, (0.08, 1.0), (3 / 4, 4 / 3))
    x0, y0, bw, bh = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + bw <= w).all() and (y0 + bh <= h).all()
    area = bw * bh / (h * w)
    assert area.min() >= 0.08 * 0.8 and area.max() <= 1.0
    ratio = bw / bh
    assert ratio.min() > 3 / 4 * 0.85 and ratio.max() < 4 / 3 * 1.15  # rounding to whole pixels
    assert 0.3 < area.mean() < 0.7  # uniform scale draws, some rejected


def test_crops_are_a_function_of_seed_epoch_and_sample_alone():
    """The same sample gets the same box and flip in any batch, of any size, on any row; images of other
    sizes in the batch change nothing; another epoch or seed gives another draw."""
    plan = CropPlan(True, 32, 0.08, 0.875, seed=7, epoch=2)
    sizes = torch.tensor([37, 120, 64, 9]), torch.tensor([53, 80, 64, 300])
    batch = plan.boxes([5, 900, 12, 3], *sizes)
    for row, i in enumerate([5, 900, 12, 3]):
        assert torch.equal(plan.boxes([i], sizes[0][row:row + 1], sizes[1][row:row + 1])[0], batch[row])
    assert torch.equal(plan.boxes([12], sizes[0][2:3], sizes[1][2:3]), batch[2:3])
    other = [CropPlan(True, 32, 0.08, 0.875, seed=7, epoch=3), CropPlan(True, 32, 0.08, 0.875, seed=8, epoch=2)]
    assert all(not torch.equal(p.boxes([5, 900, 12, 3], *sizes), batch) for p in other)
    flips = CropPlan(True, 32, 1.0, 0.875, seed=1, epoch=0).boxes(range(2000), torch.full((2000,), 9),
                                                                   torch.full((2000,), 9))[:, 4]
    assert 900 < flips.sum() < 1100  # fair


def test_a_whole_image_box_equals_a_plain_resize_and_flips_where_asked():
    x = torch.rand(3, 2, 20, 20) * 255
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0, 0.0], [0.0, 0.0, 20.0, 20.0, 1.0], [0.0, 0.0, 20.0, 20.0, 0.0]])
    out = resized_crop_affine(x, boxes, 20)
    torch.testing.assert_close(out[[0, 2]], x[[0, 2]], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out[1], x[1].flip(2), rtol=1e-4, atol=1e-3)


def test_center_boxes_are_the_box_of_resize_then_centre_crop_in_whole_pixels():
    """Short side 300 resized to 256, centre 224 crop: a square of round(224 * 300 / 256) = 262 source pixels,
    centred with floored offsets; the same for every image of the batch, whatever the other sizes."""
    heights, widths = torch.tensor([300, 500, 256, 7]), torch.tensor([400, 281, 256, 9])
    boxes = CropPlan(False, 224, 0.08, 0.875, seed=0, epoch=0).boxes(range(4), heights, widths)
    assert boxes[0].tolist() == [69, 19, 262, 262, 0]  # (400 - 262) / 2, (300 - 262) / 2
    assert boxes[1].tolist() == [(281 - 246) // 2, (500 - 246) // 2, 246, 246, 0]
    assert boxes[2].tolist() == [16, 16, 224, 224, 0]
    assert boxes[3].tolist() == [1, 0, 6, 6, 0]
    assert torch.equal(boxes, boxes.round())
    rows = CropPlan(False, 224, 0.08, 0.875, seed=0, epoch=0).rows(range(4), heights, widths)
    assert rows.dtype == torch.float32 and torch.equal(rows[:, 5:], torch.stack([heights, widths], 1).float())


def test_normalize():
    out = normalize(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8), [0.5] * 3, [0.25] * 3, torch.bfloat16, True)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.all(out == 2)


@pytest.mark.parametrize("n,world", [(103, 1), (103, 2), (100, 3)])
def test_sharding_is_disjoint_and_covers(n, world):
    val = [epoch_indices(n, epoch=0, seed=1, rank=r, world_size=world, train=False) for r in range(world)]
    assert sorted(torch.cat(val).tolist()) == list(range(n))
    train = [epoch_indices(n, epoch=3, seed=1, rank=r, world_size=world, train=True) for r in range(world)]
    flat = torch.cat(train).tolist()
    assert len(set(flat)) == len(flat) == (n // world) * world and len({len(t) for t in train}) == 1
    again = epoch_indices(n, epoch=4, seed=1, rank=0, world_size=world, train=True)
    assert not torch.equal(again, train[0])


def test_resolution_ramp():
    cfg = DataConfig(res=224, min_res=160, max_res=192, start_ramp=10, end_ramp=13)
    assert [train_res(cfg, e) for e in (0, 10, 11, 12, 13, 20)] == [160, 160, 160, 192, 192, 192]
    assert all(train_res(cfg, e) % 32 == 0 for e in range(30))
    assert train_res(DataConfig(res=176), 5) == 176


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_and_in_memory_loader(tmp_path):
    rng = np.random.default_rng()
    for split, n in (("train", 70), ("t10k", 30)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    assert read_idx(tmp_path / "train-images-idx3-ubyte.gz").shape == (70, 28, 28)
    cfg = DataConfig(backend="fashion-mnist", path=str(tmp_path), batch_size=16, res=32, val_res=32,
                     val_resize_ratio=1.0, mean=[0.5] * 3, std=[0.5] * 3)
    ctx = LoaderContext(torch.device("cpu"), num_classes=10)
    train, val = build_loader(cfg, "train", ctx), build_loader(cfg, "val", ctx)
    batches = list(train)
    assert len(batches) == len(train) == 4  # drop_last
    x, y = batches[0]
    assert x.shape == (16, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.int64
    assert x.min() >= -1.001 and x.max() <= 1.001
    labels = torch.cat([b[1] for b in val])
    expected = read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    assert labels.tolist() == expected.tolist()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 8))
    with pytest.raises(FastcdError, match="truncated"):
        build_loader(cfg, "val", ctx)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_files():
    images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte")
    labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte")
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10


def test_imagefolder_loader_and_errors(tmp_path):
    rng = np.random.default_rng()
    for split in ("train", "val"):
        for c in ("cat", "dog", "eel"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(5):
                pixels = rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.jpg")
    cfg = DataConfig(path=str(tmp_path), batch_size=4, workers=0, res=24, val_res=24)
    ctx = LoaderContext(torch.device("cpu"), num_classes=3)
    x, y = next(iter(build_loader(cfg, "train", ctx)))
    assert x.shape == (4, 3, 24, 24) and x.is_contiguous(memory_format=torch.channels_last)
    val = build_loader(cfg, "val", ctx)
    assert sorted(torch.cat([b[1] for b in val]).tolist()) == sorted([0, 1, 2] * 5)
    with pytest.raises(FastcdError, match="has 3 classes but the model has num_classes=10"):
        build_loader(cfg, "val", LoaderContext(torch.device("cpu"), num_classes=10))
    (tmp_path / "train" / "fox").mkdir()
    with pytest.raises(FastcdError, match="fox' is empty"):
        build_loader(cfg, "train", ctx)
    with pytest.raises(FastcdError, match="does not exist"):
        build_loader(DataConfig(path=str(tmp_path / "missing")), "train", ctx)
    assert math.isfinite(float(x.float().mean()))


@pytest.mark.parametrize("workers", [0, 1])
def test_imagefolder_skips_files_that_cannot_be_images_and_names_one_that_does_not_decode(tmp_path, workers,
                                                                                           capsys):
    """A zero-byte file and a symlink loop cost themselves only (listed in one line); a file that fails to decode,
    in a worker or not, is a one-line error naming it, never a worker's traceback."""
    for c in ("cat", "dog"):
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((30, 40, 3), 40 * i, np.uint8)).save(tmp_path / "val" / c / f"{i}.jpg")
    (tmp_path / "val" / "cat" / "empty.jpg").write_bytes(b"")
    (tmp_path / "val" / "dog" / "loop.jpg").symlink_to(tmp_path / "val" / "dog" / "loop.jpg")
    cfg = DataConfig(path=str(tmp_path), batch_size=4, workers=workers, res=24, val_res=24)
    ctx = LoaderContext(torch.device("cpu"), num_classes=2)
    labels = torch.cat([y for _, y in build_loader(cfg, "val", ctx)])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipped 2 file(s)" in err
    assert "cat/empty.jpg (empty file)" in err and "dog/loop.jpg (cannot be read (Too many levels" in err
    (tmp_path / "val" / "cat" / "garbage.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(FastcdError) as caught:
        list(build_loader(cfg, "val", ctx))
    assert str(caught.value).startswith(f"{tmp_path / 'val' / 'cat' / 'garbage.jpg'} cannot be decoded")
    assert "\n" not in str(caught.value)


def test_single_sample_and_undersized_batches(tmp_path):
    """A last val batch of one sample and a split smaller than a batch (synthetic/in-memory and imagefolder):
    labels stay 1-D, `len` matches what is yielded; a train split smaller than a batch, and a rank whose val
    share is empty, yield nothing."""
    for c in ("cat", "dog"):
        for split in ("train", "val"):
            (tmp_path / split / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((30, 40, 3), 60 * i, np.uint8)).save(tmp_path / "val" / c / f"{i}.jpg")
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "train" / c / "0.jpg")
    ctx = LoaderContext(torch.device("cpu"), num_classes=2)
    cases = [(DataConfig(backend="synthetic", batch_size=4, res=16, val_res=16, val_subset=9), [4, 4, 1]),
             (DataConfig(backend="synthetic", batch_size=4, res=16, val_res=16, val_subset=1), [1]),
             (DataConfig(path=str(tmp_path), batch_size=4, val_batch_size=7, workers=0, res=16, val_res=16), [7, 1])]
    for cfg, sizes in cases:
        loader = build_loader(cfg, "val", ctx)
        batches = list(loader)
        assert [y.shape for _, y in batches] == [(n,) for n in sizes] and len(loader) == len(sizes), cfg.backend
        assert [x.shape for x, _ in batches] == [(n, 3, 16, 16) for n in sizes]
        train = build_loader(replace(cfg, train_subset=3 if cfg.backend == "synthetic" else 0), "train", ctx)
        assert len(train) == 0 and list(train) == []
        empty_share = build_loader(replace(cfg, val_subset=1), "val", replace(ctx, rank=1, world_size=2))
        assert len(empty_share) == 0 and list(empty_share) == []


def test_every_backend_the_config_offers_has_a_loader():
    import importlib
    import typing

    from fastcd.data.base import BACKENDS

    offered = typing.get_args(typing.get_type_hints(DataConfig)["backend"])
    assert sorted(offered) == sorted(BACKENDS)
    for name, target in BACKENDS.items():
        module, _, factory = target.partition(":")
        if name not in ("ffcv", "dali"):  # their libraries may be absent; build_loader says so in one line
            assert callable(getattr(importlib.import_module(module), factory))
