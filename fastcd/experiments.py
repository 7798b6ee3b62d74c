"""Run a list of experiments from one config folder: a teacher first, then the rows that distil from it.

Used by `fastcd repro` (each seed has its own teacher) and `fastcd demo` (one teacher, trained once, shared
by every seed's students): the distilled students read the teacher's final checkpoint (`latest.pt`, the one
whose error the table reports). A teacher folder that already holds a finished run of exactly the same
config is reused, not retrained. With `teacher_cache`, the teacher's targets on that seed's crops are written once
(`fastcd.cache`, fp32: the same numbers the live teacher gives) and every row whose losses need no whole
teacher map (all but AT and FitNets) reads them instead of running the teacher.
"""
from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastcd.config import Config, drop_overrides_into_null, load_config
from fastcd.engine.run_folder import existing_run_files
from fastcd.engine.trainer import train
from fastcd.errors import FastcdError
from fastcd.losses.registry import loss_class
from fastcd.report import Row
from fastcd.utils.checkpoint import load_checkpoint

TEACHER = "t_resnet34"  # the config (file stem) whose final checkpoint the other rows distil from
CACHE = "teacher-cache"  # the folder, beside the seed's runs, of the teacher's stored targets
# Fields that do not change what a run computes: ignored when deciding whether a finished run can be reused.
COSMETIC = {"train": ("progress", "log_every", "tensorboard", "out_dir", "dist_timeout_s", "eval_every")}


@dataclass(frozen=True)
class Experiment:
    """One row: its config file stem in the folder, its label in the table, what it trains (the seed's
    Reference column), overrides of its own, and its run folder's name (default: the key)."""

    key: str
    label: str
    method: str = ""
    overrides: tuple[str, ...] = ()
    folder: str = ""


@dataclass
class Result:
    """One finished run: wall-clock and CPU seconds (this process and its loader workers); `reused` when an
    earlier run of the same config was found and not retrained."""

    experiment: Experiment
    seed: int | None
    config: Config
    history: list[dict[str, Any]]
    seconds: float
    cpu_seconds: float = 0.0
    reused: bool = False
    cache_seconds: float = 0.0  # writing the seed's teacher cache, before this (its first cached) row


