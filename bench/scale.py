"""The full-size rehearsal: ImageNet's shape (1,000 classes, 1,281,167 + 50,000 images) through every stage,
at several sizes, with each stage's time, memory and disk, and how they grow with the data.

Per size (a fraction of ImageNet: `--sizes 0.01,0.1,1`), `bench/scale_source.py` writes the source tree of tiny
JPEGs (once; reused), then each stage runs as its own fresh process (`python -m fastcd.cli ...`, in a session
of its own), measured from outside:

- wall and CPU seconds (the process with the children it reaped, `os.wait4`, or the sum over every process of
  its session seen while polling, whichever is more: loader workers forked by a fork server are not reaped by
  the stage's process), the largest single process's peak RSS (`ru_maxrss`, page cache of mapped files
  included), and the peak of the process tree's **own** memory, polled: the sum of `Pss_Anon + Pss_Shmem` of
  every process of its session (`/proc/<pid>/smaps_rollup`), so mapped shards and the page cache are not
  counted and memory shared by forked workers is counted once;
- the disk its output folder grew by (allocated blocks).

Stages: `scan` (listing the source, `open_source`), `prepare` (both formats), `rerun` (the same command with
nothing to do), `verify`, `rehash`, `resume` (a fresh `prepare` killed with SIGKILL at 30% of its time, then run
again: the resumed run's cost, and its output checked equal to the uninterrupted one), `loaders` (torch workers, the
device feed's host side, dali and ffcv: the epoch's setup, `set_epoch` to the first batch, for epoch 0 and 1;
img/s over up to `--loader-images` images of an epoch; and at 8 and 64 simulated ranks, rank 0's setup and
memory), `cache-teacher` (one epoch, a tiny ResNet-34 teacher; then reading the cache back in training order),
`train` (`checkpoint_every_steps`: killed after its first mid-epoch checkpoint, resumed with `fastcd train
--resume`: the time to its first new step; the checkpoint's size and write time) and `eval` (over the whole val
split).

Once, independent of the size: `prepare` of `--photo-images` photo-like JPEGs of ImageNet's sizes at max sides
256, 400 and 512 (time and CPU time per image, bytes per image of each format), for `docs/scale.md`'s projection.

The growth exponent of a cost between two sizes is log(cost ratio) / log(sample ratio); 1 is linear. The
record goes to `<date>-<machine>-scale.json` (`--out`), with the table printed beside it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from fastcd.data_prep.outdir import locked
from fastcd.errors import FastcdError
from fastcd.utils.atomic import atomic_write_json
from fastcd.utils.results import add_out_argument, record

STAGES = ("scan", "prepare", "rerun", "verify", "rehash", "resume", "loaders", "cache-teacher", "train", "eval")
LOADERS = ("torch", "feed", "dali", "ffcv")
RANKS = (1, 8, 64)
DEFAULT_ROOT = Path(tempfile.gettempdir()) / "fastcd-scale"
LOCK_NAME = ".bench-scale.lock"
RESULT = "SCALE-RESULT "  # the line a child stage prints its measurements on
POLL_S = 0.25
KILL_AT = 0.3  # the resume stage kills a fresh prepare at this share of the uninterrupted one's time
BATCH = 256
MAX_SIDES = (256, 400, 512)  # `fastcd prepare --max-side` values the photo-like measurement compares
RES = 16  # training and validation resolution of the loader, cache, train and eval stages


@dataclass
class Usage:
    """What one stage's process tree cost."""

    seconds: float
    cpu_seconds: float
    peak_rss_mib: float  # the largest single process, file-backed pages included
    own_peak_mib: float  # the whole tree's anonymous + shared memory, page cache excluded
    disk_mib: float | None = None


TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """The session of process `pid` and its own CPU seconds (user + system) so far; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[3]), (int(fields[11]) + int(fields[12])) / TICK


def _poll(sid: int, cpu: dict[int, float]) -> int:
    """Pss_Anon + Pss_Shmem of every live process of session `sid`, in KiB; each one's CPU seconds into `cpu`."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or (stat := _stat(int(entry))) is None or stat[0] != sid:
            continue
        cpu[int(entry)] = stat[1]
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{entry}/smaps_rollup").read_text().splitlines():
                if line.startswith(("Pss_Anon:", "Pss_Shmem:")):
                    total += int(line.split()[1])
    return total


