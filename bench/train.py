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
import gc
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fastcd.bench.prepare import generated_dataset, importable
from fastcd.cache.store import CacheReader
from fastcd.cache.use import cache_epoch, open_cache
from fastcd.cache.write import contents_for, write_cache
from fastcd.config import Config, add_set_argument, drop_overrides_into_null, load_config
from fastcd.data import BatchLoader, build_loader
from fastcd.engine.runtime import loader_context, seed_everything, setup_runtime
from fastcd.engine.step import PHASES as STEP_PHASES
from fastcd.engine.step import DistillStep
from fastcd.engine.trainer import build_step, loss_weights
from fastcd.errors import FastcdError
from fastcd.losses.registry import loss_params
from fastcd.models import TeacherTargets
from fastcd.utils.atomic import atomic_path, atomic_write_bytes
from fastcd.utils.machine import machine_info
from fastcd.utils.results import add_out_argument, peak_memory, record

PHASES = ("data", *STEP_PHASES)
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


@dataclass
class Knob:
    """One row of the ablation: config overrides added to the previous row's, or the reason it is skipped."""

    name: str
    overrides: list[str] = field(default_factory=list)
    cuda_graphs: bool = False
    skip: str | None = None
    alternative: bool = False  # one of a group of alternatives (loaders): compared with the row before the group
    kept: bool = True  # False: measured on top of the rows above, not carried into the rows below
    teacher_cache: str = ""  # a cache folder to write for the row's config (without the cache) first


