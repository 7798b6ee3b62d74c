"""`prepare()`: convert SRC's splits into OUT's FFCV and DALI formats, resumable, manifest last.

Per split: worker processes normalise the images (decode once, see `normalise.py`) in sample
order; this process writes them into webdataset shards with their DALI index, one shard at a time
(temporary name, renamed when complete). The `.beton` is then written by ffcv's writer from those
shard bytes. With only `--formats ffcv`, the shards are staged under OUT/.prepare and removed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fastcd.data_prep.beton import WRITE_MODES, write_beton
from fastcd.data_prep.manifest import FORMAT_VERSION, load_manifest, manifest_path, write_manifest
from fastcd.data_prep.normalise import Normalised, normalise_item, source_sha256
from fastcd.data_prep.outdir import claimed
from fastcd.data_prep.pool import Lost, WorkerPool
from fastcd.data_prep.sample_table import add_missing_tables, missing_tables, shard_rows, write_table
from fastcd.data_prep.shards import ShardWriter, sample_key, sha256_file, shard_name
from fastcd.data_prep.sources import Source, SplitSource, open_source
from fastcd.data_prep.state import WORK_DIR, RunState, unfinished
from fastcd.errors import FastcdError
from fastcd.utils.atomic import atomic_path

FORMATS = ("ffcv", "dali")
MAX_SIDE = 512
JPEG_QUALITY = 90
SHARD_SAMPLES = 1000
STRICT_NAMES_SHOWN = 5
JPEG_MAX_SIDE = 65500  # the JPEG format's limit
ITEM_SECONDS = 600  # a file whose decoding takes longer is skipped (its worker is replaced)


def _check(formats: Sequence[str], max_side: int, jpeg_quality: int, workers: int, shard_samples: int,
           limit: int | None, ffcv_write_mode: str, ffcv_compress_probability: float) -> None:
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise FastcdError(f"--formats {','.join(formats)!r}: choose one or more of {','.join(FORMATS)}")
    checks = [(16 <= max_side <= JPEG_MAX_SIDE, f"--max-side {max_side}: must be in 16..{JPEG_MAX_SIDE}"),
              (1 <= jpeg_quality <= 100, f"--jpeg-quality {jpeg_quality}: must be in 1..100"),
              (workers >= 1, f"--workers {workers}: must be at least 1"),
              (shard_samples >= 1, f"--shard-samples {shard_samples}: must be at least 1"),
              (limit is None or limit >= 1, f"--limit {limit}: must be at least 1 (leave it out for every sample)"),
              (ffcv_write_mode in WRITE_MODES, f"ffcv write mode {ffcv_write_mode!r}: choose from {WRITE_MODES}"),
              (0 <= ffcv_compress_probability <= 1, "ffcv compress probability must be in [0, 1]")]
    for ok, message in checks:
        if not ok:
            raise FastcdError(message)


DIGEST_CHUNK = 65536  # samples hashed at a time (the text is never built whole: 50 MB at ImageNet's size)


def _digest(options: dict, source: Source) -> str:
    """Identity of a run's output: options that change bytes, class names and the sample listing.

    The listing's bytes are those it always had: the names joined by newlines, then the labels as the text of
    a Python list (`[3, 0, 7]`); hashed a chunk at a time."""
    sha = hashlib.sha256(json.dumps([options, source.classes], sort_keys=True).encode())
    for name, split in source.splits.items():
        sha.update(f"\0{name}\0".encode())
        n = len(split.names)
        for lo in range(0, n, DIGEST_CHUNK):
            names = (split.names[i] for i in range(lo, min(n, lo + DIGEST_CHUNK)))
            sha.update(("\n" if lo else "").encode() + "\n".join(names).encode())
        labels = np.asarray(split.labels)
        sha.update(b"[")
        for lo in range(0, len(labels), DIGEST_CHUNK):
            chunk = labels[lo:lo + DIGEST_CHUNK].tolist()
            sha.update(((", " if lo else "") + ", ".join(map(str, chunk))).encode())
        sha.update(b"]")
    return sha.hexdigest()


def _normalised(pool: WorkerPool, split: SplitSource, shards: list[int], shard_samples: int) -> Iterator[Normalised]:
    """Normalise the samples of `shards`, in order, in the pool's processes."""
    n = len(split.names)
    items = (split.items[i] for s in shards for i in range(s * shard_samples, min(n, (s + 1) * shard_samples)))
    for result in pool.map(items):
        yield Normalised(None, note=result.reason) if isinstance(result, Lost) else result


