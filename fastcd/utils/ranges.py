"""Numeric intervals of config fields and loss parameters, and the one-line error when a value is outside."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastcd.errors import FastcdError


@dataclass(frozen=True)
class Range:
    """A valid interval: `low`/`high` (None: unbounded), each end closed unless marked open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, v: float) -> bool:
        above = self.low is None or (v > self.low if self.low_open else v >= self.low)
        below = self.high is None or (v < self.high if self.high_open else v <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_shown(self.low)}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{_shown(self.low)}, {_shown(self.high)}{right}"


def _shown(bound: float) -> str:
    """An integer bound in full (a seed's 2147483647, not 2.14748e+09), a float as `:g` writes it."""
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)


def check_range(value: Any, rng: Range, where: str) -> None:
    """A FastcdError naming `where` unless `value` is a number in `rng`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not rng.holds(value):
        raise FastcdError(f"{where} must be {rng}, got {value!r}")
