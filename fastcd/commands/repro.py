"""`fastcd repro fashion-mnist`: every row of the seed's table, reproduced on real data within a wall-clock budget.

For each seed: the teacher (ResNet-34, width 1/4, CIFAR stem), then the ResNet-18 student (width 1/8) alone
(ResNet18-B) and with AT, KD, CD, CD decayed (lrdv1), CD+EDT, CD+KD+EDT, CD+GKD+EDT, and FitNets and RKD,
every student with the same data, epochs and schedule (the loss-decay milestones scale with the epochs), each
seed's students distilling from that seed's teacher (reused when a finished run of the same config is there).
The teacher's targets on each seed's crops are written once to a teacher cache, which every row but AT and
FitNets (they read whole stage maps) reads instead of running the teacher: the same numbers, in less time
(`--live-teacher` runs the teacher in every row).
Writes a report — settings, the seed's table with mean ± stdev over seeds, the per-seed paired differences
against the student alone and against CD with their 95% intervals, the seed's ordering against ours, and a
PNG of validation error over epochs — to `<report-dir>/repro-fashion-mnist-<date>.md/.png`.

`--vs-original` instead times the original pipeline against fastcd's fastest path on the same data
(`fastcd.vs_original`).
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from pathlib import Path

from fastcd.config import add_set_argument, at_least_one
from fastcd.experiments import TEACHER, Experiment, Result, cpu_seconds, run_experiments, table_rows
from fastcd.paths import configs_dir, results_dir
from fastcd.report import Row, paired, paired_table, seed_table
from fastcd.reproduction import (
    BUDGET_MINUTES,
    EPOCHS,
    SEEDS,
    TEACHER_EPOCHS,
    TRAIN_SUBSET,
    VAL_SUBSET,
    command_line,
    epochs_for,
    machine_line,
)
from fastcd.utils.atomic import atomic_path, atomic_write_bytes
from fastcd.utils.machine import machine_info

CONFIGS = configs_dir() / "fashion-mnist"
STEM = "s_resnet18.t_resnet34."
ROWS = [Experiment(TEACHER, "t_resnet34", "teacher, alone"),
        Experiment("s_resnet18.baseline", "ResNet18-B", "student alone"),
        Experiment(STEM + "at", "ResNet18.at", "AT"),
        *[Experiment(STEM + k, STEM + k, m) for k, m in (
            ("kd.ce", "KD"), ("cd.ce", "CD"), ("cd.ce.lrdv1", "CD, decayed"), ("cd.ce.lrdv2", "CD+EDT"),
            ("cd.kd.lrdv2", "CD+KD+EDT"), ("cd.kdv2.lrdv2", "CD+GKD+EDT"),
            ("fitnets", "FitNets (not in the seed's table)"), ("rkd", "RKD (not in the seed's table)"))]]
BASELINE, CD = ROWS[1].label, STEM + "cd.ce"
# The seed's ImageNet top-1 errors (first value where it gives two), and the comparisons its table makes.
SEED_TOP1 = {"ResNet18-B": 30.43, "ResNet18.at": 29.30, STEM + "kd.ce": 29.50, STEM + "cd.ce": 28.38,
             STEM + "cd.ce.lrdv1": 28.36, STEM + "cd.ce.lrdv2": 28.09, STEM + "cd.kd.lrdv2": 27.99,
             STEM + "cd.kdv2.lrdv2": 27.73}
CLAIMS = [("ResNet18.at", BASELINE, "AT"), (STEM + "kd.ce", BASELINE, "KD"), (CD, BASELINE, "CD"),
          (CD, STEM + "kd.ce", "CD over KD"), (STEM + "cd.ce.lrdv1", CD, "decaying CD (lrdv1)"),
          (STEM + "cd.ce.lrdv2", STEM + "cd.ce.lrdv1", "EDT (lrdv2)"),
          (STEM + "cd.kd.lrdv2", STEM + "cd.ce.lrdv2", "adding KD"),
          (STEM + "cd.kdv2.lrdv2", STEM + "cd.kd.lrdv2", "GKD instead of KD"),
          (STEM + "cd.kdv2.lrdv2", CD, "CD+GKD+EDT over CD")]
TARGET_LEAD = 3.0  # points of top-1 error the teacher should lead the student alone by at the default budget


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=["fashion-mnist"], help="the real data set (Debian package)")
    parser.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds per row (default {SEEDS}; at least 2 "
                        "for a spread, 3 for a useful paired interval)")
    parser.add_argument("--budget-minutes", type=float, default=BUDGET_MINUTES,
                        help=f"wall-clock target in minutes on an idle 2-core CPU (default %(default)g); scales the "
                             f"epochs ({EPOCHS} student and {TEACHER_EPOCHS} teacher epochs for {BUDGET_MINUTES:g} min "
                             f"and {SEEDS} seeds)")
    parser.add_argument("--epochs", type=at_least_one, default=None, help="student epochs (default: from the budget)")
    parser.add_argument("--teacher-epochs", type=at_least_one, default=None,
                        help="teacher epochs (default: from the budget)")
    parser.add_argument("--train-subset", type=int, default=TRAIN_SUBSET,
                        help="training images (the first N; default %(default)s)")
    parser.add_argument("--val-subset", type=int, default=VAL_SUBSET,
                        help="test images evaluated each epoch (the first N; "
                        "default %(default)s)")
    parser.add_argument("--out", default=None, help="folder for the runs (default runs/repro-fashion-mnist, "
                        "runs/vs-original-fashion-mnist with --vs-original)")
    parser.add_argument("--report-dir", default=str(results_dir()), help="folder of the report (markdown, PNG and, "
                        "with --vs-original, the JSON record; default: %(default)s)")
    add_set_argument(parser, "override applied to every run")
    parser.add_argument("--force", action="store_true", help="replace the runs a previous repro left in --out "
                        "(finished teachers of the same config are still reused)")
    parser.add_argument("--fresh-teacher", action="store_true", help="retrain the teachers even when finished "
                        "runs of the same config are in --out (with --force)")
    parser.add_argument("--live-teacher", action="store_true", help="run the teacher in every row instead of "
                        "reading its targets from a per-seed teacher cache")
    parser.add_argument("--vs-original", action="store_true", help="time the original pipeline (ImageFolder + "
                        "PIL over JPEG files, fp32, NCHW, teacher BN in train mode, unfused SGD) against fastcd's "
                        "fastest path on the same data, students and seeds (fastcd.vs_original)")
    parser.add_argument("--knob-steps", type=int, default=20, help="--vs-original: timed steps per knob of the "
                        "per-knob breakdown (0 skips it; default %(default)s)")


def plan(args: argparse.Namespace) -> tuple[list[Experiment], list[str]]:
    """Every row (the teacher with its own epochs) and the overrides common to all."""
    epochs, teacher_epochs = epochs_for(args)
    common = [f"data.train_subset={args.train_subset}", f"data.val_subset={args.val_subset}",
              f"train.epochs={epochs}", "train.progress=false", *args.overrides]
    rows = [Experiment(e.key, e.label, e.method, (f"train.epochs={teacher_epochs}",) if e.key == TEACHER else ())
            for e in ROWS]
    return rows, common


def _row(rows: list[Row], label: str) -> Row:
    return next(r for r in rows if r.name == label)


def summary(rows: list[Row]) -> list[str]:
    """The teacher's lead over the student alone, and how much of it CD+GKD+EDT closed (means over seeds)."""
    teacher, base = _row(rows, ROWS[0].label), _row(rows, BASELINE)
    best = _row(rows, STEM + "cd.kdv2.lrdv2")
    lead = paired(base, teacher)
    closed = statistics.mean(base.top1) - statistics.mean(best.top1)
    gap = statistics.mean(base.top1) - statistics.mean(teacher.top1)
    per_seed = ", ".join(f"{d:+.2f}" for d in lead.diffs)
    lines = [f"- the teacher {'leads' if gap > 0 else 'does not lead'} the student alone: {gap:+.2f} points of "
             f"top-1 error in its favour (per seed: {per_seed}; the default budget is sized for a lead of at least "
             f"{TARGET_LEAD:g})"]
    if gap > 0:
        lines.append(f"- CD+GKD+EDT closed {closed:.2f} points of that gap ({100 * closed / gap:.0f}%)")
    return lines


