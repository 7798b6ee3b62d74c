"""Loader throughput: images/s of each fastcd backend vs the raw libraries and the ImageFolder baseline.

All read the same images (train split, RandomResizedCrop + flip at --res, normalised float batches).
`raw-ffcv` is ffcv's Loader with its own RandomResizedCrop decoder and flip (fastcd's `ffcv` executes
fastcd's crops instead, `fastcd.data.ffcv_crops`), normalised by two torch ops; `raw-dali` is a DALI
pipeline with `fn.readers.webdataset` and the same operators; `imagefolder` reads the source tree the
prepared data came from. Each runs in its own fresh process: one warm-up epoch (ffcv compiles with
numba), then --epochs timed epochs; peak host memory is that process's (and its workers'), peak GPU
memory that process's. fastcd's backends deliver to --device (default: the GPU when there is one):
there the `torch` backend decodes each batch on the GPU (nvjpeg) and `dali` uses its mixed decoder,
and the clock stops only when the GPU is done. A backend whose process fails or dies gets a row saying
so. When PREPARED holds no prepared data, an ImageNet-like tree of --images JPEGs (bench/prepare.py's
generator) is prepared into it first, in the formats this machine can write (no `.beton` without ffcv).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import queue as queue_module
import time
from multiprocessing import get_context
from pathlib import Path

import torch

from fastcd.bench.prepare import generated_dataset
from fastcd.config import DataConfig
from fastcd.data import LoaderContext, build_loader
from fastcd.data_prep.manifest import load_manifest
from fastcd.errors import FastcdError
from fastcd.utils.lifeline import end_with_parent, install
from fastcd.utils.results import add_out_argument, peak_memory, record

BACKENDS = ["imagefolder", "torch", "ffcv", "raw-ffcv", "dali", "raw-dali"]
FASTCD = ("imagefolder", "torch", "ffcv", "dali")  # delivered to --device; the raw libraries stay on the CPU
RAW_OF = {"ffcv": "raw-ffcv", "dali": "raw-dali"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def device_of(name: str) -> torch.device:
    """`auto` is the GPU when there is one."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise FastcdError("--device cuda: no CUDA device is visible")
    return torch.device(name)


def _fastcd_epochs(backend: str, path: str, args: argparse.Namespace, classes: int):
    device = device_of(args.device)
    cfg = DataConfig(backend=backend, path=path, batch_size=args.batch, workers=args.workers, res=args.res)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what training asks for there
    loader = build_loader(cfg, "train", LoaderContext(device, dtype, num_classes=classes))

    def run_epoch(e: int) -> int:
        loader.set_epoch(e)
        n = sum(len(labels) for _, labels in loader)
        if device.type == "cuda":
            torch.cuda.synchronize()  # intentional sync: the epoch ends when the GPU is done
        return n
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
    """In a fresh process that ends with its parent, as its forked loader workers do: `_timed` of `backend`, or
    a row naming the error it raised."""
    end_with_parent()
    install()
    multiprocessing.set_start_method("fork", force=True)  # a spawned process would spawn its loader workers
    try:
        queue.put(_timed(backend, out, src, args, classes))
    except Exception as e:  # recorded as this backend's row: the others still run
        queue.put({"backend": backend, "status": "failed", "reason": f"{type(e).__name__}: {e}".splitlines()[0]})


def _timed(backend: str, out: str, src: str, args: argparse.Namespace, classes: int) -> dict:
    """Warm-up epoch, then timed epochs of `backend`: its result row."""
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
    row = {"backend": backend, "status": "ok", "device": str(device_of(args.device)) if backend in FASTCD else "cpu",
           "images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 1),
           "host_peak_mib": round(mem["host_peak_mib"] + mem["children_host_peak_mib"], 1)}
    if "gpu_peak_mib" in mem:
        row["gpu_peak_mib"] = mem["gpu_peak_mib"]
    return row


def _result(proc, queue, backend: str) -> dict:
    """The row `proc` puts on `queue`, or a failed row if it dies without one."""
    while True:
        try:
            return queue.get(timeout=1.0)
        except queue_module.Empty:
            if not proc.is_alive():
                try:
                    return queue.get(timeout=1.0)  # put just before it exited
                except queue_module.Empty:
                    return {"backend": backend, "status": "failed",
                            "reason": f"its process died (exit code {proc.exitcode})"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prepared", metavar="PREPARED",
                        help="a `fastcd prepare` OUT folder (generated and prepared first when it holds no manifest)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {','.join(BACKENDS)}")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where fastcd's backends deliver batches (auto: the GPU when there is one)")
    parser.add_argument("--res", type=int, default=224, help="training crop side in pixels (default %(default)s)")
    parser.add_argument("--batch", type=int, default=256, help="batch size (default %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="loader workers/threads (default: all cores)")
    parser.add_argument("--images", type=int, default=2000, help="images to generate when PREPARED is empty "
                        "(default %(default)s)")
    parser.add_argument("--epochs", type=int, default=2,
                        help="timed epochs after the warm-up epoch (default %(default)s)")
    add_out_argument(parser)


def _table(rows: list[dict]) -> str:
    lines = ["| backend | device | img/s | vs imagefolder | vs raw library | peak host MiB | peak GPU MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | {r['status']}: {r['reason']} | | | | | |")
            continue
        lines.append(f"| {r['backend']} | {r['device']} | {r['images_per_s']:.0f} | {r.get('vs_imagefolder', '-')} "
                     f"| {r.get('vs_raw', '-')} | {r['host_peak_mib']:.0f} | {r.get('gpu_peak_mib', '-')} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    backends = args.backends.split(",")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise FastcdError(f"--backends: unknown {unknown[0]!r}; choose from {','.join(BACKENDS)}")
    device_of(args.device)
    out = Path(args.prepared)
    manifest = generated_dataset(out, args.images, args.workers)
    src = manifest["options"]["src"]
    if "imagefolder" in backends and not (Path(src) / "train").is_dir():
        raise FastcdError(f"imagefolder needs the source tree {src}/train that {out} was prepared from")
    rows = []
    # A fresh process per backend: forked on a CPU (its DataLoader workers are forked too); spawned when it
    # may use the GPU, since CUDA does not survive a fork of a process that has touched it.
    ctx = get_context("spawn" if device_of(args.device).type == "cuda" else "fork")
    for backend in backends:
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(queue, backend, str(out), src, args, len(manifest["classes"])))
        proc.start()
        rows.append(_result(proc, queue, backend))
        proc.join(timeout=30)
        if proc.is_alive():  # hung on its way out (e.g. loader workers after an error): it has reported
            proc.kill()
        r = rows[-1]
        print(f"{backend:12s} " + (f"{r['images_per_s']:8.1f} img/s   peak host {r['host_peak_mib']:.0f} MiB"
                                   if r["status"] == "ok" else f"{r['status']}: {r['reason']}"), flush=True)
    speed = {r["backend"]: r["images_per_s"] for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        if "imagefolder" in speed:
            r["vs_imagefolder"] = round(r["images_per_s"] / speed["imagefolder"], 3)
        if RAW_OF.get(r["backend"]) in speed:
            r["vs_raw"] = round(r["images_per_s"] / speed[RAW_OF[r["backend"]]], 3)
    print("\n" + _table(rows))
    path = record("loader", {"prepared": str(out), "images": manifest["splits"]["train"]["num_samples"],
                             "res": args.res, "batch": args.batch, "workers": args.workers, "epochs": args.epochs,
                             "device": str(device_of(args.device)), "rows": rows}, args.out)
    print(f"recorded to {path}")
    return 0
