"""The prepared-data loaders (torch, ffcv, dali) over data written by the real `prepare()`: batches,
epochs, val agreement across backends (and with imagefolder), DDP shares, resolution schedule, bad
input, and a short training run with each backend."""
from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastcd.config import DataConfig
from fastcd.data import LoaderContext, build_loader
from fastcd.data_prep.prepare import prepare
from fastcd.errors import FastcdError

BACKENDS = ["torch", "ffcv", "dali"]
CLASSES = ["ant", "bee", "cat"]
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 5
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def smooth_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A random base colour plus a smooth random pattern (resamples alike in every decoder)."""
    cells = rng.uniform(-40, 40, (3, 3, 3)) + rng.uniform(60, 190, 3)
    img = Image.fromarray(cells.clip(0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    return img


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """SRC: square train images (a full-image crop at scale 1, so samples are recognisable by their
    mean colour), non-square val images; OUT: prepared with both formats, several shards per split."""
    root = tmp_path_factory.mktemp("loaders")
    rng = np.random.default_rng()
    src, out = root / "src", root / "out"
    means = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        means[split] = []
        for cls in CLASSES:
            (src / split / cls).mkdir(parents=True)
            for i in range(per_class):
                side = int(rng.integers(48, 96))
                w, h = (side, side) if split == "train" else tuple(int(v) for v in rng.integers(40, 100, 2))
                img = smooth_image(rng, w, h)
                img.save(src / split / cls / f"{i:03d}.jpg", quality=95)
                means[split].append(np.asarray(img, np.float64).mean((0, 1)))
    manifest = prepare(src, out, workers=1, shard_samples=7, progress=False)
    labels = {s: [c for c in range(len(CLASSES)) for _ in range(n)]
              for s, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS))}
    return {"src": src, "out": out, "manifest": manifest, "labels": labels,
            "train_means": (np.stack(means["train"]) / 255 - MEAN) / STD}


def config(data: dict, backend: str, **kw) -> DataConfig:
    base = {"backend": backend, "path": str(data["out"]), "batch_size": 8, "val_batch_size": 4, "workers": 1,
            "res": 32, "val_res": 32}
    return DataConfig(**{**base, **kw})


def context(**kw) -> LoaderContext:
    return LoaderContext(**{"device": torch.device("cpu"), "num_classes": len(CLASSES), **kw})


def epoch(loader, e: int) -> tuple[list[torch.Tensor], list[int]]:
    loader.set_epoch(e)
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels += y.tolist()
    return images, labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_batches_and_epochs(data: dict, backend: str) -> None:
    loader = build_loader(config(data, backend), "train", context())
    n = data["manifest"]["splits"]["train"]["num_samples"]
    assert loader.num_classes == len(CLASSES) and loader.num_samples == n and len(loader) == n // 8
    lo = (0 - np.array(MEAN)) / np.array(STD)
    hi = (1 - np.array(MEAN)) / np.array(STD)
    orders = []
    for e in range(2):
        images, labels = epoch(loader, e)
        assert Counter(labels) == Counter(data["labels"]["train"])
        orders.append(labels)
        for x in images:
            assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
            assert x.is_contiguous(memory_format=torch.channels_last)
            per_channel = x.transpose(0, 1).reshape(3, -1)
            assert (per_channel.min(1).values >= torch.tensor(lo) - 1e-3).all()
            assert (per_channel.max(1).values <= torch.tensor(hi) + 1e-3).all()
    assert orders[0] != orders[1]  # reshuffled per epoch


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_and_contiguous_layout(data: dict, backend: str) -> None:
    loader = build_loader(config(data, backend), "val", context(dtype=torch.bfloat16, channels_last=False))
    x, y = next(iter(loader))
    assert x.dtype == torch.bfloat16 and x.is_contiguous() and y.dtype == torch.int64


def test_val_identical_across_backends(data: dict) -> None:
    """Same order and labels everywhere; pixels equal within resampling/JPEG-decoder tolerance, also
    against imagefolder reading the source JPEGs."""
    results = {}
    for backend in [*BACKENDS, "imagefolder"]:
        path = str(data["src"]) if backend == "imagefolder" else str(data["out"])
        images, labels = epoch(build_loader(config(data, backend, path=path), "val", context()), 0)
        results[backend] = (torch.cat(images), labels)
    ref_images, ref_labels = results.pop("torch")
    assert ref_labels == data["labels"]["val"]
    for backend, (images, labels) in results.items():
        assert labels == ref_labels, backend
        diff = (images - ref_images).abs()
        assert diff.mean() < 0.05 and diff.amax((1, 2, 3)).max() < 1.0, (backend, diff.mean(), diff.max())


def test_each_backend_replays_crops_as_the_registry_says_and_names_its_resampling(
        data: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """`base.REPLAYS_CROPS`, read without building a loader (`vs_original.choose`), is each backend's
    `replays_crops`; a loader that replays crops names its resampling (`base.RESAMPLING`, what a teacher cache's
    identity records) and one that does not names none."""
    import fastcd.data.fashion_mnist as fashion_mnist
    from fastcd.data.base import BACKENDS as REGISTERED
    from fastcd.data.base import REPLAYS_CROPS, RESAMPLING

    assert list(REPLAYS_CROPS) == list(REGISTERED)
    idx = (np.zeros((8, 28, 28), np.uint8), np.arange(8) % len(CLASSES))
    monkeypatch.setattr(fashion_mnist, "load_split", lambda folder, split: idx)
    for backend in REPLAYS_CROPS:
        path = data["src"] if backend == "imagefolder" else data["out"]
        loader = build_loader(config(data, backend, path=str(path)), "train", context())
        assert loader.replays_crops is REPLAYS_CROPS[backend], backend
        assert (loader.resampling in RESAMPLING) is loader.replays_crops, (backend, loader.resampling)
    assert build_loader(config(data, "torch", decode="workers"), "train", context()).resampling == "antialiased"
    assert build_loader(config(data, "torch", decode="device"), "train", context()).resampling == "area"


def identify(images: list[torch.Tensor], means: np.ndarray) -> list[int]:
    """Which train sample each (full-image, maybe flipped) crop shows, by its mean colour."""
    found = torch.cat(images).float().mean((2, 3)).numpy()
    dist = np.linalg.norm(found[:, None] - means[None], axis=2)
    assert (dist.min(1) < 0.05).all(), dist.min(1)
    return dist.argmin(1).tolist()


def rank_shares(out: str, backend: str, rank: int, means: np.ndarray) -> list:
    """[train sample ids of epoch 0, of epoch 1, per-image means of val] seen by `rank` of 2."""
    cfg = DataConfig(backend=backend, path=out, batch_size=4, val_batch_size=4, workers=1, res=32, val_res=32,
                     scale_min=1.0)
    ctx = LoaderContext(torch.device("cpu"), num_classes=len(CLASSES), rank=rank, world_size=2, seed=3)
    train = build_loader(cfg, "train", ctx)
    seen = [identify(epoch(train, e)[0], means) for e in range(2)]
    return [*seen, torch.cat(epoch(build_loader(cfg, "val", ctx), 0)[0]).mean((1, 2, 3)).tolist()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_see_disjoint_shares(data: dict, backend: str) -> None:
    """Two ranks: each train epoch splits into disjoint halves covering the split, reshuffled across epochs;
    val halves together cover every sample once."""
    out, means = str(data["out"]), data["train_means"]
    shares = [rank_shares(out, backend, r, means) for r in range(2)]
    n_train = len(data["labels"]["train"])
    for e in range(2):
        a, b = shares[0][e], shares[1][e]
        assert len(a) == len(b) == n_train // 2 and sorted(a + b) == list(range(n_train))
    assert shares[0][0] != shares[0][1]
    single = torch.cat(epoch(build_loader(config(data, backend), "val", context()), 0)[0]).mean((1, 2, 3))
    val = torch.tensor(shares[0][2] + shares[1][2])
    torch.testing.assert_close(val.sort().values, single.sort().values)


def test_ffcv_shares_the_shards_fingerprint_only_when_the_beton_holds_their_jpegs(data: dict, tmp_path: Path) -> None:
    """A `.beton` written with another ffcv write mode holds decoded or re-encoded pixels: its digest names the mode,
    so a teacher cache written through the shards is not read through it (and the other way round)."""
    fingerprints = {b: build_loader(config(data, b), "train", context()).fingerprint() for b in ("torch", "ffcv")}
    assert fingerprints["torch"] == fingerprints["ffcv"]
    out = damaged_copy(data, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["options"]["ffcv_write_mode"] = "raw"
    (out / "manifest.json").write_text(json.dumps(manifest))
    torch_fp, ffcv_fp = (build_loader(config(data, b, path=str(out)), "train", context()).fingerprint()
                         for b in ("torch", "ffcv"))
    assert ffcv_fp == f"{torch_fp} (.beton written with ffcv_write_mode raw)"


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_epoch_starts_at_a_batch(data: dict, backend: str) -> None:
    """A resume mid-epoch: set_epoch(e, start_batch=k) yields batch k onwards of epoch e, pixel for pixel."""
    loader = build_loader(config(data, backend, scale_min=0.3), "train", context(seed=4))
    whole, _ = epoch(loader, 1)
    loader.set_epoch(1, start_batch=1)
    rest = [x for x, _ in loader]
    assert len(loader) == len(rest) == len(whole) - 1
    for x, u in zip(whole[1:], rest, strict=True):
        assert torch.equal(x, u)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resolution_schedule(data: dict, backend: str) -> None:
    """min_res -> max_res over epochs 0..2 in multiples of 32 (and back, as after a restart); val at its own res."""
    cfg = config(data, backend, min_res=32, max_res=96, start_ramp=0, end_ramp=2, val_res=48)
    loader = build_loader(cfg, "train", context())
    for e, res in [(0, 32), (1, 64), (2, 96), (0, 32)]:
        images, _ = epoch(loader, e)
        assert images[0].shape[-2:] == (res, res), (e, images[0].shape)
    val, _ = epoch(build_loader(cfg, "val", context()), 0)
    assert val[0].shape[-2:] == (48, 48)


def damaged_copy(data: dict, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(data["out"], out)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_prepared_dirs_fail_at_build(data: dict, tmp_path: Path, backend: str) -> None:
    out = damaged_copy(data, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    with pytest.raises(FastcdError, match="format_version"):
        build_loader(config(data, backend, path=str(out)), "train", context())
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FastcdError, match="num_classes"):
        build_loader(config(data, backend, path=str(out)), "train", context(num_classes=5))
    (out / "train" / "shard-000001.idx").unlink()
    with pytest.raises(FastcdError, match="shard-000001.idx"):
        build_loader(config(data, backend, path=str(out)), "train", context())


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_corrupt_shard_is_named(data: dict, tmp_path: Path, backend: str, damage: str) -> None:
    out = damaged_copy(data, tmp_path)
    tar = out / "val" / "shard-000001.tar"
    raw = tar.read_bytes()
    tar.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else raw[:512] + b"\0" * (len(raw) - 512))
    with pytest.raises(FastcdError, match="shard-000001.tar"):
        build_loader(config(data, backend, path=str(out)), "val", context())


def test_corrupt_beton_is_named(data: dict, tmp_path: Path) -> None:
    out = damaged_copy(data, tmp_path)
    beton = out / "val.beton"
    beton.write_bytes(beton.read_bytes()[:100])
    with pytest.raises(FastcdError, match="val.beton"):
        build_loader(config(data, "ffcv", path=str(out)), "val", context())


def test_missing_library_is_a_clear_error(data: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.delitem(sys.modules, "fastcd.data.dali_loader", raising=False)
    with pytest.raises(FastcdError, match="'dali' cannot be used"):
        build_loader(config(data, "dali"), "train", context())


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_training_run(data: dict, tmp_path: Path, backend: str) -> None:
    from fastcd.config import config_from_dict
    from fastcd.engine.trainer import train

    raw = {"name": f"loader-{backend}", "teacher": None,
           "student": {"arch": "resnet18", "stem": "cifar", "width": 0.125, "num_classes": len(CLASSES)},
           "loss_list": [{"loss_name": "CELoss"}],
           "data": {"backend": backend, "path": str(data["out"]), "batch_size": 8, "workers": 1, "res": 32,
                    "val_res": 32, "flip_tta": True},
           "optim": {"lr": 0.05, "schedule": "step", "step_size": 100},
           "train": {"epochs": 2, "device": "cpu", "amp": "fp32", "out_dir": str(tmp_path), "progress": False}}
    history = train(config_from_dict(raw))
    assert len(history) == 2 and all(np.isfinite(r["loss"]) for r in history)


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_small_and_single_sample_batches(data: dict, backend: str) -> None:
    """A last val batch of one sample, a val split smaller than a batch, a train split smaller than a batch and
    a rank whose val share is empty: labels stay 1-D (one per image), batch sizes and `len` agree with what is
    yielded."""
    expected = data["labels"]["val"]
    for val_batch, subset, sizes in [(7, 0, [7, 7, 1]), (4, 3, [3]), (4, 1, [1])]:
        loader = build_loader(config(data, backend, val_batch_size=val_batch, val_subset=subset), "val", context())
        batches = list(loader)
        assert [y.shape for _, y in batches] == [(n,) for n in sizes], (val_batch, subset)
        assert [x.shape for x, _ in batches] == [(n, 3, 32, 32) for n in sizes] and len(loader) == len(sizes)
        assert torch.cat([y for _, y in batches]).tolist() == expected[:sum(sizes)]
    train = build_loader(config(data, backend, train_subset=5), "train", context())
    assert len(train) == 0 and epoch(train, 0)[0] == []
    empty_share = build_loader(config(data, backend, val_subset=1), "val", context(rank=1, world_size=2))
    assert len(empty_share) == 0 and list(empty_share) == []


def _dali_batches_with_outputs(loader) -> list:
    """[(images, labels, DALI's output TensorLists)] of one epoch: spies on the loader's pipeline."""
    run, outputs, seen = loader.pipe.run, [], []

    def spy(*args):
        outputs.append(run(*args))
        return outputs[-1]

    loader.pipe.run = spy
    for x, y in loader:
        seen.append((x, y, outputs[-1]))
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_dali_yields_its_own_buffers(data: dict, dtype: torch.dtype, channels_last: bool) -> None:
    """Labels, and fp32/fp16 images in the run's layout, are views of DALI's output buffers: no host-made label
    tensor (labels come out of the pipeline, on the GPU when training there), no cast, no layout copy. DALI has
    no bf16: it writes fp32, rounded once."""
    ctx = context(dtype=dtype, channels_last=channels_last)
    loader = build_loader(config(data, "dali", val_batch_size=7), "val", ctx)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    seen = _dali_batches_with_outputs(loader)
    assert [len(y) for _, y, _ in seen] == [7, 7, 1]
    for x, y, outputs in seen:
        assert len(outputs) == 2, "labels must be a pipeline output"
        images, labels = (o.as_tensor() for o in outputs)
        assert x.dtype == dtype and x.is_contiguous(memory_format=fmt) and x.shape == (len(y), 3, 32, 32)
        assert y.data_ptr() == labels.data_ptr() and y.dtype == torch.int64 and y.shape == (len(x),)
        if dtype == torch.bfloat16:
            assert torch.from_dlpack(images).dtype == torch.float32
        else:
            assert x.data_ptr() == images.data_ptr()


def test_dali_half_precision_is_the_fp32_batch_rounded(data: dict) -> None:
    """fp16 and bf16 batches equal the fp32 batch rounded once to that dtype (no double rounding via fp16)."""
    ref = torch.cat(epoch(build_loader(config(data, "dali"), "val", context()), 0)[0])
    for dtype in (torch.float16, torch.bfloat16):
        got = torch.cat(epoch(build_loader(config(data, "dali"), "val", context(dtype=dtype)), 0)[0])
        assert torch.equal(got, ref.to(dtype)), (dtype, (got.float() - ref.to(dtype).float()).abs().max())


@pytest.mark.parametrize("split", ["train", "val"])
def test_dali_feeds_the_plan_s_windows_computed_before_dali_runs(data: dict, split: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch gets exactly CropPlan's boxes and flips of its samples, in `batch_indices` order, computed
    when the epoch starts: none in `iter_setup`, which runs while DALI decodes, where CropPlan's torch ops
    woke torch's intra-op threads to spin beside DALI's (13% of dali's throughput on two cores)."""
    from fastcd.data.crops import CropPlan

    loader = build_loader(config(data, "dali", val_batch_size=7, scale_min=0.3), split, context(seed=5))
    loader.set_epoch(2)
    pipe, boxes, in_setup, fed, late = loader.pipe, CropPlan.boxes, [False], [], []
    setup, feed = pipe.iter_setup, pipe.feed_input

    def spy_setup() -> None:
        in_setup[0] = True
        try:
            setup()
        finally:
            in_setup[0] = False

    def spy_boxes(plan: CropPlan, *args) -> torch.Tensor:
        late.append(in_setup[0])
        return boxes(plan, *args)

    monkeypatch.setattr(pipe, "iter_setup", spy_setup)
    def spy_feed(name: str, value, *args, **kwargs) -> None:
        if name in ("anchor", "shape", "flip"):
            fed.append((name, np.array(value)))
        feed(name, value, *args, **kwargs)

    monkeypatch.setattr(pipe, "feed_input", spy_feed)
    monkeypatch.setattr(CropPlan, "boxes", spy_boxes)
    assert len(list(loader)) == len(loader)
    assert late and not any(late), "crop windows computed in iter_setup"
    windows = {name: [v for n, v in fed if n == name] for name in ("anchor", "shape", "flip")}
    s, c = loader.samples, loader.cfg
    plan = CropPlan(split == "train", loader.res, c.scale_min, c.val_resize_ratio, 5, 2)
    batches = loader.batch_indices()
    assert [len(b) for b in batches] == ([8, 8, 8] if split == "train" else [7, 7, 1])
    for i, batch in enumerate(batches):
        want = boxes(plan, batch, torch.from_numpy(s.heights[batch.numpy()]), torch.from_numpy(s.widths[batch.numpy()]))
        assert np.array_equal(windows["anchor"][i], want[:, 0:2].numpy()), i
        assert np.array_equal(windows["shape"][i], want[:, 2:4].numpy()), i
        assert np.array_equal(windows["flip"][i], want[:, 4].numpy()), i