def ordering(rows: list[Row]) -> tuple[str, list[str]]:
    """The seed's comparisons against ours (markdown table), and one line per outcome class."""
    lines = ["| Comparison | rows | seed (ImageNet) | ours: mean [95% CI], per seed | verdict | agrees |",
             "| -- | -- | -- | -- | -- | -- |"]
    outcome: dict[str, list[str]] = {"agrees": [], "opposite": [], "not resolved": []}
    for row, ref, what in CLAIMS:
        p = paired(_row(rows, row), _row(rows, ref))
        seed = SEED_TOP1[row] - SEED_TOP1[ref]
        if p.verdict in ("better", "worse"):
            agrees = "agrees" if (p.verdict == "better") == (seed < 0) else "opposite"
        else:
            agrees = "not resolved"
        direction = "" if agrees != "not resolved" else (
            " (same sign)" if (p.mean < 0) == (seed < 0) else " (other sign)")
        outcome[agrees].append(f"{what}{direction}")
        lines.append(f"| {what} | {row} vs {ref} | {seed:+.2f} | {p.interval()}; "
                     f"{', '.join(f'{d:+.2f}' for d in p.diffs)} | {p.verdict} | {agrees}{direction} |")
    words = {"agrees": "resolved and in the seed's direction",
             "opposite": "resolved and against the seed's direction",
             "not resolved": "not resolved at this number of seeds (the 95% interval holds 0)"}
    return "\n".join(lines), [f"- {words[k]}: {', '.join(v) if v else 'none'}" for k, v in outcome.items()]


