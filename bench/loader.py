"""Loader throughput: images/s of each fastcd backend vs the raw libraries and the ImageFolder baseline.

All read the same images (train split, RandomResizedCrop + flip at --res, normalised float batches).
`raw-ffcv` is ffcv's Loader with the same decoders, normalised by two torch ops; `raw-dali` is a DALI
pipeline with `fn.readers.webdataset` and the same operators; `imagefolder` reads the source tree the
prepared data came from. Each runs in its own fresh process: one warm-up epoch (ffcv compiles with
numba), then --epochs timed epochs; peak host memory is that process's (and its workers'). When OUT
holds no prepared data, an ImageNet-like tree of --images JPEGs (bench/prepare.py's generator) is
prepared into it first.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import torch

from fastcd.bench.results import peak_memory, record
from fastcd.config import DataConfig
from fastcd.data import LoaderContext, build_loader
from fastcd.data_prep.manifest import load_manifest, manifest_path
from fastcd.errors import FastcdError

BACKENDS = ["imagefolder", "torch", "ffcv", "raw-ffcv", "dali", "raw-dali"]
RAW_OF = {"ffcv": "raw-ffcv", "dali": "raw-dali"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _fastcd_epochs(backend: str, path: str, args: argparse.Namespace, classes: int):
    cfg = DataConfig(backend=backend, path=path, batch_size=args.batch, workers=args.workers, res=args.res)
    loader = build_loader(cfg, "train", LoaderContext(torch.device("cpu"), num_classes=classes))

    def run_epoch(e: int) -> int:
        loader.set_epoch(e)
        return sum(len(labels) for _, labels in loader)
    return run_epoch


def _raw_ffcv_epochs(out: Path, args: argparse.Namespace):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

    loader = Loader(str(out / "train.beton"), batch_size=args.batch, num_workers=args.workers,
                    order=OrderOption.RANDOM, os_cache=True, drop_last=True, seed=0,
                    pipelines={"image": [RandomResizedCropRGBImageDecoder((args.res, args.res)), RandomHorizontalFlip(),
                                         ToTensor(), ToTorchImage()],
                               "label": [IntDecoder(), ToTensor(), Squeeze()]})
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255

    def run_epoch(e: int) -> int:
        n = 0
        for images, labels in loader:
            images = ((images.float() - mean) / std).contiguous(memory_format=torch.channels_last)
            n += len(labels)
        return n
    return run_epoch


def _raw_dali_epochs(out: Path, args: argparse.Namespace):
    from nvidia.dali import Pipeline, fn, types

    shards = load_manifest(out)["splits"]["train"]["shards"]
    pipe = Pipeline(batch_size=args.batch, num_threads=args.workers, device_id=None, seed=0)
    with pipe:
        jpegs, labels = fn.readers.webdataset(paths=[str(out / s["tar"]) for s in shards],
                                              index_paths=[str(out / s["index"]) for s in shards],
                                              ext=["jpg", "cls"], random_shuffle=True, name="reader")
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB)
        images = fn.resize(images, resize_x=args.res, resize_y=args.res)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC",
                                          mean=[255 * m for m in MEAN], std=[255 * s for s in STD],
                                          mirror=fn.random.coin_flip())
        pipe.set_outputs(images, labels)
    pipe.build()
    batches = pipe.epoch_size("reader") // args.batch

    def run_epoch(e: int) -> int:
        n = 0
        for _ in range(batches):
            images, _labels = pipe.run()
            n += len(torch.from_dlpack(images.as_tensor()).permute(0, 3, 1, 2))
        return n
    return run_epoch


def _measure(queue, backend: str, out: str, src: str, args: argparse.Namespace, classes: int) -> None:
    """In a fresh process: warm-up epoch, then timed epochs of `backend`; puts a result row on `queue`."""
    torch.set_num_threads(args.workers)
    if backend == "raw-ffcv":
        run_epoch = _raw_ffcv_epochs(Path(out), args)
    elif backend == "raw-dali":
        run_epoch = _raw_dali_epochs(Path(out), args)
    else:
        run_epoch = _fastcd_epochs(backend, src if backend == "imagefolder" else out, args, classes)
    run_epoch(0)
    start, n = time.perf_counter(), 0
    for e in range(1, args.epochs + 1):
        n += run_epoch(e)
    seconds = time.perf_counter() - start
    mem = peak_memory()
    queue.put({"backend": backend, "images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 1),
               "host_peak_mib": round(mem["host_peak_mib"] + mem["children_host_peak_mib"], 1)})


def _prepared(out: Path, args: argparse.Namespace) -> dict:
    """OUT's manifest, preparing a generated ImageNet-like tree into OUT first when OUT is empty."""
    if not manifest_path(out).is_file():
        from fastcd.bench.prepare import generate
        from fastcd.data_prep.prepare import prepare

        src = generate(Path(tempfile.gettempdir()) / f"fastcd-bench-loader-{args.images}", args.images, args.workers)
        print(f"preparing {args.images} generated images from {src} into {out}")
        prepare(src, out, splits=["train"], workers=args.workers, progress=False)
    return load_manifest(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="prepared OUT folder (generated and prepared when it holds no manifest)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {','.join(BACKENDS)}")
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="loader workers/threads")
    parser.add_argument("--images", type=int, default=2000, help="images to generate when OUT is empty")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up epoch")


def run(args: argparse.Namespace) -> int:
    backends = args.backends.split(",")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise FastcdError(f"--backends: unknown {unknown[0]!r}; choose from {','.join(BACKENDS)}")
    out = Path(args.out)
    manifest = _prepared(out, args)
    src = manifest["options"]["src"]
    if "imagefolder" in backends and not (Path(src) / "train").is_dir():
        raise FastcdError(f"imagefolder needs the source tree {src}/train that {out} was prepared from")
    rows = []
    ctx = get_context("fork")  # a fresh process per backend; fork keeps DataLoader workers forked, not spawned
    for backend in backends:
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(queue, backend, str(out), src, args, len(manifest["classes"])))
        proc.start()
        rows.append(queue.get())
        proc.join()
        print(f"{backend:12s} {rows[-1]['images_per_s']:8.1f} img/s   peak host {rows[-1]['host_peak_mib']:.0f} MiB")
    speed = {r["backend"]: r["images_per_s"] for r in rows}
    for r in rows:
        if "imagefolder" in speed:
            r["vs_imagefolder"] = round(r["images_per_s"] / speed["imagefolder"], 3)
        if RAW_OF.get(r["backend"]) in speed:
            r["vs_raw"] = round(r["images_per_s"] / speed[RAW_OF[r["backend"]]], 3)
    print("\n| backend | img/s | vs imagefolder | vs raw library | peak host MiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['images_per_s']:.0f} | {r.get('vs_imagefolder', '-')} | {r.get('vs_raw', '-')} "
              f"| {r['host_peak_mib']:.0f} |")
    path = record("loader", {"out": str(out), "images": manifest["splits"]["train"]["num_samples"], "res": args.res,
                             "batch": args.batch, "workers": args.workers, "epochs": args.epochs, "rows": rows})
    print(f"recorded to {path}")
    return 0
