"""The main job, sized for a 2-core CPU: on Fashion-MNIST, train a narrow ResNet-34 teacher, then a
ResNet-18 student alone and with CD+GKD+EDT, and print the seed-format table of these runs."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from fastcd.config import add_set_argument
from fastcd.experiments import Experiment, run_experiments, table_rows
from fastcd.paths import configs_dir
from fastcd.report import seed_table
from fastcd.utils.atomic import atomic_write_bytes

CONFIGS = configs_dir() / "fashion-mnist"
RUNS = [Experiment("teacher", "t_resnet34 (teacher, alone)"), Experiment("student", "s_resnet18 (student alone)"),
        Experiment("cd_gkd_edt", "s_resnet18.t_resnet34.cd.kdv2.lrdv2 (CD+GKD+EDT)")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="folder for the three runs (default runs/demo)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of every run (default: the configs': teacher 10, students 8)")
    parser.add_argument("--train-subset", type=int, default=None, help="training images (default: the configs')")
    add_set_argument(parser, "override applied to every run")
    parser.add_argument("--force", action="store_true", help="replace the runs a previous demo left in --out")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    common = list(args.overrides)
    if args.epochs:
        common.append(f"train.epochs={args.epochs}")
    if args.train_subset:
        common.append(f"data.train_subset={args.train_subset}")
    start = time.perf_counter()
    table = seed_table(table_rows(run_experiments(CONFIGS, RUNS, out, common, force=args.force)))
    atomic_write_bytes(out / "table.md", (table + "\n").encode())
    minutes = (time.perf_counter() - start) / 60
    print(f"\nFashion-MNIST validation (10 000 images), final epoch; total {minutes:.1f} min\n")
    print(table)
    return 0
