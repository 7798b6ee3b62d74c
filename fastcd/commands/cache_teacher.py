"""`fastcd cache-teacher CONFIG`: run the config's teacher once over E epochs of its training crops and store
what the losses read of it (stage channel means, logits, embedding) per crop, for `teacher.cache`.

The crops are the ones training will see (`fastcd.data.crops`: a pure function of seed, epoch and sample),
read through the config's own loader, so a run of the same config replays exactly these targets. Written
resumably: a killed run, started again, goes on from the last batches it flushed; one run at a time per
folder (a lock), and every epoch's files are checked before it counts as done.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fastcd.cache.write import contents_for, default_out, write_cache
from fastcd.config import add_set_argument, at_least_one, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML whose teacher, data and crops the cache is for")
    parser.add_argument("--epochs", type=at_least_one, default=None, help="epochs of crops (default: train.epochs)")
    parser.add_argument("--logits", default=None, metavar="full|topk=K|none",
                        help="logits to store (default: full when a loss of the config reads them, else none)")
    parser.add_argument("--embed", action=argparse.BooleanOptionalAction, default=None,
                        help="store the pooled embedding (default: when a loss reads it, e.g. RKD)")
    parser.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16",
                        help="stored precision (default %(default)s)")
    parser.add_argument("--out", default="", help="cache folder (default: <data.path>/teacher-cache/<name> beside "
                        "prepared data, else runs/teacher-cache/<name>)")
    parser.add_argument("--force", action="store_true", help="rebuild a cache made for another config or options")
    add_set_argument(parser)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else default_out(cfg)
    contents = contents_for(cfg, args.logits, args.embed, args.dtype)
    epochs = args.epochs if args.epochs is not None else cfg.train.epochs
    manifest = write_cache(cfg, out, epochs, contents, args.force)
    digest = manifest["identity"]["teacher"]["weights_sha256"]
    print(f"{out}: {manifest['epochs']} epochs x {manifest['samples']} crops, {contents.bytes_per_crop()} bytes "
          f"per crop ({contents.logits} logits, {'with' if contents.embed_dim else 'no'} embedding, "
          f"{contents.dtype}), {manifest['bytes'] / 2**20:.1f} MiB; teacher weights sha256 {digest[:12]}")
    return 0
