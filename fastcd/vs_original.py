"""Accuracy at reduced wall clock: the original pipeline against fastcd's fastest path, on the same data.

`fastcd repro fashion-mnist --vs-original`:
1. writes Fashion-MNIST as a JPEG ImageNet-layout tree (`fastcd.data.fashion_mnist_jpeg`) and prepares it
   once with `fastcd prepare` (timed, and not counted per run: it is done once per dataset);
2. trains one teacher (fastcd, on the idx files; reused when a finished run of the same config is there);
3. measures, in a spawned process, what each knob buys per training step (the per-knob breakdown, from
   `fastcd.knobs`, as `fastcd bench train` runs them): the original, then the teacher's BatchNorm in eval mode, folded,
   channels_last, bf16 autocast, the fused optimizer, then each prepared-data loader backend;
4. trains CD+GKD+EDT once per seed with each pipeline, interleaved (original, fastcd, next seed), so load
   that drifts during the run falls on both:
   - the original, as the seed's code ran it: ImageFolder + PIL over the JPEG files, fp32, NCHW, eager
     losses, the teacher's BatchNorm in train mode (batch statistics), unfused SGD;
   - fastcd: the prepared shards through the fastest loader backend of the breakdown among those that replay
     fastcd's crops, and each knob unless the breakdown found it more than NOISE slower (without a breakdown,
     `FAST_DEFAULT`);
5. writes `<report-dir>/vs-original-fashion-mnist-<date>.md` (and the JSON record): top-1/top-5 error
   (mean ± stdev), wall-clock and CPU time per run for both, their ratio, the paired accuracy difference,
   and the breakdown.
"""
from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import statistics
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from fastcd.config import load_config
from fastcd.data.base import REPLAYS_CROPS
from fastcd.data.fashion_mnist_jpeg import write_jpeg_tree
from fastcd.errors import FastcdError
from fastcd.experiments import TEACHER, Experiment, Result, cpu_seconds, run_experiments, table_rows
from fastcd.knobs import Knob, impl_overrides, run_knobs, table
from fastcd.paths import configs_dir
from fastcd.report import Row, mean_sd, paired
from fastcd.reproduction import command_line, epochs_for, machine_line
from fastcd.utils.atomic import atomic_write_bytes
from fastcd.utils.lifeline import end_with_parent

CONFIGS = configs_dir() / "fashion-mnist"
DISTILLED = "s_resnet18.t_resnet34.cd.kdv2.lrdv2"
LOADERS = ("torch", "ffcv", "dali")
# The speed knobs, in the order the breakdown adds them (each row keeps the ones before).
KNOBS = [("teacher BN eval", ("teacher.bn_mode=eval",)), ("teacher BN folded", ("teacher.fold_bn=true",)),
         ("channels_last", ("train.channels_last=true",)), ("autocast bf16", ("train.amp=bf16",)),
         ("fused optimizer", ("optim.fused=true",))]
# fastcd's path without a breakdown: every knob and the dali backend, the fastest on the 2-core CPU in
# one-thread CPU-time trials (docs/benchmarks.md).
FAST_DEFAULT = ("dali", [o for _, knob in KNOBS for o in knob])
# The breakdown's figures the choice reads, of the median step: images/s and the ratio to the row before
SPEED, GAIN = "images_per_s_median_step", "vs_previous_median_step"
NOISE = 0.03  # a knob is left out only when the breakdown found it slower by more than this (20-step timings)


def distilled_impl(impl: str) -> list[str]:
    """`impl` for every loss of the distilled config that has fused kernels (eager = the original)."""
    return impl_overrides(load_config(CONFIGS / f"{DISTILLED}.yaml"), impl)


def original_overrides(tree: Path, workers: int) -> list[str]:
    """The original pipeline: ImageFolder + PIL over the JPEG tree, fp32, NCHW, eager losses, the teacher's
    BatchNorm in train mode, unfused SGD, no compile."""
    return ["data.backend=imagefolder", f"data.path={tree}", f"data.workers={workers}", "train.amp=fp32",
            "train.channels_last=false", "teacher.bn_mode=train", "teacher.fold_bn=false", "optim.fused=false",
            "train.compile=false", *distilled_impl("eager")]


