"""`fastcd configs`: the shipped experiment configs, one line each, with the description from the comment that
opens each file. Any of them runs as `fastcd train configs/<dataset>/<name>.yaml`, from any directory."""
from __future__ import annotations

import argparse
from pathlib import Path

from fastcd.errors import FastcdError
from fastcd.paths import configs_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", nargs="?", default=None,
                        help="list only this dataset's folder, e.g. fashion-mnist (default: every dataset)")


def description(path: Path) -> str:
    """The first sentence of the comment block that opens `path` ('' when it opens with none)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    end = text.find(". ")
    return text[:end + 1] if end >= 0 else text


def shipped() -> dict[str, list[Path]]:
    """Dataset folder -> its configs (files starting with `_` are bases other configs inherit from)."""
    root = configs_dir()
    return {d.name: sorted(p for p in d.glob("*.yaml") if not p.name.startswith("_"))
            for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(("_", "."))}


def run(args: argparse.Namespace) -> int:
    table = shipped()
    if args.dataset is not None and args.dataset not in table:
        raise FastcdError(f"no shipped configs for dataset {args.dataset!r}; choose from {', '.join(table)}")
    chosen = {k: v for k, v in table.items() if args.dataset in (None, k)}
    names = {p: f"configs/{d}/{p.name}" for d, paths in chosen.items() for p in paths}
    width = max(len(n) for n in names.values())
    for path, name in names.items():
        print(f"{name:<{width}}  {description(path)}")
    print(f"\n{len(names)} configs (in {configs_dir()}); run one with `fastcd train CONFIG`, see the resolved "
          "values with `fastcd train CONFIG --print-config`")
    return 0
