"""channels_last against contiguous on a CPU: the median fp32 training step of a config in each layout.

`python -m fastcd.bench.cpu_layouts CONFIG [--pairs N] [--set KEY=VALUE ...]` builds the config's training step
twice, one per layout, forced (the kernel check of `fastcd.engine.kernel_check` is bypassed: this measures the
raw kernels, so give it shapes the check passes, or expect oneDNN 6035's segfault), on one batch of its train
loader, then times one step of each in turn, `--pairs` times (the order alternating). On a shared machine
the per-pair ratio (contiguous / channels_last of adjacent steps) is the number to read. The result is
appended to `<out>/<date>-<machine>-cpu-layouts.json` with the machine, date and commit.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor

from fastcd.config import add_set_argument, load_config
from fastcd.data import build_loader
from fastcd.engine.runtime import Runtime, loader_context, seed_everything
from fastcd.engine.step import DistillStep
from fastcd.engine.trainer import build_step, loss_weights
from fastcd.utils.results import add_out_argument, record

WARMUP = 3  # untimed steps per layout


def forced_step(cfg_path: str, overrides: list[str], channels_last: bool) -> tuple[DistillStep, Tensor, Tensor]:
    """The fp32 CPU training step of the config in the given layout (no kernel check) and one train batch."""
    cfg = load_config(cfg_path, overrides)
    rt = Runtime(torch.device("cpu"), channels_last=channels_last)
    seed_everything(cfg.train.seed)
    loader = build_loader(cfg.data, "train", loader_context(cfg, rt))
    _, step = build_step(cfg, rt, len(loader))
    step.set_weights(loss_weights(cfg, cfg.train.epochs))  # every loss on, whatever the EDT epoch
    images, labels = next(iter(loader))
    return step, images, labels


def measure(cfg_path: str, overrides: list[str], pairs: int) -> dict:
    """Median step (ms) per layout over `pairs` interleaved pairs, their ratio and the median per-pair ratio."""
    steps = {cl: forced_step(cfg_path, overrides, cl) for cl in (True, False)}
    for step, images, labels in steps.values():
        for _ in range(WARMUP):
            step.run(images, labels, lambda: None, None)
    ms: dict[bool, list[float]] = {True: [], False: []}
    for i in range(pairs):
        for cl in (True, False) if i % 2 == 0 else (False, True):
            step, images, labels = steps[cl]
            start = time.perf_counter()
            step.run(images, labels, lambda: None, None)
            ms[cl].append((time.perf_counter() - start) * 1e3)
    med = {cl: statistics.median(v) for cl, v in ms.items()}
    return {"config": cfg_path, "overrides": overrides, "pairs": pairs, "threads": torch.get_num_threads(),
            "images": list(steps[True][1].shape), "channels_last_ms": round(med[True], 2),
            "contiguous_ms": round(med[False], 2), "channels_last_speedup": round(med[False] / med[True], 3),
            "per_pair_speedup": round(statistics.median(n / c for c, n in zip(ms[True], ms[False])), 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--pairs", type=int, default=15, help="timed steps per layout (default 15)")
    add_set_argument(parser)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    result = measure(args.config, ["train.device=cpu", "train.amp=fp32", *args.overrides], args.pairs)
    path = record("cpu-layouts", result, args.out)
    print(f"{args.config}: channels_last {result['channels_last_ms']} ms, contiguous {result['contiguous_ms']} ms "
          f"(medians of {args.pairs}): channels_last {result['channels_last_speedup']}x, per pair "
          f"{result['per_pair_speedup']}x  -> {path}")


if __name__ == "__main__":
    main()