def _write_shard(split: SplitSource, lo: int, hi: int, first_key: int, folder: Path, stem: str,
                 results: Iterator[Normalised], bar: tqdm) -> dict:
    """Write the samples of source items [lo, hi) as one shard; return its record."""
    tar, idx = folder / f"{stem}.tar", folder / f"{stem}.idx"
    folder.mkdir(parents=True, exist_ok=True)
    tmp_tar, tmp_idx = folder / f".{stem}.tar.tmp", folder / f".{stem}.idx.tmp"
    writer = ShardWriter(tmp_tar, tmp_idx)
    skipped, repaired, counts, per_class, sources = [], [], Counter(), Counter(), hashlib.sha256()
    labels, sizes = [], []  # of the samples written, for the split's sample table
    try:
        for i in range(lo, hi):
            r = next(results)
            sources.update(r.source_sha256.encode())
            counts[r.outcome] += 1
            bar.update()
            if r.jpeg is None:
                skipped.append({"path": split.names[i], "reason": r.note})
                continue
            if r.outcome == "repaired":
                repaired.append({"path": split.names[i], "action": f"{r.note}; saved as RGB JPEG"})
            label = int(split.labels[i])
            writer.add(sample_key(first_key + writer.num_samples), r.jpeg, label)
            per_class[label] += 1
            labels.append(label)
            sizes.append((r.height, r.width))
    except BaseException:
        writer.abort()
        tmp_tar.unlink(missing_ok=True)
        raise
    record = {"num_samples": writer.num_samples, "first_key": first_key, **writer.close(),
              "skipped": skipped, "repaired": repaired, "counts": dict(counts), "source_sha256": sources.hexdigest(),
              "classes": {str(label): n for label, n in sorted(per_class.items())}, "labels": labels,
              "sizes": sizes}
    if writer.num_samples:
        os.replace(tmp_idx, idx)
        os.replace(tmp_tar, tar)
    else:  # every file of this shard was skipped: no shard (DALI rejects empty tars)
        tmp_idx.unlink()
        tmp_tar.unlink()
    return record


def shard_sources(split: SplitSource, lo: int, hi: int) -> str:
    """The digest of source items [lo, hi) as they are now (read and hashed here: `--rehash`), equal to the
    shard record's `source_sha256` when none changed since it was written."""
    return hashlib.sha256("".join(source_sha256(split.items[i]) for i in range(lo, hi)).encode()).hexdigest()


def split_sources(records: list[dict]) -> str:
    """The digest of a split's source bytes, from its shard records (the manifest's `source_sha256`)."""
    return hashlib.sha256("".join(r["source_sha256"] for r in records).encode()).hexdigest()


def _finished_shard(state: RunState, split: SplitSource, folder: Path, stem: str, sources: str | None) -> dict | None:
    """The record of a shard finished by an earlier (interrupted) run, if its files are there with the
    recorded sha256 (a shard damaged since is redone) and, when `sources` is given (`--rehash`), its source
    files hash as they did then (a shard whose sources changed is redone)."""
    record = state.load(f"{split.name}/{stem}")
    if record is None or (sources is not None and record.get("source_sha256") != sources):
        return None
    if not record["num_samples"]:
        return record
    tar, idx = folder / f"{stem}.tar", folder / f"{stem}.idx"
    intact = tar.is_file() and idx.is_file() and sha256_file(tar) == record["sha256"] \
        and sha256_file(idx) == record["index_sha256"]
    return _compact(record) if intact else None


