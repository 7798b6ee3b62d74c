"""Result tables in the seed's format (markdown), and paired comparisons between rows over seeds."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

# Two-sided 95% quantiles of Student's t by degrees of freedom (1..30); above 30 the normal 1.96 is close.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass
class Row:
    """One configuration: per seed (in `seeds` order) its final val errors and wall-clock seconds.

    `method` is what the row trains (the seed's Reference column); `wall` replaces the wall-clock cell
    (e.g. for a reused checkpoint)."""

    name: str
    method: str = ""
    seeds: list[int | None] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)
    top5: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    wall: str = ""


def mean_sd(values: list[float]) -> str:
    """`m` for one value, `m ± sd` (sample stdev) for several."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _wall(row: Row) -> str:
    if row.wall:
        return row.wall
    return f"{statistics.mean(row.seconds) / 60:.1f} min" if row.seconds else "-"


def seed_table(rows: list[Row]) -> str:
    """Markdown: Model structure | Method | Testing on validation | Top-1 error | Top-5 error | Wall-clock
    (per run, mean over seeds). The Method column is left out when no row names one."""
    method = any(r.method for r in rows)
    head = ["Model structure", *(["Method"] if method else []), "Testing on validation", "Top-1 error",
            "Top-5 error", "Wall-clock"]
    lines = ["| " + " | ".join(head) + " |", "|" + " -- |" * len(head)]
    for r in rows:
        cells = [r.name, *([r.method] if method else []), "1-crop", mean_sd(r.top1), mean_sd(r.top5), _wall(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Paired:
    """Per-seed differences `row - reference` (top-1 error, points), their mean and its 95% t-interval."""

    diffs: list[float]
    mean: float
    half_width: float  # nan with one seed

    @property
    def verdict(self) -> str:
        """`better` / `worse` when the 95% interval excludes 0 (lower error is better), else `same`;
        `one seed` when there is no interval."""
        if math.isnan(self.half_width):
            return "one seed"
        if self.mean + self.half_width < 0:
            return "better"
        if self.mean - self.half_width > 0:
            return "worse"
        return "same"

    def interval(self) -> str:
        if math.isnan(self.half_width):
            return f"{self.mean:+.2f}"
        return f"{self.mean:+.2f} [{self.mean - self.half_width:+.2f}, {self.mean + self.half_width:+.2f}]"


def paired(row: Row, reference: Row) -> Paired:
    """`row` against `reference` seed by seed (only the seeds both have), top-1 error."""
    ref = dict(zip(reference.seeds, reference.top1))
    diffs = [v - ref[s] for s, v in zip(row.seeds, row.top1) if s in ref]
    if not diffs:
        raise ValueError(f"{row.name} and {reference.name} share no seed")
    return Paired(diffs, *mean_interval(diffs))


def mean_interval(values: list[float]) -> tuple[float, float]:
    """The mean of `values` and the half-width of its two-sided 95% t-interval (nan for one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan
    t = T975[len(values) - 2] if len(values) - 1 <= len(T975) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def paired_table(rows: list[Row], references: list[Row]) -> str:
    """Markdown: for each row and each reference, the per-seed differences in top-1 error, their mean with
    its 95% interval, and the verdict. A row is not compared with itself."""
    head = ["Model structure"]
    for ref in references:
        head += [f"vs {ref.name}: per seed", "mean [95% CI]", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + " -- |" * len(head)]
    for r in rows:
        cells = [r.name]
        for ref in references:
            if r is ref:
                cells += ["—", "—", "—"]
                continue
            p = paired(r, ref)
            cells += [", ".join(f"{d:+.2f}" for d in p.diffs), p.interval(), p.verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