def rank_table(rows: list[Row]) -> str:
    """The seed's rows in the seed's order (best last), each with its ImageNet error and ours (mean, rank)."""
    ours = sorted(SEED_TOP1, key=lambda label: statistics.mean(_row(rows, label).top1), reverse=True)
    lines = ["| Model structure | seed top-1 (ImageNet) | seed rank | ours top-1 (Fashion-MNIST) | our rank |",
             "| -- | -- | -- | -- | -- |"]
    seed_order = sorted(SEED_TOP1, key=SEED_TOP1.get, reverse=True)
    for i, label in enumerate(seed_order):
        r = _row(rows, label)
        lines.append(f"| {label} | {SEED_TOP1[label]:.2f} | {len(seed_order) - i} | "
                     f"{statistics.mean(r.top1):.2f} ± {statistics.stdev(r.top1) if len(r.top1) > 1 else 0:.2f} | "
                     f"{len(ours) - ours.index(label)} |")
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    """Validation top-1 error per epoch, mean over seeds, one line per row (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[list[float]]] = {}
    for r in results:
        curves.setdefault(r.experiment.label, []).append([h["val_top1_err"] for h in r.history])
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, runs in curves.items():
        mean = [statistics.mean(v) for v in zip(*runs)]
        ax.plot(range(1, len(mean) + 1), mean, marker="o", markersize=3, label=label,
                linestyle="--" if label == ROWS[0].label else "-")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 error (%), mean over seeds")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(top=min(ax.get_ylim()[1], 2.5 * max(statistics.mean(r[-1] for r in runs) for runs in curves.values())))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Fashion-MNIST reproduction")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def cache_line(results: list[Result]) -> str:
    """Which rows read the teacher's targets from the per-seed cache, and what writing it cost."""
    cached = sorted({r.experiment.label for r in results if r.config.teacher and r.config.teacher.cache})
    if not cached:
        return "- teacher: run live in every distilled row (no teacher cache)"
    writes = [r.cache_seconds for r in results if r.cache_seconds]
    cost = f"{statistics.mean(writes) / 60:.1f} min per seed" if writes else "kept from an earlier run"
    return (f"- teacher cache: the teacher's stage means, logits and embedding on each seed's crops, written once "
            f"in fp32 (the live teacher's numbers; {cost}) and read by {len(cached)} rows instead of running the "
            f"teacher ({', '.join(cached)}); AT and FitNets read whole stage maps and run it live, so their "
            "wall-clock includes the teacher's forward and the cached rows' does not")