def _convert_split(split: SplitSource, out: Path, state: RunState, dali: bool, opts: dict,
                   pool: WorkerPool, progress: bool, rehash: bool) -> tuple[list[dict], Counter]:
    """Write (or resume) every shard of `split`; return the shard records, in order, and outcome counts."""
    size, n = opts["shard_samples"], len(split.names)
    folder = out / split.name if dali else state.staging(split.name)
    stems = [shard_name(s) for s in range(math.ceil(n / size))]
    records = [_finished_shard(state, split, folder, stem, shard_sources(split, s * size, min(n, (s + 1) * size))
                               if rehash else None) for s, stem in enumerate(stems)]
    todo = [s for s, r in enumerate(records) if r is None]
    todo_count = sum(min(n, (s + 1) * size) - s * size for s in todo)
    results = _normalised(pool, split, todo, size)
    counts: Counter = Counter()
    with tqdm(total=todo_count, unit="img", desc=f"{split.name}", disable=not progress, smoothing=0.1) as bar:
        first_key = 0
        for s, stem in enumerate(stems):
            if records[s] is None:
                records[s] = _write_shard(split, s * size, min(n, (s + 1) * size), first_key, folder, stem,
                                          results, bar)
                state.save(f"{split.name}/{stem}", records[s])
                _compact(records[s])
            counts.update(records[s]["counts"])
            first_key += records[s]["num_samples"]
    for r, stem in zip(records, stems):
        r["tar"], r["index"] = folder / f"{stem}.tar", folder / f"{stem}.idx"
    return records, counts


def _compact(record: dict) -> dict:
    """A shard record as kept in memory until the split's sample table is written: its labels and sizes as
    arrays (12 bytes a sample) rather than lists of Python ints (about 110 at ImageNet's size)."""
    for key in ("labels", "sizes"):
        if key in record:
            record[key] = np.asarray(record[key], np.int32)
    return record


def _beton(split: str, out: Path, state: RunState, records: list[dict], table: np.ndarray, opts: dict,
           workers: int, progress: bool) -> dict:
    """Write (or keep, when resuming) OUT/<split>.beton from the split's non-empty shards (`records`) and their
    sample `table`; return its record.

    A `.beton` kept from an earlier run must hash as recorded and come from shards with the same sha256s.
    """
    path = out / f"{split}.beton"
    made_from = hashlib.sha256(" ".join(r["sha256"] for r in records).encode()).hexdigest()
    record = state.load(f"{split}.beton", path)
    if record is not None and record["made_from"] == made_from and sha256_file(path) == record["sha256"]:
        return record
    with atomic_path(path) as tmp:
        write_beton(tmp, [r["tar"] for r in records], table, write_mode=opts["ffcv_write_mode"],
                    max_side=opts["max_side"],
                    jpeg_quality=opts["jpeg_quality"], compress_probability=opts["ffcv_compress_probability"],
                    workers=workers, progress=progress, desc=path.name)
        record = {"num_samples": sum(r["num_samples"] for r in records), "sha256": sha256_file(tmp),
                  "bytes": tmp.stat().st_size, "made_from": made_from}
    state.save(f"{split}.beton", record)
    return record


def _strict_failure(split: str, skipped: list[dict]) -> FastcdError:
    shown = "; ".join(f"{s['path']} ({s['reason']})" for s in skipped[:STRICT_NAMES_SHOWN])
    more = f" and {len(skipped) - STRICT_NAMES_SHOWN} more" if len(skipped) > STRICT_NAMES_SHOWN else ""
    return FastcdError(f"--strict: {len(skipped)} unreadable file(s) in split {split}: {shown}{more}; "
                       f"fix or remove them, or run without --strict to skip them")


def _summary(name: str, entry: dict, seconds: float) -> str:
    stats = entry["stats"]
    parts = ", ".join(f"{v} {k}" for k, v in stats.items() if v)
    empty = f"; no usable image in {len(entry['empty_classes'])} class(es)" if entry["empty_classes"] else ""
    return (f"{name}: {entry['num_samples']} samples ({parts}) in {seconds:.1f} s, "
            f"{sum(stats.values()) / max(seconds, 1e-9):.0f} img/s{empty}")


def _no_samples(split: str, skipped: list[dict]) -> FastcdError:
    first = f"; the first skipped: {skipped[0]['path']} ({skipped[0]['reason']})" if skipped else ""
    return FastcdError(f"split {split} has no usable image ({len(skipped)} file(s) skipped{first}); "
                       f"check SRC, or leave the split out with --splits")


