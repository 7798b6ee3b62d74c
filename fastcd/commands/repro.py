"""`fastcd repro fashion-mnist`: the seed's table, reproduced on real data within a wall-clock budget.

For each seed: a narrow ResNet-34 teacher, then ResNet-18 students alone, with KD, CD, CD+GKD and
CD+GKD+EDT (and AT, FitNets, RKD when their configs load), every student with the same data, epochs
and schedule (the loss-decay milestones scale with the epochs). Writes a report — settings, the seed's
table with mean ± stdev over seeds, each row against the student alone, and a PNG of validation error
over epochs — to `<report-dir>/repro-fashion-mnist-<date>.md/.png`.

Default size (calibrated on the 2-core CPU machine while it was shared, so the timings were pessimistic):
6000 training images, 5000 test images, 32 px, width 1/4, 6 student epochs and 9 teacher epochs for
the 25-minute budget; `--budget-minutes` scales the epochs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time
from pathlib import Path

from fastcd.config import add_set_argument
from fastcd.errors import FastcdError
from fastcd.experiments import Experiment, Result, experiment_config, run_experiments, table_rows
from fastcd.paths import configs_dir, results_dir
from fastcd.report import Row, seed_table
from fastcd.utils.atomic import atomic_path, atomic_write_bytes
from fastcd.utils.machine import machine_info

CONFIGS = configs_dir() / "fashion-mnist"
ROWS = [Experiment("teacher", "t_resnet34 (teacher, alone)"),
        Experiment("student", "s_resnet18 (student alone)"),
        Experiment("kd", "s_resnet18.t_resnet34.kd.ce (KD)"),
        Experiment("cd", "s_resnet18.t_resnet34.cd.ce (CD)"),
        Experiment("cd_gkd", "s_resnet18.t_resnet34.cd.kdv2 (CD+GKD)"),
        Experiment("cd_gkd_edt", "s_resnet18.t_resnet34.cd.kdv2.lrdv2 (CD+GKD+EDT)")]
OPTIONAL = [Experiment("at", "s_resnet18.t_resnet34.at (AT)"),
            Experiment("fitnets", "s_resnet18.t_resnet34.fitnets (FitNets)"),
            Experiment("rkd", "s_resnet18.t_resnet34.rkd (RKD)")]
BUDGET_MINUTES, EPOCHS, TEACHER_EPOCH_RATIO = 25.0, 6, 1.5  # 6 student epochs fit 25 minutes here
TRAIN_SUBSET, VAL_SUBSET = 6000, 5000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=["fashion-mnist"], help="the real data set (Debian package)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per row (default 2; at least 2 for a spread)")
    parser.add_argument("--budget-minutes", type=float, default=BUDGET_MINUTES,
                        help=f"wall-clock target; scales the epochs ({EPOCHS} student epochs for "
                             f"{BUDGET_MINUTES:g} min)")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default: from the budget)")
    parser.add_argument("--teacher-epochs", type=int, default=None,
                        help=f"teacher epochs (default {TEACHER_EPOCH_RATIO:g}x the students')")
    parser.add_argument("--train-subset", type=int, default=TRAIN_SUBSET, help="training images")
    parser.add_argument("--val-subset", type=int, default=VAL_SUBSET, help="test images evaluated each epoch")
    parser.add_argument("--out", default="runs/repro-fashion-mnist", help="folder for the runs")
    parser.add_argument("--report-dir", default=str(results_dir()), help="where the report goes")
    add_set_argument(parser, "override applied to every run")
    parser.add_argument("--force", action="store_true", help="replace the runs a previous repro left in --out")


def plan(args: argparse.Namespace) -> tuple[list[Experiment], list[str], list[str]]:
    """The rows that load (skipped optional ones are named), and the overrides common to all."""
    if args.seeds < 1:
        raise FastcdError(f"--seeds must be at least 1, got {args.seeds}")
    if args.budget_minutes <= 0:
        raise FastcdError(f"--budget-minutes must be positive, got {args.budget_minutes}")
    epochs = args.epochs or max(1, round(EPOCHS * args.budget_minutes / BUDGET_MINUTES))
    teacher_epochs = args.teacher_epochs or max(1, round(TEACHER_EPOCH_RATIO * epochs))
    common = [f"data.train_subset={args.train_subset}", f"data.val_subset={args.val_subset}",
              f"train.epochs={epochs}", "train.progress=false", *args.overrides]
    rows, skipped = [Experiment(ROWS[0].key, ROWS[0].label, (f"train.epochs={teacher_epochs}",))], []
    for exp in ROWS[1:] + OPTIONAL:
        try:
            experiment_config(CONFIGS, exp, Path(args.out), common, None)
        except FastcdError as e:
            if exp in ROWS:
                raise
            skipped.append(f"{exp.label}: {e}")
            continue
        rows.append(exp)
    return rows, common, skipped


def comparison(rows: list[Row]) -> list[str]:
    """Each distilled row against the student alone: mean top-1 change and whether it exceeds the spread."""
    base = next(r for r in rows if r.name == ROWS[1].label)
    teacher = next(r for r in rows if r.name == ROWS[0].label)
    gap = statistics.mean(base.top1) - statistics.mean(teacher.top1)
    lines = [f"- the teacher's top-1 error is {gap:.2f} points below the student alone's (a teacher barely "
             "better than its student has little to transfer; a wider gap makes the distillation rows telling)"]
    for r in rows:
        if r is base or r.name == ROWS[0].label:
            continue
        delta = statistics.mean(r.top1) - statistics.mean(base.top1)
        spread = max(statistics.stdev(r.top1) if len(r.top1) > 1 else 0.0,
                     statistics.stdev(base.top1) if len(base.top1) > 1 else 0.0)
        verdict = ("better than the student alone" if delta < -spread else
                   "worse than the student alone" if delta > spread else "within the seed spread of the student alone")
        lines.append(f"- {r.name}: top-1 error {delta:+.2f} points vs the student alone (largest seed stdev "
                     f"{spread:.2f}): {verdict}")
    return lines


def plot(results: list[Result], path: Path) -> None:
    """Validation top-1 error per epoch, mean over seeds, one line per row (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[list[float]]] = {}
    for r in results:
        curves.setdefault(r.experiment.label, []).append([h["val_top1_err"] for h in r.history])
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, runs in curves.items():
        mean = [statistics.mean(v) for v in zip(*runs)]
        ax.plot(range(1, len(mean) + 1), mean, marker="o", markersize=3, label=label,
                linestyle="--" if label == ROWS[0].label else "-")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 error (%), mean over seeds")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Fashion-MNIST reproduction")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run."""
    parts = ["fastcd repro fashion-mnist", f"--seeds {args.seeds}", f"--budget-minutes {args.budget_minutes:g}",
             f"--train-subset {args.train_subset}", f"--val-subset {args.val_subset}"]
    parts += [f"--epochs {args.epochs}"] if args.epochs else []
    parts += [f"--teacher-epochs {args.teacher_epochs}"] if args.teacher_epochs else []
    parts += [f"--set {o}" for o in args.overrides]
    return " ".join(parts)


def report(results: list[Result], args: argparse.Namespace, common: list[str], skipped: list[str],
           seconds: float, png: Path) -> str:
    """The markdown report: machine, settings, the seed-format table, the comparison, the plot."""
    info = machine_info()
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    rows = table_rows(results)
    first = {r.experiment.key: r.config for r in results}
    student, teacher = first["student"], first["teacher"]
    settings = [f"- command: `{command_line(args)}`; overrides common to every run: `{' '.join(common)}`",
                f"- data: Fashion-MNIST idx files ({student.data.path}), first {student.data.train_subset} training "
                f"images, first {student.data.val_subset} test images as validation, {student.data.res} px, "
                f"RandomResizedCrop(scale {student.data.scale_min}-1) + flip, batch {student.data.batch_size}",
                f"- student: {student.student.arch}, {student.student.stem} stem, width {student.student.width}; "
                f"teacher: {teacher.student.arch}, width {teacher.student.width}, {teacher.train.epochs} epochs, "
                "its best checkpoint (per seed) teaches that seed's students",
                f"- every student: {student.train.epochs} epochs, SGD lr {student.optim.lr} ({student.optim.schedule}"
                f" schedule), momentum {student.optim.momentum}, weight decay {student.optim.weight_decay}, "
                f"train.amp {student.train.amp} (auto: fp32 on a CPU); loss-decay milestones scaled to the epochs",
                f"- seeds: {args.seeds} (train.seed = 0..{args.seeds - 1}); errors are the final epoch's, 1 crop"]
    for key, cfg in first.items():
        losses = ", ".join(f"{s.loss_name}(rate {s.loss_rate:g}, {s.loss_rate_decay})" for s in cfg.loss_list)
        settings.append(f"  - `configs/fashion-mnist/{key}.yaml`: {losses}")
    settings += [f"- not run: {s}" for s in skipped]
    lines = [f"# Fashion-MNIST reproduction of the seed's table ({info['date'][:10]})", "",
             f"Machine: {info['machine']} ({info['cpu']}, {info['cpu_count']} cores), torch {info['torch']}, "
             f"commit `{info['commit']}`. Total wall-clock {seconds / 60:.1f} min; load average at the end "
             f"{load} (1/5/15 min; above the core count means other jobs shared the machine). The wall-clock "
             "column is per run (mean over seeds); on a shared machine it is pessimistic.", "",
             "## Settings", "", *settings, "",
             f"## Results (validation, mean ± stdev over {args.seeds} seeds)", "", seed_table(rows), "",
             "## Against the student alone", "", *comparison(rows), "",
             "## Discussion", "", "*(to be written from the numbers above by whoever commits this report)*", "",
             "## Validation error over epochs", "", f"![validation error over epochs]({png.name})", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    experiments, common, skipped = plan(args)
    for s in skipped:
        print(f"not run: {s}")
    start = time.perf_counter()
    results = run_experiments(CONFIGS, experiments, Path(args.out), common, list(range(args.seeds)), args.force)
    seconds = time.perf_counter() - start
    stem = Path(args.report_dir) / f"repro-fashion-mnist-{dt.date.today().isoformat()}"
    png = stem.with_suffix(".png")
    plot(results, png)
    text = report(results, args, common, skipped, seconds, png)
    atomic_write_bytes(stem.with_suffix(".md"), text.encode())
    print("\n" + seed_table(table_rows(results)))
    print(f"\nreport: {stem.with_suffix('.md')} (+ .png); total {seconds / 60:.1f} min")
    return 0
