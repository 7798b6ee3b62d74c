"""Dataset conversion speed: ffcv's writer alone vs fastcd's shard writer alone vs `fastcd prepare` (both).

Generates (once, cached) an ImageNet-like tree of JPEGs, 300-640 px per side, photo-like content,
mostly baseline RGB with ImageNet's sprinkling of greyscale, CMYK and progressive files. Each way
runs in its own fresh process on the same number of workers, `--repeats` times interleaved; the
table gives the median's images/s, time relative to ffcv's writer alone (the issue's goal: both
formats <= 1.3x) and peak memory.
"""
from __future__ import annotations

import argparse
import importlib
import os
import resource
import shutil
import statistics
import tempfile
import time
from functools import partial
from multiprocessing import active_children, get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fastcd.data_prep.manifest import load_manifest, manifest_path
from fastcd.data_prep.prepare import JPEG_QUALITY, MAX_SIDE
from fastcd.utils.lifeline import end_with_parent, install
from fastcd.utils.results import add_out_argument, record

DEFAULT_IMAGES = 3000
CLASSES = 10
CACHE = Path(tempfile.gettempdir()) / "fastcd-bench-prepare"


def _photo(rng: np.random.Generator) -> Image.Image:
    """A photo-like image: smooth colour fields, shapes with edges, blur and sensor noise."""
    w, h = (int(v) for v in rng.integers(300, 641, 2))
    coarse = rng.integers(0, 256, (int(rng.integers(2, 9)), int(rng.integers(2, 9)), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 15))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    noise = rng.normal(0, float(rng.uniform(4, 16)), (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))


def _save(img: Image.Image, path: Path, rng: np.random.Generator) -> None:
    kind = rng.random()
    quality = int(rng.integers(75, 96))
    if kind < 0.02:
        img = img.convert("L")
    elif kind < 0.025:
        img = img.convert("CMYK")
    img.save(path, format="JPEG", quality=quality, progressive=bool(0.025 <= kind < 0.03))


def _generate_one(root: Path, seed: int, i: int) -> None:
    rng = np.random.default_rng([seed, i])
    folder = root / "train" / f"n{i % CLASSES:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    _save(_photo(rng), folder / f"img_{i:06d}.JPEG", rng)


def generate(root: Path, images: int, workers: int, seed: int = 0) -> Path:
    """The benchmark tree `root/train/<class>/*.JPEG` (deterministic; reused when already complete)."""
    done = root / f".complete-{images}-{seed}"
    if done.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    with get_context("spawn").Pool(workers, initializer=end_with_parent) as pool:
        pool.map(partial(_generate_one, root, seed), range(images), chunksize=32)
    done.touch()
    return root