def _prepare_split(split: SplitSource, classes: list[str], out: Path, state: RunState, formats: list[str],
                   opts: dict, pool: WorkerPool, strict: bool, progress: bool, rehash: bool) -> dict:
    """Convert one split into the asked formats; return its manifest entry."""
    start = time.perf_counter()
    records, counts = _convert_split(split, out, state, "dali" in formats, opts, pool, progress, rehash)
    skipped = split.skipped + [s for r in records for s in r["skipped"]]
    if strict and skipped:
        raise _strict_failure(split.name, skipped)
    if not any(r["num_samples"] for r in records):
        raise _no_samples(split.name, skipped)
    present = {int(label) for r in records for label in r["classes"]}
    nonempty = [r for r in records if r["num_samples"]]
    # the split's sample table, which the .beton is written from too; records of an earlier fastcd lack labels
    # and sizes: read from the shard then
    rows = np.concatenate([shard_rows(s, r["tar"], r["index"], r.get("labels"), r.get("sizes"))
                           for s, r in enumerate(nonempty)])
    beton = {"beton": None, "beton_sha256": None, "beton_bytes": None}
    if "ffcv" in formats:
        record = _beton(split.name, out, state, nonempty, rows, opts, pool.workers, progress)
        beton = {"beton": f"{split.name}.beton", "beton_sha256": record["sha256"], "beton_bytes": record["bytes"]}
    written = nonempty if "dali" in formats else []
    shards = [{"tar": str(r["tar"].relative_to(out)), "index": str(r["index"].relative_to(out)),
               "num_samples": r["num_samples"], "first_key": r["first_key"], "sha256": r["sha256"],
               "bytes": r["bytes"]} for r in written]
    table = {"samples": write_table(out, split.name, rows)} if written else {}
    entry = {"num_samples": sum(r["num_samples"] for r in records), **beton, "shards": shards, **table,
             "skipped": skipped, "repaired": [x for r in records for x in r["repaired"]],
             "empty_classes": [c for i, c in enumerate(classes) if i not in present],
             "stats": {k: counts[k] for k in ("passed", "resized", "repaired", "encoded", "skipped")},
             "source_sha256": split_sources(records)}
    entry["stats"]["skipped"] = len(skipped)
    if progress:
        print(_summary(split.name, entry, time.perf_counter() - start), file=sys.stderr)
    return entry


def _existing(out: Path, digest: str, progress: bool) -> dict | None:
    """The manifest of a finished run into OUT with these arguments, when its outputs are all there;
    None when there is none (or it is to be rebuilt: damaged, or of an older format)."""
    if not manifest_path(out).is_file() or unfinished(out):
        return None
    try:
        manifest = json.loads(manifest_path(out).read_text())
    except (OSError, ValueError) as e:
        raise FastcdError(f"{manifest_path(out)} is unreadable ({e}); delete it, or choose another OUT") from e
    if not isinstance(manifest, dict) or manifest.get("digest") != digest:
        raise FastcdError(f"{out} already holds a dataset prepared from another source or with other options; "
                          f"choose another OUT, or delete {manifest_path(out)} first")
    try:
        load_manifest(out)
    except FastcdError as e:
        if progress:
            print(f"rebuilding {out}: {e}", file=sys.stderr)
        return None
    return manifest


def _changed_splits(source: Source, manifest: dict, shard_samples: int) -> list[str]:
    """The splits whose source files no longer hash as when `manifest` was written (read here: `--rehash`)."""
    changed = []
    for name, split in source.splits.items():
        n = len(split.names)
        now = [{"source_sha256": shard_sources(split, lo, min(n, lo + shard_samples))}
               for lo in range(0, n, shard_samples)]
        if manifest["splits"][name].get("source_sha256") != split_sources(now):
            changed.append(name)
    return changed


