"""`fastcd prepare --verify OUT`: reopen every output and check it against the manifest.

Checks per split: each file's size (when the manifest is opened), each shard's sha256, its DALI
index against the tar's own headers (names, data offsets, sizes), keys consecutive from
`first_key`, labels in range and the counts; the sample table's sha256 and its rows against the
shards (offsets, labels, JPEG header sizes); the `.beton`'s sha256, then its sample count and
labels equal the shards'. Then a few samples are decoded in both formats: ffcv's `Loader` and
DALI's `fn.readers.webdataset` in a CPU pipeline. Any mismatch, and any error a reader raises on a
damaged file, raises FastcdError naming the file.
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fastcd.data_prep.manifest import load_manifest
from fastcd.data_prep.sample_table import read_table, shard_rows
from fastcd.data_prep.shards import read_index, sample_key, sha256_file
from fastcd.errors import FastcdError

DECODE_SAMPLES = 8
DALI_SHARDS = 128  # shards one DALI reader opens at a time in `_check_dali`


def _fail(out: Path, where: str, problem: str) -> FastcdError:
    return FastcdError(f"{out}: {where}: {problem}; the dataset is damaged, re-run `fastcd prepare` into a new OUT")


@contextlib.contextmanager
def _reading(out: Path, where: str) -> Iterator[None]:
    """Turn any error a reader (tarfile, ffcv, DALI) raises on a damaged file into FastcdError."""
    try:
        yield
    except FastcdError:
        raise
    except Exception as e:
        raise _fail(out, where, f"cannot be read ({type(e).__name__}: {e})") from e


def _check_shard(out: Path, shard: dict, num_classes: int) -> np.ndarray:
    """Check one shard; return its labels in sample order."""
    tar_path, name = out / shard["tar"], shard["tar"]
    if sha256_file(tar_path) != shard["sha256"]:
        raise _fail(out, name, "sha256 differs from the manifest")
    try:
        index = read_index(out / shard["index"])
    except (ValueError, IndexError) as e:
        raise _fail(out, shard["index"], f"not a DALI index ({e})") from e
    if len(index) != shard["num_samples"]:
        raise _fail(out, shard["index"], f"{len(index)} samples, manifest says {shard['num_samples']}")
    with tarfile.open(tar_path) as tar:
        members = {m.name: (m.offset_data, m.size) for m in tar}
    labels = []
    with open(tar_path, "rb") as f:
        for i, sample in enumerate(index):
            key = sample_key(shard["first_key"] + i)
            for ext in ("jpg", "cls"):
                entry = sample.get(ext)
                if entry is None or entry.name != f"{key}.{ext}" or \
                        members.get(entry.name) != (entry.offset, entry.size):
                    raise _fail(out, shard["index"], f"entry for {key}.{ext} does not match the tar")
            f.seek(sample["cls"].offset)
            label = int(f.read(sample["cls"].size))
            if not 0 <= label < num_classes:
                raise _fail(out, name, f"label {label} of {key} is outside 0..{num_classes - 1}")
            labels.append(label)
    if len(members) != 2 * len(index):
        raise _fail(out, name, f"{len(members)} members, expected {2 * len(index)}")
    return np.array(labels, dtype=np.int64)


@contextlib.contextmanager
def _numba_finalizer_noise_hidden() -> Iterator[None]:
    """Freeing ffcv's compiled pipeline makes numba's dispatcher finalizer print a harmless KeyError;
    drop exactly that report (raised in numba/core/dispatcher.py) and pass any other one on."""
    previous = sys.unraisablehook

    def hook(report) -> None:
        tb = report.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if not (isinstance(report.exc_value, KeyError) and tb is not None
                and tb.tb_frame.f_code.co_filename.endswith(os.path.join("numba", "core", "dispatcher.py"))):
            previous(report)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous


def _check_beton(out: Path, beton: str, sha256: str, labels: np.ndarray | None, count: int) -> None:
    if sha256_file(out / beton) != sha256:
        raise _fail(out, beton, "sha256 differs from the manifest")
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader

    reader = Reader(str(out / beton))
    if reader.num_samples != count:
        raise _fail(out, beton, f"{reader.num_samples} samples, manifest says {count}")
    beton_labels = reader.metadata["f1"].astype(np.int64)
    if labels is not None and not np.array_equal(beton_labels, labels):
        first = int(np.flatnonzero(beton_labels != labels)[0])
        raise _fail(out, beton, f"label of sample {first} is {beton_labels[first]}, the shards say {labels[first]}")
    picks = np.linspace(0, count - 1, min(DECODE_SAMPLES, count)).astype(int).tolist()
    with _numba_finalizer_noise_hidden():
        loader = Loader(str(out / beton), batch_size=len(picks), num_workers=1, order=OrderOption.SEQUENTIAL,
                        indices=picks, pipelines={"image": [CenterCropRGBImageDecoder((32, 32), 1.0)],
                                                  "label": [IntDecoder()]})
        images, got = next(iter(loader))
        del loader
    if images.shape != (len(picks), 32, 32, 3) or got.reshape(-1).tolist() != beton_labels[picks].tolist():
        raise _fail(out, beton, "ffcv's Loader did not return the expected images and labels")


def _check_dali(out: Path, split: str, shards: list[dict], labels: np.ndarray) -> None:
    """DALI's webdataset reader reads the shards, `DALI_SHARDS` at a time (it holds an index entry, about 340
    bytes, per sample it opens): the sample counts and each chunk's first batch of images and labels."""
    first = 0
    for lo in range(0, len(shards), DALI_SHARDS):
        chunk = shards[lo:lo + DALI_SHARDS]
        count = sum(s["num_samples"] for s in chunk)
        _check_dali_chunk(out, split, chunk, labels[first:first + count])
        first += count
    if first != len(labels):
        raise _fail(out, f"{split} shards", f"the shards hold {first} samples, manifest says {len(labels)}")


