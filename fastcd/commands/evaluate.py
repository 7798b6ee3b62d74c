"""Top-1/top-5 error (1 crop) of a checkpoint's student on the validation split of a config's data."""
from __future__ import annotations

import argparse

from fastcd.config import add_set_argument, load_config
from fastcd.data import build_loader
from fastcd.engine.distributed import teardown
from fastcd.engine.evaluate import evaluate
from fastcd.engine.runtime import loader_context, setup_runtime
from fastcd.errors import FastcdError
from fastcd.models import build_resnet
from fastcd.utils.checkpoint import load_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (its data section says what to evaluate on)")
    parser.add_argument("--checkpoint", required=True, help="a fastcd checkpoint (latest.pt or best.pt)")
    add_set_argument(parser)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    ckpt = load_checkpoint(args.checkpoint)
    s = ckpt["config"]["student"]
    if s["num_classes"] != cfg.student.num_classes:
        raise FastcdError(f"{args.checkpoint} has {s['num_classes']} classes, the config's student.num_classes is "
                          f"{cfg.student.num_classes}: give the config the checkpoint was trained with")
    rt = setup_runtime(cfg)
    try:
        model = build_resnet(s["arch"], s["num_classes"], s["stem"], s["width"])
        model.load_state_dict(ckpt["model"])
        model.to(rt.device, memory_format=rt.memory_format)
        ctx = loader_context(cfg, rt)
        result = evaluate(model, build_loader(cfg.data, "val", ctx), rt, cfg.data.flip_tta)
    finally:
        teardown(rt)
    if not rt.is_main:
        return 0
    print(f"{args.checkpoint}: top-1 error {result['top1_err']:.2f}  top-5 error {result['top5_err']:.2f}  "
          f"({result['samples']} images, {s['arch']})")
    return 0
