"""The host side of the GPU feed alone, beside the per-sample host path it replaced and the full loader.

Rows, each timed over --epochs epochs of the train split (after one warm-up epoch), --repeats times
interleaved, in this process pinned to --cores cores (the median is reported, with every run's value):

- `feed`: `HostFeed.batch` for every batch: the JPEG bytes gathered from the mapped shards into a reused
  buffer (pinned on a GPU machine), labels, sizes and crop rows from the sample table, vectorised. This
  is all the host does per batch before the decoder; no decoding.
- `per-sample`: the host path as it was before the sample table (fastcd 2026-11-28), for the ratio: per
  sample a one-row `CropPlan.boxes` call, the size parsed from the JPEG header (once per process), the
  label read from the tar, then the bytes concatenated and the rows stacked per batch.
- `loader`: the whole torch backend: on a GPU machine `data.decode: device` (the feed, then nvjpeg and the
  Triton crop; the clock stops when the GPU is done), else its CPU path (`data.decode: workers`, decoded
  and cropped in this process), so that every row's CPU time is on the pinned cores.

img/s per core is img/s divided by the cores the process may use; CPU µs per image is the process's CPU
time (all its threads) per image. Peak host RSS and GPU memory are the process's, after all rows, beside its
RSS after the imports (torch alone is most of it) and, at the end, its own (anonymous) and file-backed
resident pages (the mapped shards, which are page cache); the data is generated and prepared in a child
process.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastcd.bench.prepare import generated_dataset
from fastcd.config import DataConfig
from fastcd.data import LoaderContext, build_loader
from fastcd.data.base import IndexedLoader
from fastcd.data.crops import CropPlan
from fastcd.data.feed import HostFeed
from fastcd.data.prepared import PreparedSplit, ShardSamples, open_prepared
from fastcd.data_prep.manifest import load_manifest
from fastcd.data_prep.shards import read_index
from fastcd.errors import FastcdError
from fastcd.utils.lifeline import end_with_parent
from fastcd.utils.results import add_out_argument, peak_memory, record

ROWS = ("feed", "per-sample", "loader")


class _PerSample:
    """The host path of 2026-11-28, per sample: header sizes, tar labels and one-row crop draws."""

    def __init__(self, samples: ShardSamples, prepared: PreparedSplit) -> None:
        self.samples = samples
        self.tars = [np.memmap(tar, dtype=np.uint8, mode="r") for tar, _ in prepared.shards]
        self.cls = [(s, e["cls"].offset, e["cls"].size) for s, (_, index) in enumerate(prepared.shards)
                    for e in read_index(index)]
        self.sizes: dict[int, tuple[int, int]] = {}

    def batch(self, indices: torch.Tensor, plan: CropPlan) -> tuple:
        jpegs, labels, meta = [], [], []
        for i in indices.tolist():
            jpeg = self.samples.jpeg(i)
            if i not in self.sizes:
                width, height = Image.open(io.BytesIO(jpeg)).size
                self.sizes[i] = (height, width)
            height, width = self.sizes[i]
            shard, offset, size = self.cls[i]
            labels.append(int(self.tars[shard][offset:offset + size].tobytes()))
            box = plan.boxes([i], torch.tensor([height]), torch.tensor([width]))[0].tolist()
            meta.append(torch.tensor([*box, height, width], dtype=torch.float32))
            jpegs.append(jpeg)
        return (torch.from_numpy(np.concatenate(jpegs)), torch.tensor([len(j) for j in jpegs]), torch.tensor(labels),
                torch.stack(meta))


def _epochs(name: str, loader: IndexedLoader, samples: ShardSamples, prepared: PreparedSplit,
            pin: bool) -> Callable[[int], int]:
    """A function that runs epoch e of row `name` and returns the images it handed over."""
    if name == "loader":
        def run(e: int) -> int:
            loader.set_epoch(e)
            n = sum(len(y) for _, y in loader)
            if loader.ctx.device.type == "cuda":
                torch.cuda.synchronize()  # intentional sync: the epoch ends when the GPU is done
            return n
        return run
    feed = HostFeed(samples, 2, pin) if name == "feed" else _PerSample(samples, prepared)

    def run(e: int) -> int:
        loader.set_epoch(e)
        plan = CropPlan(True, loader.res, loader.cfg.scale_min, loader.cfg.val_resize_ratio, loader.ctx.seed, e)
        n = 0
        for indices in loader.batch_indices():
            out = feed.batch(indices, plan)
            if name == "feed":
                feed.release(out, None)
            n += len(indices)
        return n
    return run


def _time(run: Callable[[int], int], epochs: list[int]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (this process, all threads) and images of `epochs`."""
    wall, cpu, n = time.perf_counter(), time.process_time(), 0
    for e in epochs:
        n += run(e)
    return time.perf_counter() - wall, time.process_time() - cpu, n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prepared", metavar="PREPARED",
                        help="a `fastcd prepare` OUT folder (generated and prepared first when it holds no manifest)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {','.join(ROWS)} (default: all)")
    parser.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    parser.add_argument("--res", type=int, default=176, help="training resolution of the loader row (default 176)")
    parser.add_argument("--cores", type=int, default=1,
                        help="cores this process may use, pinned with sched_setaffinity (default 1)")
    parser.add_argument("--images", type=int, default=2048, help="images to generate when PREPARED is empty "
                        "(default 2048)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per run (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each row, interleaved (default 5)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the loader row decodes (auto: the GPU when there is one)")
    add_out_argument(parser)


