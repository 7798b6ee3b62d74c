"""Convert a dataset once into FFCV (.beton) and DALI (webdataset tar + index) formats.

SRC is an ImageNet-layout folder (SRC/train/<class>/*, SRC/val/<class>/*), a flat validation
folder with --labels FILE, or the word `fashion-mnist`. `--verify OUT` rechecks a prepared OUT;
`--upgrade OUT` adds what a folder prepared by an earlier fastcd lacks.
"""
from __future__ import annotations

import argparse
import os
import sys

from fastcd.data_prep.beton import WRITE_MODES
from fastcd.data_prep.prepare import FORMATS, JPEG_QUALITY, MAX_SIDE, SHARD_SAMPLES, prepare
from fastcd.errors import FastcdError


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one name")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", nargs="?", metavar="SRC", help="ImageNet-layout folder, flat folder, or 'fashion-mnist'")
    parser.add_argument("out", nargs="?", metavar="OUT", help="output folder")
    parser.add_argument("--verify", metavar="OUT", help="check a prepared OUT against its manifest and exit")
    parser.add_argument("--upgrade", metavar="OUT", help="add what a folder prepared by an earlier fastcd lacks "
                        "(the per-split sample table of sizes and labels) and exit")
    parser.add_argument("--formats", type=_names, default=list(FORMATS), help="ffcv,dali (default: both)")
    parser.add_argument("--splits", type=_names, default=None, help="e.g. train,val (default: all SRC has)")
    parser.add_argument("--max-side", type=int, default=MAX_SIDE, help=f"longest image side (default {MAX_SIDE})")
    parser.add_argument("--jpeg-quality", type=int, default=JPEG_QUALITY,
                        help=f"quality of re-encoded JPEGs (default {JPEG_QUALITY})")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes (default: all cores)")
    parser.add_argument("--shard-samples", type=int, default=SHARD_SAMPLES,
                        help=f"source files per shard (default {SHARD_SAMPLES})")
    parser.add_argument("--labels", metavar="FILE", help="labels of a flat validation folder: CSV 'file,class' "
                        "or LOC_val_solution.csv")
    parser.add_argument("--strict", action="store_true",
                        help="fail, naming them, if any file (or folder) would be skipped")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N samples per split (trials)")
    parser.add_argument("--ffcv-write-mode", choices=WRITE_MODES, default="jpg",
                        help="ffcv image storage (default jpg: the same JPEG bytes as the shards)")
    parser.add_argument("--ffcv-compress-probability", type=float, default=0.5,
                        help="fraction stored as JPEG in ffcv's 'proportion' mode "
                        "(default %(default)s)")
    parser.add_argument("--rehash", action="store_true", help="re-read and hash every source file to find changed "
                        "contents (a rerun otherwise compares file names, labels and options only) and redo what "
                        "changed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run(args: argparse.Namespace) -> int:
    if args.verify:
        if args.src or args.out:
            raise FastcdError("--verify OUT takes no SRC/OUT arguments: use `fastcd prepare --verify OUT`")
        from fastcd.data_prep.verify import verify

        counts = verify(args.verify)
        print(f"{args.verify}: OK ({', '.join(f'{k} {v} samples' for k, v in counts.items())})")
        return 0
    if args.upgrade:
        if args.src or args.out:
            raise FastcdError("--upgrade OUT takes no SRC/OUT arguments: use `fastcd prepare --upgrade OUT`")
        from fastcd.data_prep.prepare import upgrade

        done = upgrade(args.upgrade, progress=not args.quiet)
        print(f"{args.upgrade}: " + (f"added the sample table of {', '.join(done)}" if done else "already current"))
        return 0
    if not (args.src and args.out):
        raise FastcdError("give SRC and OUT (`fastcd prepare SRC OUT`), or `fastcd prepare --verify OUT`")
    manifest = prepare(args.src, args.out, formats=args.formats, splits=args.splits, max_side=args.max_side,
                       jpeg_quality=args.jpeg_quality, workers=args.workers, shard_samples=args.shard_samples,
                       labels=args.labels, strict=args.strict, progress=not args.quiet, limit=args.limit,
                       ffcv_write_mode=args.ffcv_write_mode,
                       ffcv_compress_probability=args.ffcv_compress_probability, rehash=args.rehash)
    for name, split in manifest["splits"].items():
        if split["skipped"]:
            print(f"{name}: skipped {len(split['skipped'])} file(s) or folder(s), e.g. "
                  f"{split['skipped'][0]['path']} ({split['skipped'][0]['reason']}); see manifest.json",
                  file=sys.stderr)
        if split["empty_classes"]:
            empty = split["empty_classes"]
            print(f"{name}: no usable image in {len(empty)} class(es): {', '.join(empty[:5])}"
                  f"{' ...' if len(empty) > 5 else ''}; see manifest.json", file=sys.stderr)
    print(f"wrote {args.out}/manifest.json")
    return 0