def experiment_config(folder: Path, exp: Experiment, run_dir: Path, overrides: Sequence[str],
                      seed: int | None, teacher_dir: Path | None = None) -> Config:
    """The config of `exp` writing to `run_dir/<folder or key>`; a row with a teacher reads
    `<teacher_dir or run_dir>/<TEACHER>/latest.pt` unless the overrides set `teacher.weights`. The overrides
    are shared by every row: `teacher.*` ones apply only to rows that have a teacher."""
    path = folder / f"{exp.key}.yaml"
    weights = (teacher_dir or run_dir) / TEACHER / "latest.pt"
    extra = [f"train.out_dir={run_dir / (exp.folder or exp.key)}", f"teacher.weights={weights}",
             *overrides, *exp.overrides, *([f"train.seed={seed}"] if seed is not None else [])]
    return load_config(path, drop_overrides_into_null(path, extra))


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children (loader worker processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _essential(config: dict[str, Any]) -> dict[str, Any]:
    """`config` (plain values) less the COSMETIC fields."""
    return {k: ({f: v for f, v in section.items() if f not in COSMETIC[k]} if k in COSMETIC else section)
            for k, section in config.items()}


def finished_run(cfg: Config) -> list[dict[str, Any]] | None:
    """The history of a finished run of `cfg` in its folder — final checkpoint made with the same config
    (up to COSMETIC fields), all `train.epochs` epochs trained and evaluated — or None."""
    latest = cfg.out_path / "latest.pt"
    if not latest.is_file():
        return None
    try:
        ckpt = load_checkpoint(latest)
    except FastcdError:
        return None
    history = ckpt.get("history") or []
    if (_essential(ckpt.get("config", {})) != _essential(cfg.to_dict()) or ckpt.get("epoch") != cfg.train.epochs
            or len(history) != cfg.train.epochs or history[-1].get("val_top1_err") is None):
        return None
    return history


def cacheable(cfg: Config) -> bool:
    """A row with an eval-mode teacher whose losses read nothing a teacher cache lacks (whole stage maps)."""
    return (cfg.teacher is not None and cfg.teacher.bn_mode == "eval"
            and not any("tea_feats" in loss_class(s.loss_name).inputs for s in cfg.loss_list))


def write_teacher_cache(configs: Sequence[Config]) -> float:
    """Write (or go on with) the cache at `configs[0].teacher.cache` that every one of `configs` reads: their
    teacher over the most epochs any trains, fp32, with logits and embedding when one reads them; a cache of
    another teacher there (retrained since) is rebuilt. Returns the seconds it took."""
    from fastcd.cache.write import CacheMismatch, contents_for, write_cache

    path = Path(configs[0].teacher.cache)
    live = dataclasses.replace(configs[0], teacher=dataclasses.replace(configs[0].teacher, cache=""))
    reads = {name for cfg in configs for s in cfg.loss_list for name in loss_class(s.loss_name).inputs}
    contents = contents_for(live, "full" if "tea_logits" in reads else "none", "tea_embed" in reads, "fp32")
    epochs = max(cfg.train.epochs for cfg in configs)
    print(f"== teacher cache: {epochs} epochs of the teacher's targets into {path}", flush=True)
    start = time.perf_counter()
    try:
        write_cache(live, path, epochs, contents)
    except CacheMismatch:
        write_cache(live, path, epochs, contents, force=True)
    return time.perf_counter() - start


def run_experiments(folder: Path, experiments: Sequence[Experiment], out: Path, overrides: Sequence[str],
                    seeds: Sequence[int | None] = (None,), force: bool = False, fresh_teacher: bool = False,
                    teacher_cache: bool = False, shared_teacher: bool = False) -> list[Result]:
    """Train every experiment for every seed (in `out/seed<N>/`, or `out/` for seed None), in order. With
    `shared_teacher` the TEACHER experiment is trained once, in `out/` with its config's seed, before the
    seeds' rows, and every seed's rows distil from it. A teacher folder holding a finished run of the same
    config is reused (unless `fresh_teacher`); any other run folder that holds a previous run is an error,
    found before anything trains, unless `force`. With `teacher_cache`, each seed's cacheable rows read its
    teacher's targets from `<seed folder>/teacher-cache`, written before the first of them trains."""
    plan = []
    if shared_teacher:
        plan += [(None, exp, experiment_config(folder, exp, out, overrides, None))
                 for exp in experiments if exp.key == TEACHER]
        experiments = [exp for exp in experiments if exp.key != TEACHER]
    for seed in seeds:
        run_dir = out if seed is None else out / f"seed{seed}"
        for exp in experiments:
            cfg = experiment_config(folder, exp, run_dir, overrides, seed, out if shared_teacher else None)
            if teacher_cache and cacheable(cfg):
                cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache=str(run_dir / CACHE)))
            plan.append((seed, exp, cfg))
    cached = {}  # cache folder -> the configs that read it
    for _, _, cfg in plan:
        if cfg.teacher is not None and cfg.teacher.cache:
            cached.setdefault(cfg.teacher.cache, []).append(cfg)
    reusable = {id(cfg): history for _, exp, cfg in plan if exp.key == TEACHER and not fresh_teacher
                and (history := finished_run(cfg)) is not None}
    for _, _, cfg in plan:
        if id(cfg) not in reusable and not force and (found := existing_run_files(cfg.out_path)):
            raise FastcdError(f"run folder {str(cfg.out_path)!r} already holds a run ({', '.join(found)}); replace "
                              "the runs there with --force, or pick another --out")
    results = []
    for seed, exp, cfg in plan:
        where = "" if seed is None else f", seed {seed}"
        if id(cfg) in reusable:
            print(f"== {exp.label}{where}: reusing the finished run in {cfg.out_path} (trained earlier with the "
                  f"same config; --fresh-teacher retrains it)", flush=True)
            results.append(Result(exp, seed, cfg, reusable[id(cfg)], 0.0, reused=True))
            continue
        cache_seconds = 0.0
        if cfg.teacher is not None and cfg.teacher.cache in cached:
            cache_seconds = write_teacher_cache(cached.pop(cfg.teacher.cache))
        print(f"== {exp.label}: {cfg.train.epochs} epochs on {cfg.data.train_subset or 'all'} training "
              f"images{where}{', teacher targets from the cache' if cfg.teacher and cfg.teacher.cache else ''}",
              flush=True)
        start, cpu = time.perf_counter(), cpu_seconds()
        history = train(cfg, force=force)
        results.append(Result(exp, seed, cfg, history, time.perf_counter() - start, cpu_seconds() - cpu,
                              cache_seconds=cache_seconds))
    return results


def table_rows(results: Sequence[Result]) -> list[Row]:
    """One `Row` per experiment (per run folder name; in first-run order): final-epoch val errors and seconds
    of each seed; a row whose runs were all reused says so in its wall-clock cell."""
    rows: dict[str, Row] = {}
    reused: dict[str, list[bool]] = {}
    for r in results:
        key = r.experiment.folder or r.experiment.key
        row = rows.setdefault(key, Row(r.experiment.label, r.experiment.method))
        row.seeds.append(r.seed)
        row.top1.append(r.history[-1]["val_top1_err"])
        row.top5.append(r.history[-1]["val_top5_err"])
        row.seconds.append(r.seconds)
        reused.setdefault(key, []).append(r.reused)
    for key, row in rows.items():
        trained = [s for s, flag in zip(row.seconds, reused[key]) if not flag]
        if len(trained) < len(row.seconds):
            row.wall = (f"{statistics.mean(trained) / 60:.1f} min ({len(row.seconds) - len(trained)} reused)"
                        if trained else "reused")
    return list(rows.values())