def _prepare_locked(out: Path, source: Source, opts: dict, digest: str, workers: int, strict: bool,
                    progress: bool, rehash: bool) -> dict:
    manifest = _existing(out, digest, progress)
    changed = _changed_splits(source, manifest, opts["shard_samples"]) if manifest is not None and rehash else []
    if manifest is not None and not changed:
        if missing_tables(manifest):
            return add_missing_tables(out, manifest, progress)
        if progress:
            checked = "their files re-hashed and unchanged" if rehash else (
                "file names, labels and options compared, not the files' contents: --rehash re-reads them")
            print(f"{out} is already prepared from this source with these arguments ({checked}); nothing to do")
        return manifest
    if changed and progress:
        print(f"{out}: source files of split(s) {', '.join(changed)} changed since they were prepared (or were not "
              "hashed then); rebuilding",
              file=sys.stderr)
    state = RunState(out, digest, list(source.splits))
    entries = {}
    with WorkerPool(partial(normalise_item, max_side=opts["max_side"], quality=opts["jpeg_quality"]), workers,
                    ITEM_SECONDS) as pool:
        for name, split in source.splits.items():
            entries[name] = _prepare_split(split, source.classes, out, state, opts["formats"], opts, pool, strict,
                                           progress, rehash)
    manifest = {"format_version": FORMAT_VERSION, "classes": source.classes,
                "options": {**opts, "workers": workers, "strict": strict}, "digest": digest, "splits": entries}
    write_manifest(out, manifest)
    state.finish()
    return manifest


def prepare(src: str | os.PathLike, out: str | os.PathLike, *, formats: Sequence[str] = FORMATS,
            splits: Sequence[str] | None = None, max_side: int = MAX_SIDE, jpeg_quality: int = JPEG_QUALITY,
            workers: int | None = None, shard_samples: int = SHARD_SAMPLES, labels: str | None = None,
            strict: bool = False, progress: bool = True, limit: int | None = None,
            ffcv_write_mode: str = "jpg", ffcv_compress_probability: float = 0.5, rehash: bool = False) -> dict:
    """Convert SRC (ImageNet-layout folder, flat folder + `labels`, or 'fashion-mnist') into OUT.

    `splits=None` takes every split SRC has; `limit` keeps the first N samples per split. A finished OUT (or
    the finished shards of an interrupted run) is kept when SRC lists the same files with the same labels and
    the options are the same; its files' contents are compared only with `rehash` (every source file is read
    and hashed again; a split, or an interrupted run's shard, whose sources changed is redone).
    Returns the manifest (also written to OUT/manifest.json, last).
    """
    formats, workers = list(formats), workers or os.cpu_count() or 1
    _check(formats, max_side, jpeg_quality, workers, shard_samples, limit, ffcv_write_mode,
           ffcv_compress_probability)
    out = Path(out)
    source = open_source(str(src), splits, str(labels) if labels else None, limit)
    opts = {"src": str(src) if str(src) == "fashion-mnist" else str(Path(src).resolve()),
            "formats": formats, "splits": list(source.splits), "max_side": max_side,
            "jpeg_quality": jpeg_quality, "shard_samples": shard_samples,
            "labels": str(Path(labels).resolve()) if labels else None, "limit": limit,
            "ffcv_write_mode": ffcv_write_mode, "ffcv_compress_probability": ffcv_compress_probability}
    digest = _digest(opts, source)
    with claimed(out, str(src), [*source.splits, WORK_DIR]):
        try:
            return _prepare_locked(out, source, opts, digest, workers, strict, progress, rehash)
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            raise FastcdError(f"prepare into {out} stopped: {e.strerror}{where}; fix that and run the same "
                              f"command again (finished shards are kept)") from e


def upgrade(out: str | Path, progress: bool = True) -> list[str]:
    """`fastcd prepare --upgrade OUT`: add the sample tables an earlier fastcd did not write, under OUT's
    lock. Returns the splits upgraded (none when OUT is current)."""
    out = Path(out)
    manifest = load_manifest(out)
    with claimed(out, manifest["options"]["src"], list(manifest["splits"])):
        manifest = load_manifest(out)  # as it is now that OUT is ours
        todo = missing_tables(manifest)
        if todo:
            try:
                add_missing_tables(out, manifest, progress)
            except OSError as e:  # a full disk, an unreadable shard: the manifest is untouched, rerun later
                where = f" ({e.filename})" if e.filename else ""
                raise FastcdError(f"upgrade of {out} stopped: {e.strerror or e}{where}; {out} is as it was: fix "
                                  "that and run `fastcd prepare --upgrade` again") from e
            except (ValueError, KeyError) as e:  # a shard whose index, label or JPEG header cannot be read
                raise FastcdError(f"upgrade of {out} stopped: a shard cannot be read ({e}); run `fastcd prepare "
                                  f"--verify {out}`") from e
    return todo