def merged(overrides: list[str]) -> list[str]:
    """`key=value` overrides with each key once, at its first place, holding its last value."""
    values: dict[str, str] = {}
    for o in overrides:
        key, value = o.split("=", 1)
        values[key] = value
    return [f"{k}={v}" for k, v in values.items()]


def fast_overrides(prepared: Path, workers: int, backend: str, knobs: list[str]) -> list[str]:
    """fastcd's path: the prepared shards through `backend`, every knob off unless `knobs` turns it on."""
    return merged([f"data.backend={backend}", f"data.path={prepared}", f"data.workers={workers}", "train.amp=fp32",
                   "train.channels_last=false", "teacher.bn_mode=eval", "teacher.fold_bn=false", "optim.fused=false",
                   "train.compile=false", *distilled_impl("auto"), *knobs])


@dataclass
class Choice:
    """fastcd's path: the loader backend, the knob overrides, and why (one line per knob)."""

    backend: str
    knobs: list[str]
    reasons: list[str]


def breakdown(common: list[str], tree: Path, prepared: Path, workers: int, steps: int) -> list[dict]:
    """Images/s of the training step: the original, then each knob on top of the ones before, then each
    prepared-data backend in place of ImageFolder (`fastcd.knobs.run_knobs`; a random teacher).
    Measured in a spawned process, so the loaders' threads (numba's, DALI's) and memory stay out of the
    timed runs that follow."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_breakdown, args=(send, common, tree, prepared, workers, steps), name="breakdown")
    child.start()
    send.close()
    try:
        return receive.recv()
    except EOFError:
        child.join()
        raise FastcdError(f"the per-knob breakdown's process died (exit code {child.exitcode}); rerun with "
                          "--knob-steps 0 to skip it") from None
    finally:
        child.join()


def _breakdown(send: Connection, common: list[str], tree: Path, prepared: Path, workers: int, steps: int) -> None:
    """The breakdown's rows, sent through `send` (runs in the spawned process, which ends with its parent)."""
    end_with_parent()
    knobs = [Knob("original", original_overrides(tree, workers)), *[Knob(n, list(o)) for n, o in KNOBS],
             *[Knob(f"loader {b}", [f"data.backend={b}", f"data.path={prepared}"], alternative=True)
               for b in LOADERS]]
    overrides = [*common, "teacher.weights=none"]
    send.send(run_knobs(knobs, str(CONFIGS / f"{DISTILLED}.yaml"), overrides, warmup=3, steps=steps))
    send.close()


def choose(rows: list[dict]) -> Choice:
    """From the breakdown: the fastest prepared-data backend that ran among those whose loader replays fastcd's
    crops (`data.base.REPLAYS_CROPS`: one that draws its own crops trains on other crops, which the accuracy
    goal does not allow for), and each knob unless it made the step slower than the row before it by more than
    NOISE (the teacher's eval-mode BatchNorm is fastcd's design and always kept). Both decisions read the median
    step (`SPEED`, `GAIN`): on a shared machine one stalled step of twenty would otherwise decide them."""
    by_name = {r["knob"]: r for r in rows}
    ran = [b for b in LOADERS if by_name.get(f"loader {b}", {}).get("status") == "ok"]
    speed = {b: by_name[f"loader {b}"][SPEED] for b in ran}
    eligible = [b for b in ran if REPLAYS_CROPS[b]]
    others = [f"{b} {speed[b]:.0f} img/s does not replay them" for b in ran if not REPLAYS_CROPS[b]]
    if not eligible:
        backend, _ = FAST_DEFAULT
        aside = f" ({', '.join(others)})" if others else ""
        reasons = [f"- loader: {backend} (the default): no backend that replays fastcd's crops ran in the "
                   f"breakdown{aside}"]
    else:
        backend = max(eligible, key=speed.__getitem__)
        gain = by_name[f"loader {backend}"][GAIN]
        measured = [f"{speed[backend]:.0f} img/s at the median step, {gain:.2f}x ImageFolder with the knobs above",
                    *[f"{b} {speed[b]:.0f} img/s" for b in eligible if b != backend], *others]
        reasons = [f"- loader: {backend}, the fastest backend that replays fastcd's crops ({'; '.join(measured)})"]
    knobs: list[str] = []
    for name, overrides in KNOBS:
        row = by_name.get(name, {})
        gain = row.get(GAIN) if row.get("status") == "ok" else None
        keep = name == "teacher BN eval" or (gain is not None and gain >= 1 - NOISE)
        if keep:
            knobs += overrides
        said = (f"{gain:.2f}x the row before (median step)" if gain is not None
                else f"not measured ({row.get('status', 'absent')})")
        reasons.append(f"- {name}: {said}; {'kept' if keep else 'left out'}")
    return Choice(backend, knobs, reasons)


