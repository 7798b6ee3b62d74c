"""Where fastcd finds what it ships and where it writes by default, decided here once.

Run from a checkout (an editable install), the configs are the checkout's own `configs/`; installed from a
wheel, they are package data (`fastcd/configs/`). Benchmark results and reproduction reports go to
`fastcd-results/` under the current directory either way, never into the checkout: the committed records in
`bench/results/` are written there only when asked (`--out bench/results`, `--report-dir bench/results`).
"""
from __future__ import annotations

from pathlib import Path

from fastcd.errors import FastcdError

PACKAGE = Path(__file__).resolve().parent
_ROOT = PACKAGE.parent
SOURCE_ROOT: Path | None = _ROOT if (_ROOT / "setup.py").is_file() and (_ROOT / "configs").is_dir() else None


def configs_dir() -> Path:
    """The shipped experiment configs (one folder per dataset)."""
    for folder in (PACKAGE / "configs", SOURCE_ROOT / "configs" if SOURCE_ROOT else None):
        if folder is not None and folder.is_dir():
            return folder
    raise FastcdError(f"the shipped configs are missing from {PACKAGE}; reinstall fastcd")


def shipped_config(path: str | Path) -> Path | None:
    """A relative `configs/<dataset>/<name>.yaml` (or `<dataset>/<name>.yaml`) that is not in the current
    directory, found among the shipped configs; None when there is no such file."""
    path = Path(path)
    if path.is_absolute():
        return None
    parts = path.parts[1:] if path.parts and path.parts[0] == "configs" else path.parts
    candidate = configs_dir().joinpath(*parts) if parts else None
    return candidate if candidate is not None and candidate.is_file() else None


def results_dir() -> Path:
    """The default folder of benchmark results and reports: `fastcd-results/` under the current directory."""
    return Path.cwd() / "fastcd-results"
