"""The main job, sized for ~15 minutes on a 2-core CPU: on Fashion-MNIST, train a narrow ResNet-34 teacher
(width 1/4, 10 epochs), then a narrower ResNet-18 student (width 1/8, 5 epochs) alone and with CD+GKD+EDT;
print the seed-format table of these runs and how much of the teacher's lead CD+GKD+EDT closed.

A teacher folder that already holds a finished run of the same config is reused (and the table says so);
`--fresh-teacher` retrains it.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from fastcd.config import add_set_argument, at_least_one
from fastcd.experiments import TEACHER, Experiment, run_experiments, table_rows
from fastcd.paths import configs_dir
from fastcd.report import Row, seed_table
from fastcd.utils.atomic import atomic_write_bytes

CONFIGS = configs_dir() / "fashion-mnist"
STUDENT, DISTILLED = "s_resnet18.baseline", "s_resnet18.t_resnet34.cd.kdv2.lrdv2"
RUNS = [Experiment(TEACHER, "t_resnet34", "teacher, alone"), Experiment(STUDENT, "ResNet18-B", "student alone"),
        Experiment(DISTILLED, DISTILLED, "CD+GKD+EDT")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="folder for the three runs (default runs/demo)")
    parser.add_argument("--epochs", type=at_least_one, default=None, help="epochs of the two students (default: the "
                        "configs', 5)")
    parser.add_argument("--teacher-epochs", type=at_least_one, default=None, help="epochs of the teacher (default: its "
                        "config's, 10)")
    parser.add_argument("--train-subset", type=int, default=None, help="training images (default: the configs')")
    add_set_argument(parser, "override applied to every run")
    parser.add_argument("--force", action="store_true", help="replace the runs a previous demo left in --out "
                        "(a finished teacher of the same config is still reused)")
    parser.add_argument("--fresh-teacher", action="store_true", help="retrain the teacher even when a finished "
                        "run of the same config is in --out (needs --force to replace it)")


def gap_closed(rows: list[Row]) -> str:
    """One line: the teacher's lead over the student alone and the share of it CD+GKD+EDT closed."""
    teacher, student, distilled = (next(r for r in rows if r.name == e.label) for e in RUNS)
    lead = student.top1[0] - teacher.top1[0]
    gain = student.top1[0] - distilled.top1[0]
    if lead <= 0:
        return (f"The teacher does not lead the student alone here ({-lead:.2f} points behind), so there is no gap "
                f"to close; CD+GKD+EDT changed the student's top-1 error by {round(-gain, 2) + 0.0:+.2f} points.")
    return (f"The teacher leads the student alone by {lead:.2f} points of top-1 error; CD+GKD+EDT closed "
            f"{gain:.2f} of them ({100 * gain / lead:.0f}% of the gap).")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    common = list(args.overrides)
    if args.train_subset:
        common.append(f"data.train_subset={args.train_subset}")
    students = (f"train.epochs={args.epochs}",) if args.epochs else ()
    teacher = (f"train.epochs={args.teacher_epochs}",) if args.teacher_epochs else ()
    runs = [Experiment(e.key, e.label, e.method, teacher if e.key == TEACHER else students) for e in RUNS]
    start = time.perf_counter()
    results = run_experiments(CONFIGS, runs, out, common, force=args.force, fresh_teacher=args.fresh_teacher)
    minutes = (time.perf_counter() - start) / 60
    rows = table_rows(results)
    epochs = {r.experiment.key: r.config.train.epochs for r in results}
    data = results[0].config.data
    lines = [f"Fashion-MNIST, {data.train_subset or 60000} training images; top-1/top-5 error on "
             f"{data.val_subset or 10000} test images after the last epoch (teacher {epochs[TEACHER]} epochs, "
             f"students {epochs[STUDENT]}); total {minutes:.1f} min", "", seed_table(rows), "", gap_closed(rows)]
    reused = [r for r in results if r.reused]
    if reused:
        lines.append(f"The teacher was not retrained: {reused[0].config.out_path} already held a finished run of "
                     "the same config (--fresh-teacher --force retrains it).")
    text = "\n".join(lines)
    atomic_write_bytes(out / "table.md", (text + "\n").encode())
    print("\n" + text)
    return 0