def report(results: list[Result], args: argparse.Namespace, common: list[str], seconds: float, cpu: float,
           png: Path) -> str:
    """The markdown report: machine, settings, the table, paired differences, the seed's ordering, the plot."""
    rows = table_rows(results)
    first = {r.experiment.key: r.config for r in results}
    student, teacher = first[ROWS[1].key], first[TEACHER]
    reused = sum(r.reused for r in results)
    settings = [f"- command: `{command_line(args)}`; overrides common to every run: `{' '.join(common)}`",
                f"- data: Fashion-MNIST idx files ({student.data.path}), first {student.data.train_subset} training "
                f"images, first {student.data.val_subset} test images as validation, {student.data.res} px, "
                f"RandomResizedCrop(scale {student.data.scale_min}-1) + flip, batch {student.data.batch_size}",
                f"- student: {student.student.arch}, {student.student.stem} stem, width {student.student.width}; "
                f"teacher: {teacher.student.arch}, width {teacher.student.width}, {teacher.train.epochs} epochs "
                f"(per seed; its final checkpoint teaches that seed's students"
                f"{f'; {reused} reused from an earlier run' if reused else ''})",
                f"- every student: {student.train.epochs} epochs, SGD lr {student.optim.lr} ({student.optim.schedule}"
                f" schedule), momentum {student.optim.momentum}, weight decay {student.optim.weight_decay}, "
                f"train.amp {student.train.amp} (auto: fp32 on a CPU); loss-decay milestones scaled to the epochs",
                f"- seeds: {args.seeds} (train.seed = 0..{args.seeds - 1}); errors are the final epoch's, 1 crop",
                cache_line(results)]
    for key, cfg in first.items():
        losses = ", ".join(f"{s.loss_name}(rate {s.loss_rate:g}, factor {s.factor:g}, {s.loss_rate_decay})"
                           for s in cfg.loss_list)
        settings.append(f"  - `configs/fashion-mnist/{key}.yaml`: {losses}")
    students = [r for r in rows if r.name != ROWS[0].label]
    claims, outcomes = ordering(rows)
    lines = [f"# Fashion-MNIST reproduction of the seed's table ({machine_info()['date'][:10]})", "",
             machine_line(seconds, cpu), "", "## Settings", "", *settings, "",
             f"## Results (validation, mean ± stdev over {args.seeds} seeds)", "", seed_table(rows), "",
             *summary(rows), "",
             "## Paired differences", "",
             "Top-1 error of each row minus the reference's, seed by seed (same seed, same teacher, same data order); "
             "the mean with its 95% t-interval; `better`/`worse` when the interval excludes 0, else `same`.", "",
             paired_table(students, [_row(rows, BASELINE), _row(rows, CD)]), "",
             "## The seed's ordering against ours", "", claims, "", *outcomes, "", rank_table(rows), "",
             "## Discussion", "",
             f"Setup differences that can move the ordering, whatever the numbers: Fashion-MNIST at "
             f"{student.data.res} px instead of ImageNet at 224 px; {student.train.epochs} student epochs instead of "
             "100, so EDT's CE-free start (30% of the epochs) is a few epochs long; a width-"
             f"{student.student.width:g} ResNet-18 taught by a width-{teacher.student.width:g} ResNet-34 trained on "
             f"the same images; {args.seeds} seeds, so differences under about one seed stdev are not resolved.", "",
             "*(Where the ordering matches the seed's table and where not, and why: to be written from the numbers "
             "above by whoever commits this report.)*", "",
             "## Validation error over epochs", "", f"![validation error over epochs]({png.name})", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.vs_original:
        from fastcd.vs_original import run_vs_original

        return run_vs_original(args)
    experiments, common = plan(args)
    start, cpu = time.perf_counter(), cpu_seconds()
    out = Path(args.out or "runs/repro-fashion-mnist")
    results = run_experiments(CONFIGS, experiments, out, common, list(range(args.seeds)), args.force,
                              args.fresh_teacher, teacher_cache=not args.live_teacher)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    stem = Path(args.report_dir) / f"repro-fashion-mnist-{dt.date.today().isoformat()}"
    png = stem.with_suffix(".png")
    plot(results, png)
    atomic_write_bytes(stem.with_suffix(".md"), report(results, args, common, seconds, cpu, png).encode())
    print("\n" + seed_table(table_rows(results)))
    print(f"\nreport: {stem.with_suffix('.md')} (+ .png); total {seconds / 60:.1f} min")
    return 0