def _prepared_elsewhere(out: Path, images: int) -> None:
    """`generated_dataset` in a spawned child (a fork of a process running torch threads can hang), so this
    process's peak memory is the benchmark's own."""
    proc = multiprocessing.get_context("spawn").Process(target=_generate, args=(out, images))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise FastcdError(f"preparing {images} generated JPEGs into {out} failed (exit code {proc.exitcode})")


def _generate(out: Path, images: int) -> None:
    """`generated_dataset` in the spawned child, which ends with its parent."""
    end_with_parent()
    generated_dataset(out, images, max(1, os.cpu_count() or 1))


def _rss_split() -> dict[str, float]:
    """This process's resident memory now, in MiB: its own (anonymous) and file-backed pages (the mapped shards:
    the kernel's page cache, shared and reclaimable, which grows with the data read, not with the buffers)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {f"rss_{k[3:].lower()}_mib": round(int(fields[k].split()[0]) / 1024, 1) for k in ("RssAnon", "RssFile")
            if k in fields}


def _pin_cores(cores: int) -> list[int]:
    available = sorted(os.sched_getaffinity(0))
    if not 1 <= cores <= len(available):
        raise FastcdError(f"--cores {cores}: this process may use 1..{len(available)} cores")
    os.sched_setaffinity(0, available[:cores])
    torch.set_num_threads(cores)
    return available[:cores]


def run(args: argparse.Namespace) -> int:
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise FastcdError(f"--rows: unknown {unknown[0]!r}; choose from {','.join(ROWS)}")
    if min(args.batch, args.epochs, args.repeats, args.res) < 1:
        raise FastcdError("--batch, --epochs, --repeats and --res must be at least 1")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastcdError("--device cuda: no CUDA device is visible")
    _prepared_elsewhere(Path(args.prepared), args.images)
    imports_mib = peak_memory()["host_peak_mib"]  # torch and friends, before any row ran
    manifest = load_manifest(args.prepared)
    cores = _pin_cores(args.cores)
    classes = len(manifest["classes"])
    # the loader row decodes on the GPU (nvjpeg) when there is one, else in this process (no workers)
    cfg = DataConfig(backend="torch", path=args.prepared, batch_size=args.batch, res=args.res,
                     decode="device" if device.type == "cuda" else "workers", workers=0)
    ctx = LoaderContext(device, torch.bfloat16 if device.type == "cuda" else torch.float32, num_classes=classes)
    loader = build_loader(cfg, "train", ctx)
    if len(loader) < 1:
        raise FastcdError(f"{args.prepared} has fewer than --batch {args.batch} training images")
    prepared = open_prepared(args.prepared, "train", ctx, "dali")
    samples = loader.samples
    runs = {r: _epochs(r, loader, samples, prepared, device.type == "cuda") for r in rows}
    for r in rows:
        runs[r](0)  # warm-up: maps the shards, fills the page cache, allocates the buffers
    timings: dict[str, list[tuple[float, float, int]]] = {r: [] for r in rows}
    for k in range(args.repeats):
        for r in rows:
            timings[r].append(_time(runs[r], list(range(1 + k * args.epochs, 1 + (k + 1) * args.epochs))))
    mem = {**peak_memory(), **_rss_split()}
    results = []
    for r in rows:
        speeds = [n / wall for wall, _, n in timings[r]]
        cpu_us = [cpu / n * 1e6 for _, cpu, n in timings[r]]
        results.append({"row": r, "images_per_s": round(statistics.median(speeds), 1),
                        "images_per_s_per_core": round(statistics.median(speeds) / len(cores), 1),
                        "cpu_us_per_image": round(statistics.median(cpu_us), 2),
                        "runs_images_per_s": [round(v, 1) for v in speeds]})
    speed = {x["row"]: x["images_per_s"] for x in results}
    for x in results:
        if "per-sample" in speed:
            x["vs_per_sample"] = round(x["images_per_s"] / speed["per-sample"], 2)
    print(_table(results, device))
    result = {"prepared": args.prepared, "images": len(samples), "batch": args.batch, "res": args.res,
              "cores": len(cores), "epochs": args.epochs, "repeats": args.repeats, "device": str(device),
              "rows": results, "host_after_imports_mib": imports_mib, **mem}
    split = (f", now {mem['rss_anon_mib']:.0f} own + {mem['rss_file_mib']:.0f} file-backed"
             if "rss_anon_mib" in mem else "")
    print(f"peak host RSS {mem['host_peak_mib']:.0f} MiB ({imports_mib:.0f} MiB after the imports{split})" +
          (f", peak GPU {mem['gpu_peak_mib']:.0f} MiB" if "gpu_peak_mib" in mem else ""))
    print(f"recorded to {record('feed', result, args.out)}")
    return 0


def _table(rows: list[dict], device: torch.device) -> str:
    lines = ["| row | img/s (median) | img/s per core | CPU µs/img | vs per-sample | runs |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        name = f"loader ({'GPU' if device.type == 'cuda' else 'CPU'} decode)" if r["row"] == "loader" else r["row"]
        lines.append(f"| {name} | {r['images_per_s']:.0f} | {r['images_per_s_per_core']:.0f} | "
                     f"{r['cpu_us_per_image']:.1f} | {r.get('vs_per_sample', '-')} | "
                     f"{', '.join(f'{v:.0f}' for v in r['runs_images_per_s'])} |")
    return "\n".join(lines)