def prepare_once(tree: Path, out: Path, workers: int) -> float:
    """`fastcd prepare tree out` unless `out` already holds its manifest; the seconds it took (0 if kept)."""
    from fastcd.data_prep.prepare import prepare

    if (out / "manifest.json").is_file():
        return 0.0
    start = time.perf_counter()
    prepare(str(tree), str(out), workers=workers, progress=False)
    return time.perf_counter() - start


def verdicts(original: Row, fast: Row) -> tuple[float, list[str]]:
    """The wall-clock ratio (fastcd / original, means over seeds) and the goal's two verdicts."""
    ratio = statistics.mean(fast.seconds) / statistics.mean(original.seconds)
    diff = statistics.mean(fast.top1) - statistics.mean(original.top1)
    spreads = [statistics.stdev(r.top1) for r in (original, fast) if len(r.top1) > 1]
    p = paired(fast, original)
    within = "one seed, so no spread to compare with"
    if spreads:
        spread = max(spreads)
        within = f"within the seed spread (largest stdev {spread:.2f}): {'yes' if abs(diff) <= spread else 'no'}"
    lines = [f"- wall-clock per run: fastcd {ratio:.3f}x the original's ({1 / ratio:.2f}x faster); goal at most "
             f"0.5x: {'met' if ratio <= 0.5 else 'not met'}",
             f"- top-1 error: fastcd {diff:+.2f} points against the original (per seed "
             f"{', '.join(f'{d:+.2f}' for d in p.diffs)}; 95% interval {p.interval()}, {p.verdict}); {within}"]
    return ratio, lines


def report(args: argparse.Namespace, rows: dict[str, Row], results: list[Result], choice: Choice,
           knob_rows: list[dict], setup: dict[str, float], common: list[str], seconds: float,
           cpu: float) -> tuple[str, float]:
    """The markdown report, and the wall-clock ratio (fastcd / original)."""
    original, fast = rows["original"], rows["fastcd"]
    teacher_epochs = setup["teacher_epochs"]
    teacher_how = ("reused from an earlier run" if setup["teacher"] == 0 else
                   f"trained once by fastcd in {setup['teacher'] / 60:.1f} min")
    packed = (f"`fastcd prepare` packed it in {setup['prepare']:.0f} s" if setup["prepare"] else
              "packed by `fastcd prepare` in an earlier run")
    ratio, goal = verdicts(original, fast)
    cpu_of = {k: [r.cpu_seconds for r in results if r.experiment.folder == k] for k in rows}
    cfg = {r.experiment.folder: r.config for r in results}
    exp = {r.experiment.folder: r.experiment for r in results}
    head = ["| Pipeline | What it runs | Top-1 error | Top-5 error | Wall-clock per run | CPU time per run |",
            "| -- | -- | -- | -- | -- | -- |"]
    for key, row in rows.items():
        head.append(f"| {row.name} | {row.method} | {mean_sd(row.top1)} | {mean_sd(row.top5)} | "
                    f"{mean_sd([s / 60 for s in row.seconds])} min | {mean_sd([c / 60 for c in cpu_of[key]])} min |")
    s = cfg["fastcd"]
    lines = [f"# Accuracy at reduced wall clock: the original pipeline against fastcd ({dt.date.today()})", "",
             machine_line(seconds, cpu), "", "## Settings", "",
             f"- command: `{command_line(args)}`; overrides common to every run: `{' '.join(common)}`",
             f"- data: the first {s.data.train_subset} Fashion-MNIST training images and {s.data.val_subset} test "
             f"images as baseline RGB JPEGs (quality 95) in an ImageNet-layout tree, written in "
             f"{setup['tree']:.0f} s; {packed}, once per dataset, not counted per run",
             f"- the task: `configs/fashion-mnist/{DISTILLED}.yaml` (CD+GKD+EDT), {s.student.arch} width "
             f"{s.student.width} student, {s.train.epochs} epochs, batch {s.data.batch_size}, {s.data.res} px; "
             f"the teacher ({s.teacher.arch} width {s.teacher.width}, {teacher_epochs} epochs on the idx files) "
             f"{teacher_how} and shared by every run",
             f"- seeds {', '.join(str(x) for x in original.seeds)}; runs interleaved (original, fastcd, next seed); "
             "wall-clock per run covers building the loaders, every epoch's training and evaluation, checkpoints",
             f"- original: `{' '.join(exp['original'].overrides)}`",
             f"- fastcd: `{' '.join(exp['fastcd'].overrides)}` (the fused loss kernels need CUDA: on a CPU "
             "`impl=auto` runs the eager losses too)", "",
             "## Results (validation, mean ± stdev over seeds)", "", *head, "", *goal, "",
             "## fastcd's path, and what each knob bought", "",
             "Per training step (images/s, in a separate process before the runs, a random teacher, each row keeping "
             "the knobs above it; the loader rows replace ImageFolder with each prepared-data backend):", "",
             *choice.reasons, ""]
    if knob_rows:
        lines += [table(knob_rows), ""]
    lines += ["## Discussion", "", "*(to be written from the numbers above by whoever commits this report)*", ""]
    return "\n".join(lines), ratio


