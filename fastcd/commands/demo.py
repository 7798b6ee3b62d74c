"""The main job, sized for about 13 minutes on an idle 2-core CPU: on Fashion-MNIST (10 000 training images),
train a narrow ResNet-34 teacher once (width 1/4, 8 epochs), then, on each of 3 seeds, a narrower ResNet-18
student (width 1/8, 5 epochs) alone and with CD+GKD+EDT, the CD+GKD+EDT row reading the teacher's targets
from a teacher cache written once per seed. Prints the seed-format table (mean ± stdev over the seeds), the
paired difference CD+GKD+EDT - student alone with its 95% interval, the share of the teacher's lead it closed
with its interval, and a last line saying on how many seeds CD+GKD+EDT beat the student alone.

The CPU runs in fp32 (train.amp auto: bf16 only on a GPU). A teacher folder that already holds a finished
run of the same config is reused (and the table says so); `--fresh-teacher` retrains it.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

from fastcd.config import add_set_argument, at_least_one
from fastcd.errors import FastcdError
from fastcd.experiments import TEACHER, Experiment, Result, cpu_seconds, run_experiments, table_rows
from fastcd.paths import configs_dir
from fastcd.report import Row, mean_interval, mean_sd, paired, seed_table
from fastcd.utils.atomic import atomic_write_bytes

CONFIGS = configs_dir() / "fashion-mnist"
STUDENT, DISTILLED = "s_resnet18.baseline", "s_resnet18.t_resnet34.cd.kdv2.lrdv2"
RUNS = [Experiment(TEACHER, "t_resnet34", "teacher, alone"), Experiment(STUDENT, "ResNet18-B", "student alone"),
        Experiment(DISTILLED, DISTILLED, "CD+GKD+EDT")]
SEEDS, TEACHER_EPOCHS, TRAIN_SUBSET = 3, 8, 10000  # students: their configs' 5 epochs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="folder for the runs and table.md (default runs/demo)")
    parser.add_argument("--seeds", type=at_least_one, default=SEEDS, help=f"seeds of the students (default {SEEDS}; "
                        "2 or more for an interval)")
    parser.add_argument("--epochs", type=at_least_one, default=None, help="epochs of the two students (default: the "
                        "configs', 5)")
    parser.add_argument("--teacher-epochs", type=at_least_one, default=TEACHER_EPOCHS, help="epochs of the teacher "
                        f"(default {TEACHER_EPOCHS})")
    parser.add_argument("--train-subset", type=at_least_one, default=TRAIN_SUBSET, help="training images (default "
                        f"{TRAIN_SUBSET})")
    add_set_argument(parser, "override applied to every run")
    parser.add_argument("--force", action="store_true", help="replace the runs a previous demo left in --out "
                        "(a finished teacher of the same config is still reused)")
    parser.add_argument("--fresh-teacher", action="store_true", help="retrain the teacher even when a finished "
                        "run of the same config is in --out (needs --force to replace it)")


def _row(rows: list[Row], exp: Experiment) -> Row:
    return next(r for r in rows if r.name == exp.label)


def _seeds(seeds: list[int | None]) -> str:
    return ", ".join(str(s) for s in seeds)


def _interval(mean: float, half: float, unit: str = "") -> str:
    """`m [lo, hi]` (signed, 2 decimals) or, with `unit` "%", whole percents; just `m` without an interval."""
    fmt = (lambda v: f"{v:.0f}%") if unit == "%" else (lambda v: f"{v:+.2f}")
    return fmt(mean) if math.isnan(half) else f"{fmt(mean)} [{fmt(mean - half)}, {fmt(mean + half)}]"


def summary(rows: list[Row]) -> list[str]:
    """The paired difference CD+GKD+EDT - student alone, the gap closed (both with 95% intervals), and the
    last line: on how many seeds CD+GKD+EDT beat the student alone, by how much, and whether that is resolved."""
    teacher, student, distilled = (_row(rows, e) for e in RUNS)
    diff = paired(distilled, student)
    seeds = [s for s in distilled.seeds if s in student.seeds]
    lines = [f"- CD+GKD+EDT - student alone, top-1 error, same seed: {_interval(diff.mean, diff.half_width)} "
             f"(mean [95% interval]; per seed: {', '.join(f'{d:+.2f}' for d in diff.diffs)})"]
    by_seed = dict(zip(student.seeds, student.top1))
    leads = [by_seed[s] - teacher.top1[0] for s in seeds]
    if min(leads) <= 0:
        lines.append(f"- the teacher ({teacher.top1[0]:.2f}, one run) does not lead the student alone on every seed "
                     f"(lead per seed: {', '.join(f'{v:+.2f}' for v in leads)}), so there is no gap-closed share")
    else:
        shares = [100 * -d / lead for d, lead in zip(diff.diffs, leads)]
        lines.append(f"- the teacher ({teacher.top1[0]:.2f}, one run) leads the student alone by {mean_sd(leads)} "
                     f"points; CD+GKD+EDT closed {mean_sd([-d for d in diff.diffs])} of them, "
                     f"{_interval(*mean_interval(shares), unit='%')} of the gap (mean [95% interval]; per seed: "
                     f"{', '.join(f'{round(v)}%' for v in shares)})")
    wins = [s for s, d in zip(seeds, diff.diffs) if d < 0]
    lost = [s for s in seeds if s not in wins]
    spread = f" ± {statistics.stdev(diff.diffs):.2f}" if len(diff.diffs) > 1 else ""
    by = (f"by {-diff.mean:.2f}{spread} points of top-1 error" if diff.mean < 0
          else f"and was {diff.mean:.2f}{spread} points of top-1 error worse")
    not_on = f" (not on seed{'s' if len(lost) > 1 else ''} {_seeds(lost)})" if lost and wins else ""
    line = (f"CD+GKD+EDT beat the student alone on {len(wins)} of {len(seeds)} seeds{not_on}, {by} (mean ± stdev "
            "over seeds); ")
    if diff.verdict == "one seed":
        line += "one seed gives no interval (--seeds 3 or more)."
    elif diff.verdict == "better":
        line += "the 95% interval of the difference excludes 0."
    else:
        line += f"the 95% interval of the difference {'holds' if diff.verdict == 'same' else 'is above'} 0, " \
                f"so at {len(seeds)} seeds the demo does not show that CD+GKD+EDT helps."
    return [*lines, "", line]


def heading(results: list[Result], seeds: list[int], minutes: float, cpu_minutes: float) -> str:
    """The settings line above the table: data, epochs, seeds, the teacher cache and the time taken."""
    cfg = {r.experiment.key: r.config for r in results}
    data = cfg[STUDENT].data
    cache = sum(r.cache_seconds for r in results) / 60
    return (f"Fashion-MNIST, {data.train_subset or 60000} training images; top-1/top-5 error on "
            f"{data.val_subset or 10000} test images after the last epoch. Teacher {cfg[TEACHER].train.epochs} "
            f"epochs, trained once; students {cfg[STUDENT].train.epochs} epochs on seeds {_seeds(seeds)} (mean ± "
            f"stdev over the seeds; wall-clock per run); CD+GKD+EDT reads the teacher's targets from a cache "
            f"written once per seed ({cache:.1f} min in all). Total {minutes:.1f} min wall-clock, "
            f"{cpu_minutes:.1f} min CPU time.")


def run(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise FastcdError(f"--seeds must be at least 1, got {args.seeds}")
    out = Path(args.out)
    common = [f"data.train_subset={args.train_subset}", *args.overrides]
    students = (f"train.epochs={args.epochs}",) if args.epochs is not None else ()
    runs = [Experiment(e.key, e.label, e.method, (f"train.epochs={args.teacher_epochs}",) if e.key == TEACHER
                       else students) for e in RUNS]
    seeds = list(range(args.seeds))
    start, cpu = time.perf_counter(), cpu_seconds()
    results = run_experiments(CONFIGS, runs, out, common, seeds, force=args.force, fresh_teacher=args.fresh_teacher,
                              teacher_cache=True, shared_teacher=True)
    minutes, cpu_minutes = (time.perf_counter() - start) / 60, (cpu_seconds() - cpu) / 60
    rows = table_rows(results)
    lines = [heading(results, seeds, minutes, cpu_minutes), "", seed_table(rows), ""]
    if results[0].reused:
        lines.append(f"The teacher was not retrained: {results[0].config.out_path} already held a finished run of "
                     "the same config (--fresh-teacher --force retrains it).")
    text = "\n".join([*lines, *summary(rows)])
    atomic_write_bytes(out / "table.md", (text + "\n").encode())
    print(f"\nruns: {results[0].config.out_path} (the teacher) and {out / 'seed<N>'} (each seed's students and "
          f"teacher cache); this table: {out / 'table.md'}\n")
    print(text)
    return 0