def importable(module: str) -> bool:
    """Whether `module` imports here (ffcv and nvidia.dali are missing on some machines)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def generated_dataset(out: Path, images: int, workers: int) -> dict:
    """The manifest of the prepared folder `out`. A folder some `fastcd prepare` wrote is used as it is; any
    other (empty, or written by this function before) gets `images` generated JPEGs (cached in the temp
    folder) prepared into it, in the formats this machine can write (no `.beton` without ffcv): `prepare`
    returns at once when that is already done, and rebuilds what an older fastcd or a damaged run left."""
    marker = out / ".fastcd-bench-generated"
    if manifest_path(out).is_file() and not marker.is_file():
        return load_manifest(out)
    from fastcd.data_prep.prepare import prepare

    src = generate(Path(tempfile.gettempdir()) / f"fastcd-bench-jpegs-{images}", images, workers)
    formats = ["ffcv", "dali"] if importable("ffcv") else ["dali"]
    print(f"preparing {images} generated JPEGs from {src} into {out} ({', '.join(formats)})", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return prepare(src, out, formats=formats, splits=["train"], workers=workers, progress=False)


class _FilesDataset:
    """ffcv's usual input: an image folder decoded by PIL to RGB arrays (as in ffcv's ImageNet example)."""

    def __init__(self, root: Path):
        classes = sorted(p.name for p in (root / "train").iterdir())
        self.items = [(str(f), label) for label, c in enumerate(classes)
                      for f in sorted((root / "train" / c).iterdir())]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB")), label


def _ffcv_alone(src: Path, out: Path, workers: int, max_side: int, quality: int) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {"image": RGBImageField(write_mode="jpg", max_resolution=max_side, jpeg_quality=quality),
              "label": IntField()}
    DatasetWriter(str(out / "train.beton"), fields, num_workers=workers).from_indexed_dataset(
        _FilesDataset(src), chunksize=100)


def _fastcd(src: Path, out: Path, workers: int, max_side: int, quality: int, formats: list[str]) -> None:
    from fastcd.data_prep.prepare import prepare

    prepare(src, out, formats=formats, workers=workers, max_side=max_side, jpeg_quality=quality, progress=False)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children."""
    usage = [resource.getrusage(r) for r in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _timed(queue, way: str, src: Path, out: Path, workers: int, max_side: int, quality: int) -> None:
    end_with_parent()
    install()  # the ffcv writer's forked workers end with this process
    import ffcv.writer  # noqa: F401  (imports, ~4 s, are not part of the timing)

    import fastcd.data_prep.prepare  # noqa: F401

    cpu, start = _cpu_seconds(), time.perf_counter()
    if way == "ffcv writer alone":
        _ffcv_alone(src, out, workers, max_side, quality)
    else:
        _fastcd(src, out, workers, max_side, quality, ["dali"] if way == "fastcd shards alone" else ["ffcv", "dali"])
    seconds = time.perf_counter() - start
    active_children()  # reaps ffcv's finished writer processes, so their CPU time is counted
    cpu = _cpu_seconds() - cpu
    peak = max(resource.getrusage(r).ru_maxrss for r in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    queue.put({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": round(peak / 1024, 1),
               "output_mib": round(size / 2**20, 1)})


def measure(way: str, src: Path, workers: int, max_side: int, quality: int) -> dict:
    """Run one way of converting `src` in a fresh process; its time, peak memory and output size.

    The process is forked, as `fastcd prepare` is started from a shell: ffcv's writer then forks its
    workers too (from a spawned process it would spawn them, paying its imports in every worker).
    """
    ctx = get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="fastcd-bench-out-") as out:
        proc = ctx.Process(target=_timed, args=(queue, way, src, Path(out), workers, max_side, quality))
        proc.start()
        result = queue.get()
        proc.join()
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES,
                        help=f"images to convert (default {DEFAULT_IMAGES})")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="worker processes for every way (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each way (interleaved); median reported "
                        "(default %(default)s)")
    parser.add_argument("--max-side", type=int, default=MAX_SIDE, help="longest side of the prepared images, "
                        "as `fastcd prepare --max-side` (default %(default)s)")
    parser.add_argument("--jpeg-quality", type=int, default=JPEG_QUALITY, help="quality of re-encoded JPEGs, as "
                        "`fastcd prepare --jpeg-quality` (default %(default)s)")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"where the generated images live ({CACHE})")
    add_out_argument(parser)


def run(args: argparse.Namespace) -> int:
    print(f"generating {args.images} ImageNet-like JPEGs in {args.cache} (cached) ...")
    src = generate(args.cache / str(args.images), args.images, args.workers)
    ways = ("ffcv writer alone", "fastcd shards alone", "fastcd prepare (both)")
    runs: dict[str, list[dict]] = {way: [] for way in ways}
    for _ in range(args.repeats):  # interleaved, so a burst of load from other jobs hits every way alike
        for way in ways:
            runs[way].append(measure(way, src, args.workers, args.max_side, args.jpeg_quality))
    results = {way: {"seconds": statistics.median(r["seconds"] for r in rs),
                     "cpu_seconds": statistics.median(r["cpu_seconds"] for r in rs),
                     "all_seconds": [round(r["seconds"], 3) for r in rs],
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in rs), "output_mib": rs[0]["output_mib"]}
               for way, rs in runs.items()}
    base = results[ways[0]]
    print(f"\n{args.images} images, {args.workers} workers, max side {args.max_side}, quality {args.jpeg_quality}, "
          f"median of {args.repeats} runs")
    print(f"{'way':<24}{'seconds':>9}{'images/s':>10}{'vs ffcv':>9}{'CPU s':>8}{'CPU vs ffcv':>13}"
          f"{'peak MiB':>10}{'out MiB':>9}")
    for way, r in results.items():
        r["images_per_s"] = round(args.images / r["seconds"], 1)
        r["ratio_vs_ffcv"] = round(r["seconds"] / base["seconds"], 3)
        r["cpu_ratio_vs_ffcv"] = round(r["cpu_seconds"] / base["cpu_seconds"], 3)
        print(f"{way:<24}{r['seconds']:>9.2f}{r['images_per_s']:>10.1f}{r['ratio_vs_ffcv']:>9.2f}"
              f"{r['cpu_seconds']:>8.2f}{r['cpu_ratio_vs_ffcv']:>13.2f}{r['peak_rss_mib']:>10.0f}{r['output_mib']:>9.1f}")
    both = results[ways[2]]
    goal = both["ratio_vs_ffcv"] <= 1.3
    print(f"goal (both formats <= 1.3x ffcv alone): wall {'met' if goal else 'NOT met'}, "
          f"CPU time {'met' if both['cpu_ratio_vs_ffcv'] <= 1.3 else 'NOT met'}")
    path = record("prepare", {"images": args.images, "workers": args.workers, "repeats": args.repeats,
                              "max_side": args.max_side,
                              "jpeg_quality": args.jpeg_quality, "results": results, "goal_met": goal}, args.out)
    print(f"recorded in {path}")
    return 0
