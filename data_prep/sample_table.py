"""The per-split sample table: `OUT/<split>/samples.npy`, written by `fastcd prepare` beside the shards.

One int64 row per sample, in sample order, with the columns of `COLUMNS`: the shard the sample lies in,
its JPEG's byte offset and length in that tar, its label, and the JPEG's height and width. A loader
reads everything it needs per batch from this table by vectorised indexing (no tar index to parse, no
JPEG header or label to read per sample, in any process). The manifest records the table's sha256 and
size; `fastcd prepare --verify` checks its rows against the tars.

Folders prepared before the table existed get it from `fastcd prepare --upgrade OUT` (`prepare.upgrade`,
through `add_missing_tables`), which computes it once from the indexes, the labels and the JPEG headers of
shards whose sha256 it has checked against the manifest.
"""
from __future__ import annotations

import hashlib
import io
import mmap
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image
from tqdm import tqdm

from fastcd.data_prep.manifest import write_manifest
from fastcd.data_prep.shards import read_index, sha256_file
from fastcd.errors import FastcdError
from fastcd.utils.atomic import atomic_path

COLUMNS = ("shard", "offset", "length", "label", "height", "width")
SHARD, OFFSET, LENGTH, LABEL, HEIGHT, WIDTH = range(len(COLUMNS))
TABLE_NAME = "samples.npy"
MAX_HEADER = 65536  # bytes of a .npy file that hold its header (numpy's own limit for version 2)


def jpeg_size(data: bytes | memoryview) -> tuple[int, int]:
    """(height, width) of a JPEG, from its header (no decode); ValueError when there is no image header."""
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except (OSError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError; a bad header a SyntaxError
        raise ValueError(f"its JPEG header cannot be read ({type(e).__name__})") from None
    return height, width


def shard_rows(shard: int, tar: Path, index: Path, labels: Sequence[int] | None = None,
               sizes: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """The table rows of one shard from its DALI index; labels and (height, width) sizes when the writer
    knows them, else read from the tar's `.cls` members and JPEG headers."""
    entries = read_index(index)
    rows = np.empty((len(entries), len(COLUMNS)), dtype=np.int64)
    rows[:, SHARD] = shard
    rows[:, OFFSET] = [e["jpg"].offset for e in entries]
    rows[:, LENGTH] = [e["jpg"].size for e in entries]
    if labels is not None and sizes is not None:
        rows[:, LABEL] = labels
        rows[:, HEIGHT:] = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        return rows
    with open(tar, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for r, e in enumerate(entries):
            cls, jpg = e["cls"], e["jpg"]
            try:
                label = data[cls.offset:cls.offset + cls.size]
                if not label.strip().isdigit():
                    raise ValueError(f"its label {label[:20]!r} is not a class number")
                rows[r, LABEL] = int(label)
                rows[r, HEIGHT:] = jpeg_size(data[jpg.offset:jpg.offset + jpg.size])
            except ValueError as why:
                raise FastcdError(f"shard {tar}: sample {jpg.name}: {why}; the shard is damaged (`fastcd prepare "
                                  "--verify` names every damaged file)") from None
    return rows


def table_file(split: str) -> str:
    """The table's path relative to OUT."""
    return f"{split}/{TABLE_NAME}"


def write_table(out: Path, split: str, table: np.ndarray) -> dict:
    """Write the table atomically; return its manifest entry (file, sha256, bytes)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(table, dtype=np.int64), allow_pickle=False)
    data = buffer.getvalue()
    with atomic_path(out / table_file(split)) as tmp:
        tmp.write_bytes(data)
    return {"file": table_file(split), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def read_table(path: Path | BinaryIO) -> np.ndarray:
    """The (N, len(COLUMNS)) int64 table at `path` (or in a file object); ValueError when it is not one."""
    return _checked(np.load(path, allow_pickle=False))


def table_view(data: bytes | memoryview | mmap.mmap) -> np.ndarray:
    """The table in `data` (a `.npy` file's bytes) as a read-only view of them, not a copy; ValueError when it
    is not one."""
    header = io.BytesIO(data[:MAX_HEADER])
    try:
        version = np.lib.format.read_magic(header)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(header) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(header))
    except ValueError as e:
        raise ValueError(f"not a .npy array ({e})") from None
    count = int(np.prod(shape))
    if fortran or len(data) < header.tell() + count * dtype.itemsize:
        raise ValueError("a .npy array shorter than its header says, or in Fortran order")
    return _checked(np.frombuffer(data, dtype=dtype, count=count, offset=header.tell()).reshape(shape))


def _checked(table: np.ndarray) -> np.ndarray:
    if table.dtype != np.int64 or table.ndim != 2 or table.shape[1] != len(COLUMNS):
        raise ValueError(f"a {table.dtype} array of shape {table.shape}, not (N, {len(COLUMNS)}) int64")
    return table




def missing_tables(manifest: dict) -> list[str]:
    """The splits of a manifest that have shards but no sample table (prepared by an earlier fastcd)."""
    return [name for name, entry in manifest["splits"].items() if entry.get("shards") and "samples" not in entry]


def add_missing_tables(out: Path, manifest: dict, progress: bool) -> dict:
    """Compute, write and record the tables `manifest` lacks, each from shards whose sha256 is the manifest's
    (a damaged shard is refused before its split's table is written); rewrite the manifest (atomically, last)."""
    for name in missing_tables(manifest):
        entry = manifest["splits"][name]
        shards = tqdm(entry["shards"], desc=f"{name} sample table", unit="shard", disable=not progress)
        parts = []
        for s, shard in enumerate(shards):
            tar = out / shard["tar"]
            if sha256_file(tar) != shard["sha256"]:
                raise FastcdError(f"shard {tar}: its sha256 differs from the manifest's, so no sample table is built "
                                  f"from it ({out} is as it was); the dataset is damaged: `fastcd prepare --verify "
                                  f"{out}` names every damaged file, re-run `fastcd prepare` into a new OUT")
            parts.append(shard_rows(s, tar, out / shard["index"]))
        entry["samples"] = write_table(out, name, np.concatenate(parts))
    write_manifest(out, manifest)
    return manifest