def _check_dali_chunk(out: Path, split: str, shards: list[dict], labels: np.ndarray) -> None:
    from nvidia.dali import fn, pipeline_def

    batch = min(DECODE_SAMPLES, len(labels))

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=[str(out / s["tar"]) for s in shards], ext=["jpg", "cls"],
                                         index_paths=[str(out / s["index"]) for s in shards],
                                         missing_component_behavior="error", name="reader")
        return fn.decoders.image(jpg, device="cpu"), cls

    p = pipe()
    p.build()
    size = p.epoch_size("reader")
    if size != len(labels):
        raise _fail(out, f"{split} shards", f"DALI's reader sees {size} samples in {shards[0]['tar']} to "
                    f"{shards[-1]['tar']}, the manifest says {len(labels)}")
    images, cls = p.run()
    got = [int(bytes(np.array(cls.at(i)))) for i in range(batch)]
    if got != labels[:batch].tolist() or any(np.array(images.at(i)).shape[2] != 3 for i in range(batch)):
        raise _fail(out, f"{split} shards", "DALI's webdataset reader did not return the expected images and labels")


def _check_table(out: Path, table: dict, shards: list[dict]) -> None:
    """The sample table hashes as recorded and its rows are what the shards hold (offsets, labels, sizes)."""
    if sha256_file(out / table["file"]) != table["sha256"]:
        raise _fail(out, table["file"], "sha256 differs from the manifest")
    rows = read_table(out / table["file"])
    first = 0
    for s, shard in enumerate(shards):  # a shard at a time: the table's own copy is the only one held whole
        expected = shard_rows(s, out / shard["tar"], out / shard["index"])
        got = rows[first:first + len(expected)]
        if got.shape != expected.shape or not np.array_equal(got, expected):
            bad = next((i for i in range(min(len(got), len(expected))) if not np.array_equal(got[i], expected[i])),
                       min(len(got), len(expected)))
            raise _fail(out, table["file"], f"row {first + bad} does not match the shards")
        first += len(expected)
    if first != len(rows):
        raise _fail(out, table["file"], f"row {first} does not match the shards (the table has {len(rows)} rows, "
                    f"the shards {first})")


def verify(out: str | Path) -> dict:
    """Check every output of a prepared dataset; return per-split sample counts. Raises on mismatch."""
    out = Path(out)
    manifest = load_manifest(out)
    num_classes = len(manifest["classes"])
    counts = {}
    for split, entry in manifest["splits"].items():
        labels = None
        if entry["shards"]:
            parts = []
            for shard in entry["shards"]:
                with _reading(out, shard["tar"]):
                    parts.append(_check_shard(out, shard, num_classes))
            labels = np.concatenate(parts)
            if len(labels) != entry["num_samples"]:
                raise _fail(out, split, f"shards hold {len(labels)} samples, manifest says {entry['num_samples']}")
            with _reading(out, f"{split} shards"):
                _check_dali(out, split, entry["shards"], labels)
            if "samples" in entry:
                with _reading(out, entry["samples"]["file"]):
                    _check_table(out, entry["samples"], entry["shards"])
        if entry["beton"]:
            with _reading(out, entry["beton"]):
                _check_beton(out, entry["beton"], entry["beton_sha256"], labels, entry["num_samples"])
        counts[split] = entry["num_samples"]
    return counts