def run_vs_original(args: argparse.Namespace) -> int:
    """The whole comparison (see the module docstring); prints the table, writes the report."""
    from fastcd.utils.results import record

    epochs, teacher_epochs = epochs_for(args)
    out = Path(args.out or "runs/vs-original-fashion-mnist")
    workers = os.cpu_count() or 1
    start, cpu = time.perf_counter(), cpu_seconds()
    tree, prepared = out / "jpeg", out / "prepared"
    write_jpeg_tree(tree, args.train_subset, args.val_subset)
    setup = {"tree": time.perf_counter() - start}
    setup["prepare"] = prepare_once(tree, prepared, workers)
    common = [f"data.train_subset={args.train_subset}", f"data.val_subset={args.val_subset}",
              f"train.epochs={epochs}", "train.progress=false", *args.overrides]
    (teacher,) = run_experiments(CONFIGS, [Experiment(TEACHER, "t_resnet34", "teacher, alone",
                                                      (f"train.epochs={teacher_epochs}",))],
                                 out, common, force=args.force, fresh_teacher=args.fresh_teacher)
    setup.update(teacher=teacher.seconds, teacher_epochs=teacher.config.train.epochs)
    knob_rows = breakdown(common, tree, prepared, workers, args.knob_steps) if args.knob_steps else []
    choice = choose(knob_rows) if knob_rows else Choice(*FAST_DEFAULT, ["- no breakdown (--knob-steps 0): "
                                                                        "the default path"])
    weights = f"teacher.weights={out / TEACHER / 'latest.pt'}"
    pipelines = [Experiment(DISTILLED, "original", "ImageFolder + PIL over JPEG, fp32, NCHW, teacher BN train, "
                            "unfused SGD", tuple(original_overrides(tree, workers)), "original"),
                 Experiment(DISTILLED, "fastcd", f"prepared shards + {choice.backend}, "
                            + ", ".join(n for n, o in KNOBS if set(o) <= set(choice.knobs)),
                            tuple(fast_overrides(prepared, workers, choice.backend, choice.knobs)), "fastcd")]
    results = run_experiments(CONFIGS, pipelines, out, [*common, weights], list(range(args.seeds)), args.force)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    rows = dict(zip((e.folder for e in pipelines), table_rows(results), strict=True))
    text, ratio = report(args, rows, results, choice, knob_rows, setup, common, seconds, cpu)
    path = Path(args.report_dir) / f"vs-original-fashion-mnist-{dt.date.today().isoformat()}.md"
    atomic_write_bytes(path, text.encode())
    record("vs-original", {"settings": {"common": common, "seeds": args.seeds, "setup_s": setup},
                           "rows": {k: {"top1": r.top1, "top5": r.top5, "seconds": r.seconds} for k, r in rows.items()},
                           "wall_ratio": ratio, "knobs": knob_rows, "backend": choice.backend,
                           "knob_overrides": choice.knobs}, args.report_dir)
    print("\n" + "\n".join(text.split("## Results")[1].split("## fastcd's path")[0].splitlines()[2:]))
    print(f"report: {path}")
    return 0