def disk_mib(path: Path) -> float:
    """Allocated size of the files under `path` (0 when it does not exist)."""
    blocks = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                blocks += os.lstat(os.path.join(folder, name)).st_blocks
    return round(blocks * 512 / 2**20, 1)


def run_stage(argv: list[str], log: Path, *, disk: Path | None = None,
              stop_when: Callable[[], bool] | None = None) -> tuple[Usage, str, int]:
    """Run `argv` in a session of its own, measured: its `Usage`, its output and its exit status. With
    `stop_when`, the whole session is killed (SIGKILL) as soon as it returns True."""
    before = disk_mib(disk) if disk is not None else 0.0
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    own, status, usage, cpu = 0, None, None, {}
    try:
        while status is None:
            own = max(own, _poll(proc.pid, cpu))
            if stop_when is not None and stop_when():
                os.killpg(proc.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == 0:
                status = None
                time.sleep(POLL_S)
    finally:
        if status is None:  # interrupted: the stage goes with this process
            os.killpg(proc.pid, signal.SIGKILL)
            os.wait4(proc.pid, 0)
        proc.returncode = 0  # reaped here; keeps Popen from waiting for it again
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything of the stage left in its session
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    # CPU: the process with the children it reaped (wait4), or the sum over every process seen, whichever is more
    # (a fork server's workers are not reaped by the stage's process; their last poll interval is missed)
    cpu_seconds = max(usage.ru_utime + usage.ru_stime, sum(cpu.values()))
    result = Usage(round(seconds, 2), round(cpu_seconds, 2), round(usage.ru_maxrss / 1024, 1),
                   round(own / 1024, 1), round(disk_mib(disk) - before, 1) if disk is not None else None)
    return result, log.read_text(errors="replace"), code


def fastcd(line: str, **values: object) -> list[str]:
    """The command line `line` (`fastcd ...`, its `{name}` words replaced by `values`, one argument each: paths
    may hold spaces) in this interpreter."""
    words = [str(values[w[1:-1]]) if w.startswith("{") else w for w in line.split()]
    return [sys.executable, "-m", "fastcd.cli", *words[1:]]


def _child_result(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith(RESULT)]
    return json.loads(lines[-1][len(RESULT):]) if lines else {}


def _failed(stage: str, output: str, code: int) -> FastcdError:
    last = [line for line in output.strip().splitlines() if line.strip()][-1:] or ["no output"]
    return FastcdError(f"stage {stage} failed (exit status {code}): {last[0]}")


class Rehearsal:
    """The stages at one size: the source, the prepared folder and the runs live under `root`."""

    def __init__(self, root: Path, fraction: float, workers: int, loader_images: int,
                 loaders: tuple[str, ...] = LOADERS, ranks: tuple[int, ...] = RANKS, batch: int = BATCH,
                 seed: int = 0) -> None:
        self.root, self.fraction, self.workers, self.loader_images = root, fraction, workers, loader_images
        self.batch = batch
        self.backends, self.ranks, self.seed = loaders, ranks, seed
        self.src, self.out, self.work = root / "src", root / "prepared", root / "work"
        self.labels = self.src / "LOC_val_solution.csv"
        self.rows: dict[str, dict] = {}
        # what an earlier invocation measured at this size (ROOT/<size>/rows.json), for a stage run on its own
        self.earlier: dict[str, dict] = json.loads((root / "rows.json").read_text()) if (root / "rows.json").is_file() \
            else {}

    def measured(self, stage: str, argv: list[str], *, disk: Path | None = None,
                 stop_when: Callable[[], bool] | None = None, killed: bool = False) -> tuple[dict, str]:
        """Run one stage's process: its row (usage and what the child reported) and its output."""
        self.work.mkdir(parents=True, exist_ok=True)
        usage, output, code = run_stage(argv, self.work / f"{stage}.log", disk=disk, stop_when=stop_when)
        if code != 0 and not killed:
            raise _failed(stage, output, code)
        return {**asdict(usage), **_child_result(output)}, output

    def prepare_argv(self, out: Path, rehash: bool = False) -> list[str]:
        line = ("fastcd prepare {src} {out} --labels {labels} --quiet --workers {workers} --rehash" if rehash
                else "fastcd prepare {src} {out} --labels {labels} --quiet --workers {workers}")
        return fastcd(line, src=self.src, out=out, labels=self.labels, workers=self.workers)

    def child_argv(self, kind: str, **spec: object) -> list[str]:
        spec = {"kind": kind, "src": str(self.src), "labels": str(self.labels), "out": str(self.out),
                "workers": self.workers, "images": self.loader_images, "batch": self.batch, **spec}
        return fastcd("fastcd bench scale --child {spec}", spec=json.dumps(spec))

    def scan(self) -> None:
        self.rows["scan"] = self.measured("scan", self.child_argv("scan"))[0]

    def prepare(self) -> None:
        shutil.rmtree(self.out, ignore_errors=True)
        self.rows["prepare"] = self.measured("prepare", self.prepare_argv(self.out), disk=self.out)[0]

    def rerun(self) -> None:
        self.rows["rerun"] = self.measured("rerun", self.prepare_argv(self.out))[0]

    def verify(self) -> None:
        self.rows["verify"] = self.measured("verify", fastcd("fastcd prepare --verify {out}", out=self.out))[0]

    def rehash(self) -> None:
        self.rows["rehash"] = self.measured("rehash", self.prepare_argv(self.out, rehash=True))[0]

    def resume(self) -> None:
        """A fresh prepare killed (SIGKILL, its whole session) at `KILL_AT` of the uninterrupted run's time, then
        run again to the end."""
        other = self.root / "prepared-resumed"
        shutil.rmtree(other, ignore_errors=True)
        prepared = self.rows.get("prepare") or self.earlier.get("prepare")
        if prepared is None:
            raise FastcdError("the resume stage needs the prepare stage's time: run them together")
        deadline = time.perf_counter() + prepared["seconds"] * KILL_AT
        killed, _ = self.measured("resume-killed", self.prepare_argv(other), disk=other,
                                  stop_when=lambda: time.perf_counter() > deadline, killed=True)
        row, _ = self.measured("resume", self.prepare_argv(other), disk=other)
        row["killed_after_s"] = killed["seconds"]
        betons = self.measured("betons", self.child_argv("betons", a=str(self.out), b=str(other)))[0]
        row["same_output"] = _shards_and_tables(self.out) == _shards_and_tables(other) and betons["same"]
        self.rows["resume"] = row
        shutil.rmtree(other, ignore_errors=True)

    def loaders(self) -> None:
        for backend in self.backends:
            for ranks in self.ranks:
                try:
                    row = self.measured(f"loader-{backend}-{ranks}", self.child_argv(
                        "loader", backend=backend, world_size=ranks))[0]
                except FastcdError as e:
                    row = {"failed": str(e)}
                self.rows[f"loader {backend} x{ranks}"] = row

    def config(self, cache: Path | None = None) -> Path:
        """The tiny distillation run of the cache, train and eval stages (1,000 classes, 16 px)."""
        import yaml

        path = self.work / "scale.yaml"
        model = {"stem": "cifar", "width": 0.0625, "num_classes": 1000}
        raw = {"name": "scale",
               "student": {"arch": "resnet18", **model},
               "teacher": {"arch": "resnet34", **model, "weights": "none", "cache": str(cache or "")},
               "loss_list": [{"loss_name": "CELoss", "loss_type": "ce_family"},
                             {"loss_name": "KDLossv2", "T": 2, "loss_type": "kdv2_family"},
                             {"loss_name": "CDLoss", "loss_rate": 6, "factor": 0.9, "loss_type": "fd_family"}],
               "data": {"backend": "torch", "path": str(self.out), "res": RES, "val_res": RES, "batch_size": self.batch,
                        "workers": self.workers, "decode": "workers", "val_resize_ratio": 1.0},
               "optim": {"lr": 0.1, "schedule": "cosine"},
               "train": {"epochs": 1, "out_dir": str(self.work / "run"), "amp": "fp32", "device": "cpu",
                         "channels_last": False, "log_every": 1, "progress": False, "seed": self.seed,
                         "checkpoint_every_steps": 5}}
        self.work.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    def cache_teacher(self) -> None:
        cache = self.work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        row = self.measured("cache-teacher", fastcd("fastcd cache-teacher {cfg} --epochs 1 --out {cache}",
                                                      cfg=self.config(), cache=cache), disk=cache)[0]
        row["bytes_per_sample"] = round(row["disk_mib"] * 2**20 / self._train_samples(), 1)
        self.rows["cache-teacher"] = row
        self.rows["cache read"] = self.measured("cache-read", self.child_argv(
            "cache-read", cache=str(cache)))[0]

    def _train_samples(self) -> int:
        return json.loads((self.out / "manifest.json").read_text())["splits"]["train"]["num_samples"]

    def train(self) -> None:
        """Train until the first mid-epoch `latest.pt`, killed there; resumed to its first new step."""
        cfg = self.config(self.work / "cache")
        run = self.work / "run"
        shutil.rmtree(run, ignore_errors=True)
        latest = run / "latest.pt"
        stepped = _Seen(lambda: any(True for _ in _steps(run)))
        first, _ = self.measured("train", fastcd("fastcd train {cfg}", cfg=cfg),
                                 stop_when=lambda: stepped() and latest.is_file(), killed=True)
        if not latest.is_file():
            raise FastcdError(f"stage train ended before its first checkpoint; see {self.work / 'train.log'}")
        first["first_step_s"] = stepped.after
        done = _checkpoint_step(latest)
        _drop_steps_after(run / "metrics.jsonl", done)  # as the resumed run does: a later record is then its own
        resumed = _Seen(lambda: max(_steps(run), default=0) > done)
        row, _ = self.measured("train-resume", fastcd("fastcd train {cfg} --resume", cfg=cfg), stop_when=resumed,
                               killed=True)
        if resumed.after is None:
            raise FastcdError(f"stage train-resume made no step; see {self.work / 'train-resume.log'}")
        row.update(first_step_s=resumed.after, resumed_after_step=done)
        self.rows["train"] = first
        self.rows["train resume"] = row
        self.rows["checkpoint"] = self.measured("checkpoint", self.child_argv("checkpoint", path=str(latest)))[0]

    def eval(self) -> None:
        checkpoint = self.work / "run" / "latest.pt"
        self.rows["eval"] = self.measured("eval", fastcd("fastcd eval {cfg} --checkpoint {checkpoint}",
                                                         cfg=self.config(self.work / "cache"),
                                                         checkpoint=checkpoint))[0]


def photo_costs(root: Path, images: int, workers: int) -> list[dict]:
    """`prepare` of `images` photo-like JPEGs of ImageNet's sizes (300-640 px a side, `bench/prepare.py`'s
    generator) at each of `MAX_SIDES`: seconds and CPU seconds per image, and bytes per image of each format."""
    from fastcd.bench.prepare import generate

    src = generate(root / "photos" / str(images), images, workers)
    work = root / "photos" / "work"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for side in MAX_SIDES:
        out = work / f"out-{side}"
        shutil.rmtree(out, ignore_errors=True)
        argv = fastcd("fastcd prepare {src} {out} --max-side {side} --quiet --workers {workers}", src=src, out=out,
                      side=side, workers=workers)
        usage, output, code = run_stage(argv, work / f"prepare-{side}.log", disk=out)
        if code != 0:
            raise _failed(f"photo-like fastcd prepare --max-side {side}", output, code)
        split = json.loads((out / "manifest.json").read_text())["splits"]["train"]
        n = split["num_samples"]
        rows.append({"max_side": side, "images": n, **asdict(usage),
                     "seconds_per_image": round(usage.seconds / n, 5), "cpu_seconds_per_image": round(
                         usage.cpu_seconds / n, 5),
                     "tar_bytes_per_image": round(sum(x["bytes"] for x in split["shards"]) / n),
                     "beton_bytes_per_image": round(split["beton_bytes"] / n)})
        shutil.rmtree(out, ignore_errors=True)
    return rows


def _steps(run: Path) -> Iterator[int]:
    """The steps of the step records in `run/metrics.jsonl` so far."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            r = json.loads(line)
            if r.get("kind") == "step":
                yield int(r["step"])


def _betons_child(spec: dict) -> dict:
    """Whether the `.beton`s of two prepared folders (`a`, `b`) hold the same samples, split by split."""
    a, b = Path(spec["a"]), Path(spec["b"])
    splits = json.loads((a / "manifest.json").read_text())["splits"]
    same = {split: _beton_digest(a / f"{split}.beton") == _beton_digest(b / f"{split}.beton") for split in splits}
    return {"same": all(same.values()), "splits": same}


def _beton_digest(path: Path) -> str:
    """A digest of a `.beton`'s samples, not of its layout: each sample's stored fields (the image's data
    pointer aside) and its bytes, in sample order. ffcv's writer places pages in the order its workers fill
    them, so two runs over the same shards differ in layout and even size (a worker's last page)."""
    import hashlib

    import numpy as np
    from ffcv.reader import Reader

    reader = Reader(str(path))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    meta = reader.metadata
    fields = [n for n in meta.dtype.names if n != "f0"]
    image = meta["f0"]
    sha = hashlib.sha256()
    for column in [image[f] for f in ("mode", "width", "height")] + [meta[name] for name in fields]:
        sha.update(np.ascontiguousarray(column).tobytes())  # a field at a time: a multi-field view keeps the
        # record's layout, data pointers included
    table = np.sort(reader.alloc_table, order="sample_id")
    for ptr, size in zip(table["ptr"].tolist(), table["size"].tolist()):
        sha.update(data[ptr:ptr + size])
    return f"{reader.num_samples} {sha.hexdigest()}"


def _checkpoint_step(path: Path) -> int:
    """The step (of its epoch) a mid-epoch checkpoint was written at."""
    from fastcd.utils.checkpoint import load_checkpoint

    return int(load_checkpoint(path)["position"]["step"])


def _drop_steps_after(path: Path, step: int) -> None:
    """Keep the step records of `path` up to `step` (the others are logged again by a run resumed there), and
    drop a line the kill tore, as the resumed run does."""
    def kept(line: str) -> bool:
        try:
            record = json.loads(line)
        except ValueError:
            return False
        return record.get("kind") != "step" or record["step"] <= step
    path.write_text("".join(line for line in path.read_text().splitlines(keepends=True) if kept(line)))


class _Seen:
    """A condition polled while a stage runs, and the seconds from the first poll to when it first held."""

    def __init__(self, condition: Callable[[], bool]) -> None:
        self.condition, self.start, self.after = condition, None, None

    def __call__(self) -> bool:
        now = time.perf_counter()
        self.start = self.start or now
        if self.after is None and self.condition():
            self.after = round(now - self.start, 2)
        return self.after is not None


def _shards_and_tables(root: Path) -> list:
    """Every split's sample count, shards' and indexes' sha256 and sizes, and its sample table's sha256."""
    m = json.loads((root / "manifest.json").read_text())
    return [[s["num_samples"], s.get("samples", {}).get("sha256"), [(x["sha256"], x["bytes"]) for x in s["shards"]]]
            for _, s in sorted(m["splits"].items())]


def bytes_per_sample(sizes: list[dict]) -> list[dict]:
    """Per stage, between consecutive sizes: the own memory each extra sample cost (the memory constant)."""
    out = []
    for small, big in zip(sizes, sizes[1:]):
        extra = big["samples"] - small["samples"]
        out.append({stage: round((row["own_peak_mib"] - small["stages"][stage]["own_peak_mib"]) * 2**20 / extra, 1)
                    for stage, row in big["stages"].items()
                    if "own_peak_mib" in row and "own_peak_mib" in small["stages"].get(stage, {}) and extra > 0})
    return out


def exponents(sizes: list[dict], key: str) -> list[dict[str, float]]:
    """The growth exponent of `key` of every stage between consecutive sizes, per stage."""
    out = []
    for small, big in zip(sizes, sizes[1:]):
        ratio = big["samples"] / small["samples"]
        grown = {}
        for stage, row in big["stages"].items():
            a, b = small["stages"].get(stage, {}).get(key), row.get(key)
            if a and b and a > 0 and b > 0 and ratio > 1:
                grown[stage] = round(math.log(b / a) / math.log(ratio), 2)
        out.append(grown)
    return out


def _emit(result: dict) -> None:
    print(RESULT + json.dumps(result), flush=True)


def _scan_child(spec: dict) -> dict:
    from fastcd.data_prep.sources import open_source

    start = time.perf_counter()
    source = open_source(spec["src"], labels_file=spec["labels"])
    return {"listed_s": round(time.perf_counter() - start, 2),
            "files": {name: len(split.names) for name, split in source.splits.items()}}


def _loader_child(spec: dict) -> dict:
    """One backend at one world size, rank 0: its build, each epoch's setup (set_epoch to the first batch) and
    img/s over up to `images` images of epoch 0 (only on one rank)."""
    import torch

    from fastcd.config import DataConfig
    from fastcd.data import LoaderContext, build_loader
    from fastcd.data.crops import CropPlan
    from fastcd.data.feed import HostFeed

    backend, ranks, batch = spec["backend"], spec["world_size"], spec["batch"]
    is_feed = backend == "feed"  # the torch backend's loader for its order and table; no workers of its own
    cfg = DataConfig(backend="torch" if is_feed else backend, path=spec["out"], batch_size=batch, res=RES,
                     workers=0 if is_feed else spec["workers"], decode="workers")
    ctx = LoaderContext(torch.device("cpu"), torch.float32, channels_last=False, num_classes=1000, rank=0,
                        world_size=ranks)
    start = time.perf_counter()
    loader = build_loader(cfg, "train", ctx)
    row: dict = {"build_s": round(time.perf_counter() - start, 3)}
    feed = HostFeed(loader.samples, 2, False) if is_feed else None

    def batches(epoch: int) -> Iterator[int]:
        loader.set_epoch(epoch)
        if feed is None:
            for _, labels in loader:
                yield len(labels)
            return
        plan = CropPlan(True, loader.res, cfg.scale_min, cfg.val_resize_ratio, ctx.seed, epoch)
        for indices in loader.batch_indices():
            feed.release(feed.batch(indices, plan), None)
            yield len(indices)

    row["samples_per_epoch"] = len(loader) * batch
    if not len(loader):  # fewer samples than ranks * batch: nothing to time
        return {**row, "note": f"no full batch of {batch} on each of {ranks} ranks"}
    for epoch in (0, 1):
        start = time.perf_counter()
        it = batches(epoch)
        next(it)
        row[f"epoch{epoch}_setup_s"] = round(time.perf_counter() - start, 3)
        if epoch == 0 and ranks == 1:
            start = time.perf_counter()
            n = 0
            for size in it:
                n += size
                if n >= spec["images"]:
                    break
            row.update(images=n, images_per_s=round(n / (time.perf_counter() - start), 1))
        it.close()
    return row


def _cache_read_child(spec: dict) -> dict:
    """Read epoch 0 of a teacher cache back in training order, as `teacher.cache` does."""
    import torch

    from fastcd.cache.store import CacheReader
    from fastcd.config import DataConfig
    from fastcd.data import LoaderContext, build_loader

    start = time.perf_counter()
    reader = CacheReader(spec["cache"])
    reader.check([0])
    cfg = DataConfig(backend="torch", path=spec["out"], batch_size=spec["batch"], res=RES, workers=0,
                     decode="workers")
    loader = build_loader(cfg, "train", LoaderContext(torch.device("cpu"), num_classes=1000))
    loader.set_epoch(0)
    opened = time.perf_counter() - start
    n = sum(len(t.logits if t.logits is not None else t.means[0])
            for t in reader.batches(0, loader.batch_indices(), torch.device("cpu")))
    seconds = time.perf_counter() - start - opened
    return {"open_s": round(opened, 3), "images": n, "images_per_s": round(n / seconds, 1)}


def _checkpoint_child(spec: dict) -> dict:
    """The size of a checkpoint, and the median of three writes of it (`save_checkpoint`: fsynced, renamed)."""
    import statistics

    from fastcd.utils.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(spec["path"])
    state.pop("format", None)
    times = []
    with tempfile.TemporaryDirectory(dir=Path(spec["path"]).parent) as tmp:
        for _ in range(3):
            start = time.perf_counter()
            save_checkpoint(Path(tmp) / "latest.pt", state)
            times.append(time.perf_counter() - start)
    return {"checkpoint_mib": round(Path(spec["path"]).stat().st_size / 2**20, 2),
            "write_s": round(statistics.median(times), 3)}


CHILDREN: dict[str, Callable[[dict], dict]] = {"scan": _scan_child, "loader": _loader_child,
                                               "cache-read": _cache_read_child, "checkpoint": _checkpoint_child,
                                               "betons": _betons_child}


def _sizes(text: str) -> list[float]:
    try:
        sizes = sorted(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give fractions of ImageNet, e.g. 0.01,0.1,1") from None
    if not sizes or not all(0 < f <= 1 for f in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be in (0, 1]")
    return sizes


def _choice(names: tuple) -> Callable[[str], list]:
    """A comma list of some of `names`, kept in their order (stages: later ones need the earlier outputs)."""
    def parse(text: str) -> list:
        given = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [n for n in given if n not in map(str, names)]
        if unknown or not given:
            raise argparse.ArgumentTypeError(f"unknown {unknown[0] if unknown else text!r}; choose from "
                                             f"{','.join(map(str, names))}")
        return [n for n in names if str(n) in given]
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=_sizes, default=[0.01, 0.1, 1.0],
                        help="fractions of ImageNet's size to rehearse (default 0.01,0.1,1: 1/100, 1/10 and full)")
    parser.add_argument("--stages", type=_choice(STAGES), default=list(STAGES),
                        help=f"comma list of {','.join(STAGES)} (default: all, in that order; later stages need "
                        "the earlier ones' outputs)")
    parser.add_argument("--loaders", type=_choice(LOADERS), default=list(LOADERS),
                        help=f"loaders of the loaders stage, of {','.join(LOADERS)} (default: all)")
    parser.add_argument("--ranks", type=_choice(RANKS), default=list(RANKS),
                        help=f"simulated world sizes of the loaders stage, of {','.join(map(str, RANKS))} "
                        "(default: all)")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                        help=f"work folder: the generated sources (kept and reused) and every output ({DEFAULT_ROOT})")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes of every stage (default: all cores)")
    parser.add_argument("--loader-images", type=int, default=200_000,
                        help="images each loader reads for its img/s (default 200000; at most one epoch)")
    parser.add_argument("--batch", type=int, default=BATCH,
                        help=f"batch size of every loader and run (default {BATCH})")
    parser.add_argument("--photo-images", type=int, default=600,
                        help="photo-like JPEGs of ImageNet's sizes whose `prepare` cost and bytes per image at max "
                        f"sides {', '.join(map(str, MAX_SIDES))} are measured once (default 600; 0: not measured)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one measured stage in this process (JSON spec)
    add_out_argument(parser)


def _table(sizes: list[dict], growth: list[dict]) -> str:
    stages = list(dict.fromkeys(s for size in sizes for s in size["stages"]))
    head = " | ".join(f"{size['label']} s | {size['label']} own MiB" for size in sizes)
    exps = " | ".join(f"exp {a['label']}->{b['label']}" for a, b in zip(sizes, sizes[1:]))
    lines = [f"| stage | {head} | {exps} |", "|---" * (1 + 2 * len(sizes) + len(growth)) + "|"]
    for stage in stages:
        cells = []
        for size in sizes:
            row = size["stages"].get(stage, {})
            cells += [f"{row['seconds']:.1f}" if "seconds" in row else "-",
                      f"{row['own_peak_mib']:.0f}" if "own_peak_mib" in row else "-"]
        cells += [f"{g[stage]:.2f}" if stage in g else "-" for g in growth]
        lines.append(f"| {stage} | {' | '.join(cells)} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.child:
        spec = json.loads(args.child)
        _emit(CHILDREN[spec["kind"]](spec))
        return 0
    if min(args.workers, args.loader_images, args.batch) < 1 or args.photo_images < 0:
        raise FastcdError("--workers, --loader-images and --batch must be at least 1, --photo-images at least 0")
    with locked(args.root, LOCK_NAME, "fastcd bench scale", "--root"):  # its stages delete and rewrite folders
        return _rehearse(args)


def _rehearse(args: argparse.Namespace) -> int:
    """Every size of `args.sizes` through `args.stages`, then the photo-like costs; the record."""
    from fastcd.bench.scale_source import generate, layout

    sizes = []
    for fraction in args.sizes:
        lay = layout(fraction)
        label = f"1/{round(1 / fraction)}" if fraction < 1 else "full"
        root = args.root / f"{fraction:g}"
        print(f"[{label}] {lay.train_images} train + {len(lay.val_labels)} val images in {root}", flush=True)
        start = time.perf_counter()
        generate(root / "src", fraction, args.workers)
        print(f"[{label}] source ready in {time.perf_counter() - start:.1f} s", flush=True)
        rehearsal = Rehearsal(root, fraction, args.workers, args.loader_images, args.loaders, args.ranks, args.batch)
        for stage in args.stages:
            before = set(rehearsal.rows)
            try:
                getattr(rehearsal, stage.replace("-", "_"))()
            except FastcdError as e:  # recorded as the stage's row; the stages after it that need it fail too
                rehearsal.rows.setdefault(stage, {"failed": str(e)})
            atomic_write_json(root / "rows.json", rehearsal.rows)  # what a size measured so far, kept
            for name in [n for n in rehearsal.rows if n not in before]:
                row = rehearsal.rows[name]
                shown = (f"{row['seconds']:.1f} s, CPU {row['cpu_seconds']:.1f} s, own {row['own_peak_mib']:.0f} MiB"
                         if "seconds" in row else row.get("failed", ""))
                print(f"[{label}] {name}: {shown}", flush=True)
        sizes.append({"fraction": fraction, "label": label, "train_images": lay.train_images,
                      "val_images": len(lay.val_labels), "samples": lay.train_images + len(lay.val_labels),
                      "stages": rehearsal.rows})
    growth = [{"from": a["label"], "to": b["label"], "seconds": g, "own_peak_mib": m, "own_bytes_per_sample": c}
              for a, b, g, m, c in zip(sizes, sizes[1:], exponents(sizes, "seconds"), exponents(sizes, "own_peak_mib"),
                                       bytes_per_sample(sizes))]
    print(_table(sizes, [g["seconds"] for g in growth]))
    photos = photo_costs(args.root, args.photo_images, args.workers) if args.photo_images else []
    for row in photos:
        print(f"photo-like, max side {row['max_side']}: {row['seconds_per_image'] * 1e3:.1f} ms/img wall, "
              f"{row['cpu_seconds_per_image'] * 1e3:.1f} ms/img CPU, {row['tar_bytes_per_image']} B/img (shards), "
              f"{row['beton_bytes_per_image']} B/img (.beton)")
    path = record("scale", {"workers": args.workers, "loader_images": args.loader_images, "batch": args.batch,
                            "res": RES, "sizes": sizes, "growth": growth, "photo_like": photos}, args.out)
    print(f"recorded in {path}")
    return 0

