"""Run a list of experiments from one config folder: a teacher first, then the rows that distil from it.

Used by `fastcd demo` (one seed) and `fastcd repro` (several): each seed trains its own teacher, and
that seed's distilled students read the teacher's `best.pt`.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastcd.config import Config, drop_overrides_into_null, load_config
from fastcd.engine.run_folder import check_run_folder
from fastcd.engine.trainer import train
from fastcd.report import Row

TEACHER = "teacher"  # the config (file stem) whose best checkpoint the other rows distil from


@dataclass(frozen=True)
class Experiment:
    """One row: its config file stem in the folder, its label in the table, overrides of its own."""

    key: str
    label: str
    overrides: tuple[str, ...] = ()


@dataclass
class Result:
    """One finished run."""

    experiment: Experiment
    seed: int | None
    config: Config
    history: list[dict[str, Any]]
    seconds: float


def experiment_config(folder: Path, exp: Experiment, run_dir: Path, overrides: Sequence[str],
                      seed: int | None) -> Config:
    """The config of `exp` writing to `run_dir/<key>`; a row with a teacher reads `run_dir/teacher/best.pt`.
    The overrides are shared by every row: `teacher.*` ones apply only to rows that have a teacher."""
    path = folder / f"{exp.key}.yaml"
    extra = [f"train.out_dir={run_dir / exp.key}", *overrides, *exp.overrides,
             *([f"train.seed={seed}"] if seed is not None else []),
             f"teacher.weights={run_dir / TEACHER / 'best.pt'}"]
    return load_config(path, drop_overrides_into_null(path, extra))


def run_experiments(folder: Path, experiments: Sequence[Experiment], out: Path, overrides: Sequence[str],
                    seeds: Sequence[int | None] = (None,), force: bool = False) -> list[Result]:
    """Train every experiment for every seed (in `out/seed<N>/`, or `out/` for seed None), in order. A run
    folder that holds a previous run is an error, found before anything trains, unless `force`."""
    plan = [(seed, exp, experiment_config(folder, exp, out if seed is None else out / f"seed{seed}", overrides,
                                          seed)) for seed in seeds for exp in experiments]
    for _, _, cfg in plan:
        check_run_folder(cfg.out_path, resume=False, force=force)
    results = []
    for seed, exp, cfg in plan:
        where = "" if seed is None else f", seed {seed}"
        print(f"== {exp.label}: {cfg.train.epochs} epochs on {cfg.data.train_subset or 'all'} training "
              f"images{where}", flush=True)
        start = time.perf_counter()
        history = train(cfg, force=force)
        results.append(Result(exp, seed, cfg, history, time.perf_counter() - start))
    return results


def table_rows(results: Sequence[Result]) -> list[Row]:
    """One `Row` per experiment (in first-run order): final-epoch val errors and seconds of each seed."""
    rows: dict[str, Row] = {}
    for r in results:
        row = rows.setdefault(r.experiment.key, Row(r.experiment.label))
        row.top1.append(r.history[-1]["val_top1_err"])
        row.top5.append(r.history[-1]["val_top5_err"])
        row.seconds.append(r.seconds)
    return list(rows.values())
