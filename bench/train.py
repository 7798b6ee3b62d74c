"""`fastcd bench train CONFIG`: images/s of the full distillation step and where its time goes.

One step = wait for the batch, teacher forward, student + connectors forward, losses, backward,
optimizer (+ lr) step. Each phase is timed separately: with CUDA events on a GPU (so asynchrony does
not move time between phases; a data wait shows up as the GPU idling between two events), with
`perf_counter` on a CPU. images/s = batch / median step time over `--steps` steps after `--warmup`.

`--ablation` runs, in this one process and on the same data, the original configuration (fp32, NCHW,
eager losses, unfused SGD, ImageFolder loader with `--data loader`) and then adds one knob at a time,
each row keeping the knobs before it: channels_last, autocast bf16, fused losses, fused optimizer,
teacher BatchNorm folded, torch.compile, each prepared-data loader backend, CUDA graphs. A knob that
does not apply here is listed with the reason. Results: `record("train", ...)` (JSON), plus the latest
ablation's markdown table and PNG bar plot beside the JSON file.

The teacher is random (`teacher.weights=none`): weights do not change the speed. On a CPU the config is
shrunk (width 1/4, 64 px, batch 64) unless `--set` says otherwise, so an ablation takes minutes.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from fastcd.bench.prepare import generated_dataset, importable
from fastcd.config import Config, add_set_argument, drop_overrides_into_null, load_config
from fastcd.errors import FastcdError
from fastcd.knobs import Knob, impl_overrides, run_knobs, table
from fastcd.utils.atomic import atomic_path, atomic_write_bytes
from fastcd.utils.machine import machine_info
from fastcd.utils.results import add_out_argument, record

CPU_DEFAULTS = ["student.width=0.25", "teacher.width=0.25", "data.res=64", "data.val_res=64",
                "data.min_res=0", "data.max_res=0", "data.batch_size=64",
                f"data.workers={os.cpu_count() or 1}"]
LOADER_BACKENDS = ("torch", "ffcv", "dali")
LIBRARY_OF = {"ffcv": "ffcv", "dali": "nvidia.dali"}  # the library a loader backend needs
DATA_CACHE = Path(tempfile.gettempdir()) / "fastcd-bench-train"


@dataclass(frozen=True)
class PreparedData:
    """The prepared folder the loader rows read, the ImageFolder tree it came from, its classes and formats."""

    out: Path
    src: Path
    classes: int
    formats: tuple[str, ...]


def prepared_data(path: str, images: int) -> PreparedData:
    """The prepared folder `path` (default: under the temp folder); when it holds no manifest, `images`
    generated JPEGs are prepared into it first."""
    out = Path(path) if path else DATA_CACHE / f"prepared-{images}"
    manifest = generated_dataset(out, images, os.cpu_count() or 1)
    src = Path(manifest["options"]["src"])
    if not (src / "train").is_dir():
        raise FastcdError(f"the ImageFolder baseline needs {src}/train, the tree {out} was prepared from")
    train = manifest["splits"]["train"]
    formats = tuple(f for f, key in (("ffcv", "beton"), ("dali", "shards")) if train.get(key))
    return PreparedData(out, src, len(manifest["classes"]), formats)


def loader_skip(backend: str, data: PreparedData | None) -> str | None:
    """Why the loader row of `backend` cannot run here, or None."""
    if data is None:
        return "--data synthetic (use --data loader to compare loaders)"
    library = LIBRARY_OF.get(backend)
    if library and not importable(library):
        return f"{library} is not installed here"
    needs = "ffcv" if backend == "ffcv" else "dali"  # the torch and dali backends read the shards
    return None if needs in data.formats else f"{data.out} was prepared without the {needs} format"


def ablation(cfg: Config, cuda: bool, data: PreparedData | None, skip: set[str], cache_dir: Path) -> list[Knob]:
    """The original configuration, then one knob at a time (each row keeps the previous rows' knobs; the
    teacher-cache row, whose cache is written in `cache_dir`, is measured on top of them but not kept)."""
    original = ["train.amp=fp32", "train.channels_last=false", "optim.fused=false", "train.compile=false",
                *impl_overrides(cfg, "eager"), *(["teacher.fold_bn=false"] if cfg.teacher else [])]
    if data:
        original += ["data.backend=imagefolder", f"data.path={data.src}"]
    no_teacher = "no teacher in this config" if cfg.teacher is None else None
    knobs = [
        Knob("original", original),
        Knob("channels_last", ["train.channels_last=true"]),
        Knob("autocast bf16", ["train.amp=bf16"]),
        Knob("fused losses", impl_overrides(cfg, "auto"),
             skip=("no loss of this config has a fused kernel" if not impl_overrides(cfg, "auto") else
                   None if cuda else "the Triton kernels need CUDA (a CPU runs them only in the interpreter)")),
        Knob("fused optimizer", ["optim.fused=true"]),
        Knob("teacher BN folded", ["teacher.fold_bn=true"],
             skip=no_teacher or (None if cfg.teacher.bn_mode == "eval" else "bn_mode=train cannot fold")),
        Knob("teacher cache", [f"teacher.cache={cache_dir}", "teacher.cache_reuse=cycle", "train.epochs=1"],
             kept=False,  # one epoch of crops cached and read: a resolution ramp cannot refuse the cycling
             teacher_cache=str(cache_dir), skip=no_teacher or (None if cfg.teacher.bn_mode == "eval" else
                                                               "bn_mode=train: no cache") or
             (None if data is None else "the ImageFolder rows' crops are torchvision's: not replayable")),
        Knob("torch.compile", ["train.compile=true"]),
        *[Knob(f"loader {b}", [f"data.backend={b}", f"data.path={data.out if data else ''}"],
               skip=loader_skip(b, data), alternative=True) for b in LOADER_BACKENDS],
        Knob("CUDA graphs", cuda_graphs=True, skip=None if cuda else "CUDA graphs need a GPU"),
    ]
    unknown = skip - {k.name for k in knobs[1:]}
    if unknown:
        raise FastcdError(f"--skip: unknown knob {sorted(unknown)[0]!r}; choose from "
                          f"{', '.join(k.name for k in knobs[1:])}")
    for k in knobs[1:]:
        if k.name in skip and not k.skip:
            k.skip = "skipped by --skip"
    return knobs


def feed_knobs(data: PreparedData, cuda: bool) -> list[Knob]:
    """`--feed`: the step on on-device data, then the same step fed by the torch backend decoding on the
    device; both compiled with CUDA graphs on a GPU (eager on a CPU, where compiling costs more than it buys)."""
    fast = ["train.compile=true"] if cuda else ["train.compile=false"]
    return [Knob("on-device data", [*fast, "data.backend=synthetic"], kept=False, cuda_graphs=cuda),
            Knob("torch loader, device decode", [*fast, "data.backend=torch", f"data.path={data.out}",
                                                 "data.decode=device"], kept=False, cuda_graphs=cuda)]


def feed_summary(rows: list[dict]) -> str:
    """The fed step against the on-device step: img/s ratio and the data wait, from CUDA events (or the host
    clock) and as wall time per step over the on-device step's. Adds `wait_ms_per_step` to the fed row."""
    on_device, fed = rows
    if on_device["status"] != "ok" or fed["status"] != "ok":
        return "feed: a row failed; no comparison"
    fed["wait_ms_per_step"] = round(fed["wall_ms_per_step"] - on_device["wall_ms_per_step"], 3)
    return (f"fed step {fed['images_per_s']:.0f} img/s = {fed['images_per_s'] / on_device['images_per_s']:.2f}x the "
            f"on-device step ({on_device['images_per_s']:.0f}); data wait {100 * fed['data_share']:.1f}% of the "
            f"step (events), {fed['wait_ms_per_step']:.2f} ms per step over the on-device step (wall)")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Bar plot of images/s per knob (skipped knobs drawn empty and labelled), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    names = [r["knob"] for r in rows][::-1]
    speeds = [r.get("images_per_s", 0.0) for r in rows][::-1]
    bars = ax.barh(names, speeds, color=["tab:blue" if s else "lightgrey" for s in speeds])
    for bar, r in zip(bars, rows[::-1]):
        label = f" {r['images_per_s']:.0f}" if r["status"] == "ok" else f" {r['status']}"
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=8)
    ax.set_xlabel("images/s (full distillation step)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(run: dict, path: Path) -> None:
    """`<path stem>[-loader].md` (settings and table) and, for an ablation, `.png` beside the JSON `path`."""
    base = path.with_name(path.stem + ("-loader" if run["data"] == "loader" else ""))
    title = (f"{Path(run['config']).name}: batch {run['batch']}, {run['res']} px, {run['student']} <- "
             f"{run['teacher']}, {run.get('gpu', 'CPU')}, {run['data']} data")
    settings = {k: v for k, v in run.items() if k not in ("rows", "ablation")}
    report = (f"# Training step, {title}\n\nsettings: `{settings}`\n\n{table(run['rows'])}\n\nimg/s is over the "
              "wall clock of the timed steps; each row keeps the knobs above it; 'vs previous' is what its knob bought "
              "(the loader rows replace one another and are each compared with the row before them). The phases are "
              "medians; 'data %' is the mean data wait over the mean step. Host peak memory is the process's peak "
              "so far.\n")
    atomic_write_bytes(base.with_suffix(".md"), report.encode())
    if run["ablation"]:
        plot(run["rows"], base.with_suffix(".png"), title)
    print(f"recorded to {path} (+ {base.name}.md{', .png' if run['ablation'] else ''})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML, e.g. configs/imagenet/<one>.yaml")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CPU, 50 on GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before (3 CPU, 15 GPU)")
    parser.add_argument("--data", choices=["synthetic", "loader"], default="synthetic",
                        help="synthetic: on-device data, no decode; loader (with --ablation): generated JPEGs "
                             "read by ImageFolder, then by each prepared-data backend")
    parser.add_argument("--data-path", default="", help="prepared OUT folder for --data loader (generated from "
                        "--images JPEGs when it holds no manifest; default: cached under the temp folder)")
    parser.add_argument("--images", type=int, default=1024, help="JPEGs to generate for --data loader "
                        "(default %(default)s)")
    add_set_argument(parser, "config override (after the CPU size defaults)")
    parser.add_argument("--ablation", action="store_true", help="the original, then one knob at a time")
    parser.add_argument("--feed", action="store_true", help="with --data loader: the step on on-device data, "
                        "then fed by the torch backend's device decode (compiled, CUDA graphs on a GPU)")
    parser.add_argument("--skip", default="", help="comma list of ablation knobs to skip, e.g. torch.compile")
    add_out_argument(parser)


def _base_config(args: argparse.Namespace, cuda: bool, data: PreparedData | None) -> tuple[Config, list[str]]:
    """The benchmarked config (random teacher, CPU size defaults, data, the user's --set), its overrides. The
    defaults' `teacher.*` fields are dropped for a config without a teacher; the user's are not."""
    defaults = ["teacher.weights=none", "train.progress=false"]
    defaults += [] if cuda else ["train.device=cpu", *CPU_DEFAULTS]
    defaults += [f"{part}.num_classes={data.classes}" for part in ("student", "teacher")] if data else []
    if not data:
        defaults.append("data.backend=synthetic")
    overrides = [*drop_overrides_into_null(args.config, defaults), *args.overrides]
    return load_config(args.config, overrides), overrides


def run(args: argparse.Namespace) -> int:
    cuda = torch.cuda.is_available() and "train.device=cpu" not in args.overrides
    steps = args.steps or (50 if cuda else 20)
    warmup = args.warmup if args.warmup is not None else (15 if cuda else 3)
    data = prepared_data(args.data_path, args.images) if args.data == "loader" else None
    if args.feed and (args.ablation or not data):
        raise FastcdError("--feed compares loader-fed and on-device steps: use it with --data loader, "
                          "without --ablation")
    if data and not (args.ablation or args.feed):
        raise FastcdError("--data loader without --ablation or --feed: set data.backend/data.path with --set instead")
    cfg, overrides = _base_config(args, cuda, data)
    with tempfile.TemporaryDirectory(prefix="fastcd-bench-teacher-cache-") as cache_dir:
        if args.feed:
            knobs = feed_knobs(data, cuda)
        elif args.ablation:
            knobs = ablation(cfg, cuda, data, set(filter(None, args.skip.split(","))), Path(cache_dir))
        else:
            knobs = [Knob("config")]
        rows = run_knobs(knobs, args.config, overrides, warmup, steps)
    text = table(rows)
    print("\n" + text)
    if args.feed:
        print(feed_summary(rows))
    ok = [r for r in rows if r["status"] == "ok"]
    best = max(ok[1:], key=lambda r: r["vs_previous"], default=None) if args.ablation else None
    if best:
        print(f"\nknob that bought the most: {best['knob']} ({best['vs_previous']:.2f}x over the row before)")
    settings = {"config": str(args.config), "overrides": overrides, "data": args.data, "steps": steps,
                "torch_threads": torch.get_num_threads(), "load_avg": [round(v, 2) for v in os.getloadavg()],
                "warmup": warmup, "batch": cfg.data.batch_size, "res": cfg.data.res,
                "student": f"{cfg.student.arch} x{cfg.student.width}",
                "teacher": f"{cfg.teacher.arch} x{cfg.teacher.width}" if cfg.teacher else None}
    path = record("train-feed" if args.feed else "train", {**settings, "ablation": args.ablation, "rows": rows,
                            "best_knob": best["knob"] if best else None},
                  args.out)
    write_report({**machine_info(), **settings, "ablation": args.ablation, "rows": rows}, path)
    return 0
