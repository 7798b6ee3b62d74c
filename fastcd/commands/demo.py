"""The main job, sized for a 2-core CPU: on Fashion-MNIST, train a narrow ResNet-34 teacher, then a
ResNet-18 student alone and with CD+GKD+EDT, and print the seed-format table of these runs."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from fastcd.config import load_config
from fastcd.engine.trainer import train
from fastcd.report import Row, seed_table
from fastcd.utils.atomic import atomic_write_bytes

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "fashion-mnist"
RUNS = [("teacher", "t_resnet34 (teacher, alone)"), ("student", "s_resnet18 (student alone)"),
        ("cd_gkd_edt", "s_resnet18.t_resnet34.cd.kdv2.lrdv2 (CD+GKD+EDT)")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="folder for the three runs (default runs/demo)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the configs')")
    parser.add_argument("--train-subset", type=int, default=None, help="training images (default: the configs')")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every run")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    common = list(args.overrides)
    if args.epochs:
        common.append(f"train.epochs={args.epochs}")
    if args.train_subset:
        common.append(f"data.train_subset={args.train_subset}")
    rows, start = [], time.perf_counter()
    for name, label in RUNS:
        overrides = [f"train.out_dir={out / name}", *common]
        if name != "teacher" and name != "student":
            overrides.append(f"teacher.weights={out / 'teacher' / 'best.pt'}")
        cfg = load_config(CONFIGS / f"{name}.yaml", overrides)
        print(f"== {label}: {cfg.train.epochs} epochs on {cfg.data.train_subset or 'all'} training images")
        t = time.perf_counter()
        final = train(cfg)[-1]
        rows.append(Row(label, [final["val_top1_err"]], [final["val_top5_err"]], [time.perf_counter() - t]))
    table = seed_table(rows)
    atomic_write_bytes(out / "table.md", (table + "\n").encode())
    minutes = (time.perf_counter() - start) / 60
    print(f"\nFashion-MNIST validation (10 000 images), final epoch; total {minutes:.1f} min\n")
    print(table)
    return 0
