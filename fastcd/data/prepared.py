"""Open a prepared dataset (`fastcd prepare` OUT) for a loader: manifest, split, class count, files.

Checks run when a loader is built, so bad input fails before training: the manifest's format
version and referenced files (`load_manifest`), the split and the format the backend needs, the
class count against the model, and — cheaply, without hashing — each shard's index against its
tar (sample count, tar long enough, first sample a JPEG with a numeric label).
"""
from __future__ import annotations

import hashlib
import io
import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fastcd.data.base import LoaderContext, Split
from fastcd.data_prep.manifest import load_manifest
from fastcd.data_prep.shards import read_index
from fastcd.errors import FastcdError

JPEG_MAGIC = b"\xff\xd8"


@dataclass(frozen=True)
class PreparedSplit:
    """One split of a prepared dataset: its root, manifest entry and class names."""

    root: Path
    split: Split
    entry: dict
    classes: list[str]

    @property
    def num_samples(self) -> int:
        return self.entry["num_samples"]

    @property
    def beton(self) -> Path:
        """The split's `.beton` (FFCV)."""
        return self.root / self.entry["beton"]

    @property
    def shards(self) -> list[tuple[Path, Path]]:
        """(tar, index) paths of the split's webdataset shards, in sample order."""
        return [(self.root / s["tar"], self.root / s["index"]) for s in self.entry["shards"]]

    def fingerprint(self) -> str:
        """sha256 of the prepared folder's manifest, which holds every shard's and the .beton's sha256."""
        return hashlib.sha256((self.root / "manifest.json").read_bytes()).hexdigest()


def open_prepared(path: str, split: Split, ctx: LoaderContext, need: str) -> PreparedSplit:
    """The prepared `split` under `path`, which must hold format `need` ('ffcv' or 'dali')."""
    if not path:
        raise FastcdError("data.path is empty; set it to the OUT folder written by `fastcd prepare`")
    manifest = load_manifest(path)
    if split not in manifest["splits"]:
        raise FastcdError(f"{path} has no {split!r} split (it has {', '.join(manifest['splits'])}); "
                          f"prepare it with `fastcd prepare --splits train,val`")
    entry = manifest["splits"][split]
    has = {"ffcv": bool(entry.get("beton")), "dali": bool(entry.get("shards"))}[need]
    if not has:
        raise FastcdError(f"{path} was prepared without the {need} format for split {split!r}; "
                          f"re-run `fastcd prepare` with `--formats ffcv,dali`")
    classes = manifest["classes"]
    if len(classes) != ctx.num_classes:
        raise FastcdError(f"{path} has {len(classes)} classes but the model has num_classes={ctx.num_classes}")
    return PreparedSplit(Path(path), split, entry, classes)


class ShardSamples:
    """Random access to the samples of a split's shards: JPEG bytes and label of global index i.

    Tars are memory-mapped lazily (so the object pickles cheaply into DataLoader workers).
    """

    def __init__(self, prepared: PreparedSplit) -> None:
        self.tars = [tar for tar, _ in prepared.shards]
        shard_of, jpg, cls = [], [], []
        for s, ((_, index), record) in enumerate(zip(prepared.shards, prepared.entry["shards"])):
            try:
                samples = read_index(index)
                jpg.extend((e["jpg"].offset, e["jpg"].size) for e in samples)
                cls.extend((e["cls"].offset, e["cls"].size) for e in samples)
            except (ValueError, KeyError, IndexError) as e:
                raise FastcdError(f"shard index {index} is corrupt ({e}); re-run `fastcd prepare`") from e
            if len(samples) != record["num_samples"]:
                raise FastcdError(f"shard index {index} lists {len(samples)} samples, the manifest "
                                  f"{record['num_samples']}; re-run `fastcd prepare`")
            shard_of += [s] * len(samples)
        self.shard_of = np.asarray(shard_of, dtype=np.int32)
        self.jpg = np.asarray(jpg, dtype=np.int64).reshape(-1, 2)
        self.cls = np.asarray(cls, dtype=np.int64).reshape(-1, 2)
        self._maps: dict[int, mmap.mmap] = {}
        self._sizes = np.full((len(self.shard_of), 2), -1, dtype=np.int64)  # (H, W), read when first asked
        self._check(prepared)

    def __len__(self) -> int:
        return len(self.shard_of)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}

    def _map(self, shard: int) -> mmap.mmap:
        if shard not in self._maps:
            with open(self.tars[shard], "rb") as f:
                self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[shard]

    def jpeg(self, i: int) -> np.ndarray:
        """The JPEG bytes of sample i (a read-only view of the mapped tar)."""
        offset, size = self.jpg[i]
        return np.frombuffer(self._map(int(self.shard_of[i])), dtype=np.uint8, count=size, offset=offset)

    def sizes(self, indices: Sequence[int]) -> np.ndarray:
        """(len(indices), 2) image (height, width) of the samples, from their JPEG headers (no decode; each
        read once per process)."""
        for i in indices:
            if self._sizes[i, 0] < 0:
                width, height = Image.open(io.BytesIO(self.jpeg(i))).size
                self._sizes[i] = (height, width)
        return self._sizes[list(indices)]

    def label(self, i: int) -> int:
        """The label of sample i."""
        offset, size = self.cls[i]
        return int(self._map(int(self.shard_of[i]))[offset:offset + size])

    def _check(self, prepared: PreparedSplit) -> None:
        """Each shard's tar is as long as its index says and starts with a JPEG and a numeric label."""
        if len(self) != prepared.num_samples:
            raise FastcdError(f"{prepared.root}: the {prepared.split} shards hold {len(self)} samples, the "
                              f"manifest {prepared.num_samples}; re-run `fastcd prepare`")
        ends = np.maximum(self.jpg.sum(1), self.cls.sum(1))
        starts = np.searchsorted(self.shard_of, np.arange(len(self.tars) + 1))
        for s, tar in enumerate(self.tars):
            first = int(starts[s])
            needed = int(ends[first:starts[s + 1]].max())
            if tar.stat().st_size < needed:
                raise FastcdError(f"shard {tar} is truncated ({tar.stat().st_size} bytes, its index needs "
                                  f"{needed}); re-run `fastcd prepare`")
            try:
                ok = bytes(self.jpeg(first)[:2]) == JPEG_MAGIC and 0 <= self.label(first) < len(prepared.classes)
            except ValueError:
                ok = False
            if not ok:
                raise FastcdError(f"shard {tar} is corrupt: its first sample is not a JPEG with a label in "
                                  f"0..{len(prepared.classes) - 1}; re-run `fastcd prepare`")
