"""What both reproductions share (`fastcd repro fashion-mnist` in `fastcd.commands.repro`, and its
`--vs-original` in `fastcd.vs_original`): the default budget and the epochs it buys, the command line that
reruns a report, and the machine line at the top of each report."""
from __future__ import annotations

import argparse
import os

from fastcd.errors import FastcdError
from fastcd.utils.machine import machine_info

# Default size: ~55 min for 3 seeds on the 2-core CPU, from trials on the shared machine (docs/benchmarks.md).
BUDGET_MINUTES, EPOCHS, TEACHER_EPOCHS, SEEDS = 60.0, 8, 16, 3
TRAIN_SUBSET, VAL_SUBSET = 6000, 5000


def epochs_for(args: argparse.Namespace) -> tuple[int, int]:
    """(student, teacher) epochs: given, or scaled from the budget (and the seed count) to the defaults'."""
    if args.seeds < 1:
        raise FastcdError(f"--seeds must be at least 1, got {args.seeds}")
    if args.budget_minutes <= 0:
        raise FastcdError(f"--budget-minutes must be positive, got {args.budget_minutes}")
    scale = args.budget_minutes / BUDGET_MINUTES * SEEDS / args.seeds
    return (args.epochs or max(1, round(EPOCHS * scale)), args.teacher_epochs or max(1, round(TEACHER_EPOCHS * scale)))


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run."""
    parts = ["fastcd repro fashion-mnist", f"--seeds {args.seeds}", f"--budget-minutes {args.budget_minutes:g}",
             f"--train-subset {args.train_subset}", f"--val-subset {args.val_subset}"]
    parts += [f"--epochs {args.epochs}"] if args.epochs else []
    parts += [f"--teacher-epochs {args.teacher_epochs}"] if args.teacher_epochs else []
    parts += ["--vs-original"] if args.vs_original else []
    parts += ["--live-teacher"] if getattr(args, "live_teacher", False) else []
    parts += [f"--set {o}" for o in args.overrides]
    return " ".join(parts)


def machine_line(seconds: float, cpu: float) -> str:
    """Machine, versions, commit, wall-clock and CPU time, and the load at the end (for contention)."""
    info = machine_info()
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"Machine: {info['machine']} ({info['cpu']}, {info['cpu_count']} cores), torch {info['torch']}, commit "
            f"`{info['commit']}`, {info['date'][:16]}. Total wall-clock {seconds / 60:.1f} min, CPU time "
            f"{cpu / 60:.1f} min ({cpu / seconds:.2f} cores busy on average); load average at the end {load} "
            "(1/5/15 min: above the core count means other jobs shared the machine, and the wall-clock is "
            "pessimistic).")
