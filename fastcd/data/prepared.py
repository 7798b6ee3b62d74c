"""Open a prepared dataset (`fastcd prepare` OUT) for a loader: manifest, split, class count, files; and
`ShardLoader`, the base of the backends that read its shards by sample (torch, dali).

Checks run when a loader is built, so bad input fails before training: the manifest's format
version and referenced files (`load_manifest`), the split and the format the backend needs, the
class count against the model, and the split's sample table: its sha256 against the manifest's (about
0.1 s for ImageNet's 61 MB table; the tars are not hashed), then its rows against the manifest and the
tars (sample count, shards and labels in range, each tar long enough, its first sample a JPEG).
"""
from __future__ import annotations

import hashlib
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastcd.config import DataConfig
from fastcd.data.base import IndexedLoader, LoaderContext, Split
from fastcd.data_prep.manifest import load_manifest
from fastcd.data_prep.sample_table import HEIGHT, LABEL, LENGTH, OFFSET, SHARD, WIDTH, table_view
from fastcd.data_prep.shards import sample_key
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
        """sha256 of the prepared folder's manifest, which holds every shard's, sample table's and .beton's
        sha256 (a loader that reads a sample table first checks the file against it: `ShardSamples`)."""
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
    """The samples of a split's shards, read by batch: the columns of the split's sample table (label,
    image size, where each JPEG lies) as arrays, and `gather` to copy a batch's JPEG bytes out of the
    memory-mapped tars. Nothing is parsed per sample: no tar index, JPEG header or label.

    Tars are memory-mapped lazily (so the object pickles cheaply into DataLoader workers).
    """

    def __init__(self, prepared: PreparedSplit) -> None:
        entry, root = prepared.entry, prepared.root
        if "samples" not in entry:
            raise FastcdError(f"{root} was prepared by an earlier fastcd: its {prepared.split} split has no sample "
                              f"table (image sizes and labels); run `fastcd prepare --upgrade {root}` once")
        path = root / entry["samples"]["file"]
        try:  # hashed and read from one mapping of the file: the columns are the only copy made (48 B a sample)
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                if hashlib.sha256(data).hexdigest() != entry["samples"]["sha256"]:
                    raise ValueError("its sha256 differs from the manifest's: it changed since `fastcd prepare` "
                                     "wrote it")
                table = table_view(data)
                (self.shard, self.offset, self.length, self.labels, self.heights, self.widths) = (
                    np.ascontiguousarray(table[:, c]) for c in (SHARD, OFFSET, LENGTH, LABEL, HEIGHT, WIDTH))
                del table  # the view must go before the mapping closes
        except (OSError, ValueError) as e:
            raise FastcdError(f"sample table {path} is damaged ({e}); run `fastcd prepare --verify {root}`") from e
        self.root = root
        self.tars = [tar for tar, _ in prepared.shards]
        self._maps: list[np.ndarray | None] = [None] * len(self.tars)
        self._check(prepared, path)

    def __len__(self) -> int:
        return len(self.shard)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": [None] * len(self.tars)}

    def _map(self, shard: int) -> np.ndarray:
        if self._maps[shard] is None:
            with open(self.tars[shard], "rb") as f:
                self._maps[shard] = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
        return self._maps[shard]

    def jpeg(self, i: int) -> np.ndarray:
        """The JPEG bytes of sample i (a read-only view of the mapped tar)."""
        offset = int(self.offset[i])
        return self._map(int(self.shard[i]))[offset:offset + int(self.length[i])]

    def undecodable(self, i: int, error: Exception) -> FastcdError:
        """The one-line error for sample i, whose JPEG the decoder refused with `error`."""
        why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return FastcdError(f"sample {sample_key(i)} in shard {self.tars[int(self.shard[i])]} cannot be decoded "
                           f"({why}): the prepared data is damaged; run `fastcd prepare --verify {self.root}`")

    def gather(self, indices: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy the JPEGs of samples `indices` one after another into `out` (uint8, at least their total
        length); return their lengths."""
        lengths = self.length[indices]
        starts = np.cumsum(lengths) - lengths
        maps = self._maps
        for s, o, n, p in zip(self.shard[indices].tolist(), self.offset[indices].tolist(), lengths.tolist(),
                              starts.tolist()):
            m = maps[s]
            if m is None:
                m = self._map(s)
            out[p:p + n] = m[o:o + n]
        return lengths

    def _check(self, prepared: PreparedSplit, path: Path) -> None:
        """The table has the manifest's sample count, valid shards and labels, and stays inside each tar, and
        each shard's first sample is a JPEG."""
        problem = None
        if len(self) != prepared.num_samples:
            problem = f"holds {len(self)} samples, the manifest {prepared.num_samples}"
        elif len(self) and not (0 <= self.shard.min() and self.shard.max() < len(self.tars)
                                and (np.diff(self.shard) >= 0).all()):
            problem = f"does not list shards 0..{len(self.tars) - 1} in order"
        elif len(self) and not (0 <= self.labels.min() and self.labels.max() < len(prepared.classes)):
            problem = f"has labels outside 0..{len(prepared.classes) - 1}"
        elif len(self) and (self.heights.min() < 1 or self.widths.min() < 1 or self.length.min() < 1):
            problem = "has empty images"
        if problem:
            raise FastcdError(f"sample table {path} {problem}; run `fastcd prepare --verify {prepared.root}`")
        ends = self.offset + self.length
        starts = np.searchsorted(self.shard, np.arange(len(self.tars) + 1))
        for s, tar in enumerate(self.tars):
            if starts[s] == starts[s + 1]:
                continue
            needed = int(ends[starts[s]:starts[s + 1]].max())
            if tar.stat().st_size < needed:
                raise FastcdError(f"shard {tar} is truncated ({tar.stat().st_size} bytes, its samples need "
                                  f"{needed}); re-run `fastcd prepare`")
            if bytes(self.jpeg(int(starts[s]))[:2]) != JPEG_MAGIC:
                raise FastcdError(f"shard {tar} is corrupt: its first sample is not a JPEG; re-run `fastcd prepare`")


class ShardLoader(IndexedLoader):
    """A backend over the prepared shards of `cfg.path`, read by sample (`ShardSamples`) in the order of
    `batch_indices()`, with the crops of `crops.CropPlan`: what the torch and DALI loaders share."""

    replays_crops = True

    def __init__(self, cfg: DataConfig, split: Split, ctx: LoaderContext) -> None:
        self.prepared = open_prepared(cfg.path, split, ctx, "dali")
        self.samples = ShardSamples(self.prepared)
        super().__init__(cfg, split, ctx, len(self.samples))
        self.num_classes = len(self.prepared.classes)

    def fingerprint(self) -> str:
        """The prepared split's digest (`PreparedSplit.fingerprint`)."""
        return self.prepared.fingerprint()
