"""Train a student from a YAML config (under torchrun for several GPUs or nodes)."""
from __future__ import annotations

import argparse

import yaml

from fastcd.config import add_set_argument, at_least_one, load_config
from fastcd.engine.runtime import is_main_process
from fastcd.engine.trainer import train
from fastcd.errors import Terminated


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML, e.g. "
                        "configs/fashion-mnist/s_resnet18.t_resnet34.cd.kdv2.lrdv2.yaml")
    add_set_argument(parser)
    parser.add_argument("--resume", action="store_true", help="continue exactly from <out_dir>/latest.pt")
    parser.add_argument("--force", action="store_true",
                        help="start afresh in a run folder that holds another run (its files are moved aside once "
                        "every input of the new run is checked, put back if the new run fails before its first "
                        "checkpoint, and deleted after it; not with --resume)")
    parser.add_argument("--stop-after", type=at_least_one, default=None, metavar="EPOCH",
                        help="stop after this epoch (the schedules still span train.epochs); resume later")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config (every default and "
                        "--set applied, as the run's config.yaml would hold it) and exit without training")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    try:
        history = train(cfg, resume=args.resume, stop_after_epoch=args.stop_after, force=args.force)
    except (KeyboardInterrupt, Terminated) as e:  # the CLI's one line, with where the run can continue from
        latest = cfg.out_path / "latest.pt"
        raise type(e)(f"the last checkpoint is {str(latest)!r} (continue with --resume)" if latest.is_file()
                      else "no checkpoint was written") from None
    if history and is_main_process():
        best = min((r for r in history if r["val_top1_err"] is not None), key=lambda r: r["val_top1_err"])
        print(f"{cfg.name}: best val top-1/top-5 error {best['val_top1_err']:.2f}/{best['val_top5_err']:.2f} "
              f"(epoch {best['epoch']}); checkpoints in {cfg.out_path}")
    return 0
