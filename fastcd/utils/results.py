"""Result records: one JSON file per kind, machine and day, appended to, in the results folder
(--out; default `fastcd.paths.results_dir`: ./fastcd-results/); peak memory beside each."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import resource
from pathlib import Path

import torch

from fastcd.paths import results_dir as default_results_dir
from fastcd.utils.atomic import atomic_write_json
from fastcd.utils.machine import machine_info, machine_name


def peak_memory() -> dict[str, float]:
    """Peak host RSS of this process and its reaped children, and peak GPU memory, in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out = {"host_peak_mib": round(own, 1), "children_host_peak_mib": round(children, 1)}
    if torch.cuda.is_available():
        out["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """`--out DIR`: where a benchmark appends its results (default: `fastcd.paths.results_dir()`)."""
    parser.add_argument("--out", default="", metavar="DIR", help="results folder (default: fastcd-results/ under "
                        "the current directory; the committed records are in the checkout's bench/results/)")


def record(kind: str, result: dict, results_dir: str | Path | None = None) -> Path:
    """Append `result` (with machine, date and commit) to `<date>-<machine>-<kind>.json` in `results_dir`
    (default: `fastcd.paths.results_dir()`); return its path."""
    results_dir = Path(results_dir) if results_dir else default_results_dir()
    results_dir.mkdir(parents=True, exist_ok=True)
    day = _dt.date.today().isoformat()
    path = results_dir / f"{day}-{machine_name()}-{kind}.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append({**machine_info(), **result})
    atomic_write_json(path, runs)
    return path
