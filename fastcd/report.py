"""Result tables in the seed's format (markdown), from training histories."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Row:
    """One configuration: its final val errors (one per seed) and wall-clock seconds (one per seed)."""

    name: str
    top1: list[float] = field(default_factory=list)
    top5: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    note: str = ""


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def seed_table(rows: list[Row]) -> str:
    """Markdown table: Model structure | Testing on validation | Top-1 error | Top-5 error | Wall-clock | Note."""
    lines = ["| Model structure | Testing on validation | Top-1 error | Top-5 error | Wall-clock | Note |",
             "| -- | -- | -- | -- | -- | -- |"]
    for r in rows:
        wall = f"{sum(r.seconds) / len(r.seconds) / 60:.1f} min" if r.seconds else "-"
        lines.append(f"| {r.name} | 1-crop | {_cell(r.top1)} | {_cell(r.top5)} | {wall} | {r.note} |")
    return "\n".join(lines)