class PhaseClock:
    """Marks between phases: CUDA events on a GPU (read after one sync at the end), perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.steps: list[list] = []
        self.marks: list = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self) -> None:
        self.marks.append(self._now())

    def end_step(self, keep: bool) -> None:
        if keep:
            self.steps.append(self.marks)
        self.marks = []

    def phase_ms(self) -> list[list[float]]:
        """Per kept step, the milliseconds of each phase (syncs with the GPU once)."""
        if self.cuda:
            torch.cuda.synchronize()  # intentional sync: after the timed loop
            return [[a.elapsed_time(b) for a, b in zip(m, m[1:])] for m in self.steps]
        return [[(b - a) * 1e3 for a, b in zip(m, m[1:])] for m in self.steps]


def _endless(loader: BatchLoader, cfg: Config, cache: CacheReader | None,
             device: torch.device) -> Iterator[tuple[tuple[Tensor, Tensor], TeacherTargets | None]]:
    """Epoch after epoch of ((images, labels), the teacher's cached targets or None), as the trainer reads them."""
    epoch = 0
    while True:
        replayed = cache_epoch(cfg, cache, epoch) if cache else epoch
        loader.set_epoch(replayed)
        targets = cache.batches(replayed, loader.batch_indices(), device) if cache else itertools.repeat(None)
        yield from zip(loader, targets)
        epoch += 1


def _build_step(cfg: Config, cuda_graphs: bool) -> tuple[DistillStep, BatchLoader]:
    """The training step of `cfg` (as `fastcd train` builds it) and its train loader."""
    rt = setup_runtime(cfg.train)
    seed_everything(cfg.train.seed)
    loader = build_loader(cfg.data, "train", loader_context(cfg, rt))
    if len(loader) == 0:
        raise FastcdError(f"data.batch_size={cfg.data.batch_size} exceeds the {loader.num_samples} "
                          "training samples")
    mode = "reduce-overhead" if cuda_graphs else ("default" if cfg.train.compile else None)
    _, step = build_step(cfg, rt, len(loader), compile_mode=mode)
    step.set_weights(loss_weights(cfg, cfg.train.epochs))  # every loss on, whatever the EDT epoch
    return step, loader


def measure(cfg: Config, warmup: int, steps: int, cuda_graphs: bool = False) -> dict:
    """Time `warmup + steps` steps of `cfg`: images/s over their wall clock, the median and mean step, each
    phase's median and mean milliseconds and the data wait's share of the mean step. With `cuda_graphs`,
    two more steps run under the profiler to count the CUDA graphs they launched."""
    step, loader = _build_step(cfg, cuda_graphs)
    cuda = step.rt.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cache = None
    if cfg.teacher is not None and cfg.teacher.cache:
        cache = open_cache(cfg, loader, {name for loss in step.losses for name in loss.inputs})
    clock, batches = PhaseClock(step.rt.device), _endless(loader, cfg, cache, step.rt.device)

    def one_step(keep: bool) -> None:
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        clock.mark()
        (images, labels), targets = next(batches)
        clock.mark()
        step.run(images, labels, clock.mark, targets)  # the trainer's step; the clock marks its phases
        clock.end_step(keep)

    batch = cfg.data.batch_size
    wall = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()  # intentional sync: start of the timed steps
            wall = time.perf_counter()
        one_step(keep=i >= warmup)
    if cuda:
        torch.cuda.synchronize()  # intentional sync: end of the timed steps
    wall = time.perf_counter() - wall
    per_step = clock.phase_ms()
    step_ms = [sum(p) for p in per_step]
    phases = {name: round(statistics.median(p[k] for p in per_step), 3) for k, name in enumerate(PHASES)}
    means = {name: round(statistics.mean(p[k] for p in per_step), 3) for k, name in enumerate(PHASES)}
    median, mean = statistics.median(step_ms), statistics.mean(step_ms)
    # images/s over the wall clock of the timed steps: stalls (a loader's epoch start, a slow batch) count
    result = {"images_per_s": round(batch * steps / wall, 1),
              "images_per_s_median_step": round(batch / (median / 1e3), 1), "step_ms": round(median, 3),
              "step_ms_mean": round(mean, 3), "wall_ms_per_step": round(wall * 1e3 / steps, 3),
              "phases_ms": phases, "phases_ms_mean": means, "data_share": round(means["data"] / mean, 4),
              **peak_memory()}
    if cuda_graphs:
        result["cuda_graph_launches"] = graph_launches(lambda: one_step(keep=False))
    return result


def graph_launches(one_step: Callable[[], None], steps: int = 2) -> int:
    """How many CUDA graphs `steps` calls of `one_step` launch (0: compiled code ran without graphs)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            one_step()
        torch.cuda.synchronize()  # intentional sync: end of the profiled steps
    return sum(e.count for e in prof.key_averages() if "cudaGraphLaunch" in e.key)


def _free() -> None:
    gc.collect()
    torch.compiler.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _impl_overrides(cfg: Config, impl: str) -> list[str]:
    """`impl` for every loss that has a fused implementation."""
    return [f"loss_list.{i}.impl={impl}" for i, s in enumerate(cfg.loss_list)
            if "impl" in loss_params(s.loss_name)]


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
                *_impl_overrides(cfg, "eager"), *(["teacher.fold_bn=false"] if cfg.teacher else [])]
    if data:
        original += ["data.backend=imagefolder", f"data.path={data.src}"]
    no_teacher = "no teacher in this config" if cfg.teacher is None else None
    knobs = [
        Knob("original", original),
        Knob("channels_last", ["train.channels_last=true"]),
        Knob("autocast bf16", ["train.amp=bf16"]),
        Knob("fused losses", _impl_overrides(cfg, "auto"),
             skip=("no loss of this config has a fused kernel" if not _impl_overrides(cfg, "auto") else
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


def _row_line(row: dict, base: float | None) -> str:
    if row["status"] != "ok":
        return f"| {row['knob']} | {row['status']}: {row['reason']} |" + " |" * 13
    p = row["phases_ms"]
    shares = " | ".join(f"{p[k]:.1f}" for k in PHASES)
    gpu = f"{row['gpu_peak_mib']:.0f}" if "gpu_peak_mib" in row else "-"
    return (f"| {row['knob']} | {row['images_per_s']:.0f} | {row['images_per_s'] / base:.2f}x | "
            f"{row['vs_previous']:.2f}x | {row['step_ms']:.1f} | {row['step_ms_mean']:.1f} | {shares} "
            f"| {100 * row['data_share']:.1f} | {row['host_peak_mib']:.0f} | {gpu} |")


def table(rows: list[dict]) -> str:
    """Markdown: images/s (wall clock), ratio to the original and to the previous row, median and mean step
    ms, median ms per phase, the data wait's share of the mean step, peak memory."""
    base = next((r["images_per_s"] for r in rows if r["status"] == "ok"), None)
    head = ("| knob | img/s | vs original | vs previous | step ms (median) | step ms (mean) | "
            + " | ".join(f"{p} ms" for p in PHASES) + " | data % | host peak MiB | GPU peak MiB |")
    lines = [head, "|" + " -- |" * (head.count("|") - 1)]
    lines += [_row_line(r, base) for r in rows]
    return "\n".join(lines)


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
    parser.add_argument("--images", type=int, default=1024, help="JPEGs to generate for --data loader")
    add_set_argument(parser, "config override (after the CPU size defaults)")
    parser.add_argument("--ablation", action="store_true", help="the original, then one knob at a time")
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


def run_knobs(knobs: list[Knob], config: str, overrides: list[str], warmup: int, steps: int) -> list[dict]:
    """Measure the knobs in order, each on top of the ones before; an interrupt (Ctrl-C, `timeout`) keeps
    the rows done so far and marks the rest."""
    rows: list[dict] = []
    added: list[str] = []
    previous = before_group = None
    for i, knob in enumerate(knobs):
        if knob.skip:
            rows.append({"knob": knob.name, "status": "skipped", "reason": knob.skip})
            print(f"{knob.name:20s} skipped: {knob.skip}")
            continue
        try:
            if knob.teacher_cache:
                live = load_config(config, overrides + added)
                write_cache(live, Path(knob.teacher_cache), 1, contents_for(live))
            result = measure(load_config(config, overrides + added + knob.overrides), warmup, steps,
                             knob.cuda_graphs)
        except (FastcdError, RuntimeError, ImportError) as e:
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            rows.append({"knob": knob.name, "status": "failed", "reason": reason})
            print(f"{knob.name:20s} failed: {reason}")
            continue
        except KeyboardInterrupt:
            rows += [{"knob": k.name, "status": "interrupted", "reason": "interrupted"} for k in knobs[i:]]
            print(f"interrupted at {knob.name!r}; recording the rows done")
            break
        finally:
            _free()
        if knob.cuda_graphs and not result.get("cuda_graph_launches"):
            rows.append({"knob": knob.name, "status": "failed", **result,
                         "reason": "no CUDA graph was launched: torch.compile ran its kernels one by one"})
            print(f"{knob.name:20s} failed: no CUDA graph was launched")
            continue
        if knob.kept:
            added += knob.overrides
        if not knob.alternative:
            before_group = None
        elif before_group is None:
            before_group = previous
        reference = before_group if knob.alternative else previous
        result["vs_previous"] = round(result["images_per_s"] / reference, 3) if reference else 1.0
        if knob.kept:
            previous = result["images_per_s"]
        rows.append({"knob": knob.name, "status": "ok", "overrides": list(knob.overrides),
                     "cuda_graphs": knob.cuda_graphs, **result})
        print(f"{knob.name:20s} {result['images_per_s']:9.1f} img/s  step {result['step_ms']:.1f} ms  "
              + "  ".join(f"{k} {v:.1f}" for k, v in result["phases_ms"].items()))
    return rows


def run(args: argparse.Namespace) -> int:
    cuda = torch.cuda.is_available() and "train.device=cpu" not in args.overrides
    steps = args.steps or (50 if cuda else 20)
    warmup = args.warmup if args.warmup is not None else (15 if cuda else 3)
    data = prepared_data(args.data_path, args.images) if args.data == "loader" else None
    if data and not args.ablation:
        raise FastcdError("--data loader without --ablation: set data.backend/data.path with --set instead")
    cfg, overrides = _base_config(args, cuda, data)
    with tempfile.TemporaryDirectory(prefix="fastcd-bench-teacher-cache-") as cache_dir:
        knobs = ablation(cfg, cuda, data, set(filter(None, args.skip.split(","))), Path(cache_dir)) \
            if args.ablation else [Knob("config")]
        rows = run_knobs(knobs, args.config, overrides, warmup, steps)
    text = table(rows)
    print("\n" + text)
    ok = [r for r in rows if r["status"] == "ok"]
    best = max(ok[1:], key=lambda r: r["vs_previous"], default=None)
    if best:
        print(f"\nknob that bought the most: {best['knob']} ({best['vs_previous']:.2f}x over the row before)")
    settings = {"config": str(args.config), "overrides": overrides, "data": args.data, "steps": steps,
                "torch_threads": torch.get_num_threads(), "load_avg": [round(v, 2) for v in os.getloadavg()],
                "warmup": warmup, "batch": cfg.data.batch_size, "res": cfg.data.res,
                "student": f"{cfg.student.arch} x{cfg.student.width}",
                "teacher": f"{cfg.teacher.arch} x{cfg.teacher.width}" if cfg.teacher else None}
    path = record("train", {**settings, "ablation": args.ablation, "rows": rows,
                            "best_knob": best["knob"] if best else None},
                  args.out)
    write_report({**machine_info(), **settings, "ablation": args.ablation, "rows": rows}, path)
    return 0
