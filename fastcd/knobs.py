"""Measure the training step under a sequence of config knobs: each knob's overrides added to the ones before,
each step run and timed exactly as `fastcd train` runs it (`fastcd.engine.step`), per phase.

Below both users: `fastcd bench train --ablation` (the knob table) and `fastcd repro --vs-original` (the
per-knob breakdown that picks fastcd's path). images/s = batch / wall clock of `steps` timed steps after
`warmup`; the phases are timed with CUDA events on a GPU, `perf_counter` on a CPU.
"""
from __future__ import annotations

import gc
import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fastcd.cache.store import CacheReader
from fastcd.cache.use import open_cache, set_train_epoch
from fastcd.cache.write import contents_for, write_cache
from fastcd.config import Config, load_config
from fastcd.data import BatchLoader, build_loader
from fastcd.engine.runtime import loader_context, seed_everything, setup_runtime
from fastcd.engine.step import PHASES as STEP_PHASES
from fastcd.engine.step import DistillStep
from fastcd.engine.trainer import build_step, loss_weights
from fastcd.errors import FastcdError
from fastcd.models import TeacherTargets
from fastcd.names import loss_entry
from fastcd.utils.results import peak_memory

PHASES = ("data", *STEP_PHASES)


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
        targets = set_train_epoch(cfg, loader, cache, epoch, 0, device)
        yield from zip(loader, itertools.repeat(None) if targets is None else targets)
        epoch += 1


def _build_step(cfg: Config, cuda_graphs: bool) -> tuple[DistillStep, BatchLoader]:
    """The training step of `cfg` (as `fastcd train` builds it) and its train loader."""
    rt = setup_runtime(cfg)
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


def impl_overrides(cfg: Config, impl: str) -> list[str]:
    """`impl` for every loss that has a fused implementation."""
    return [f"loss_list.{i}.impl={impl}" for i, s in enumerate(cfg.loss_list)
            if "impl" in loss_entry(s.loss_name).params]


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
        for key, rate in (("vs_previous", "images_per_s"), ("vs_previous_median_step", "images_per_s_median_step")):
            result[key] = round(result[rate] / reference[rate], 3) if reference else 1.0
        if knob.kept:
            previous = result
        rows.append({"knob": knob.name, "status": "ok", "overrides": list(knob.overrides),
                     "cuda_graphs": knob.cuda_graphs, **result})
        print(f"{knob.name:20s} {result['images_per_s']:9.1f} img/s  step {result['step_ms']:.1f} ms  "
              + "  ".join(f"{k} {v:.1f}" for k, v in result["phases_ms"].items()))
    return rows
