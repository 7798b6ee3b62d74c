"""The cache's files: writing an epoch of targets by sample index (resumable), and reading a batch's back."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastcd.errors import FastcdError
from fastcd.models import TeacherTargets
from fastcd.utils.atomic import atomic_write_json

FORMAT = "fastcd-teacher-cache-v3"  # v3: the identity names the resampling, not the decoder
DTYPES = {"fp16": np.float16, "fp32": np.float32}


def valid_logits(logits: str, num_classes: int) -> bool:
    """`logits` is full, none or topk=K with 1 <= K <= `num_classes`."""
    return logits in ("full", "none") or (logits.startswith("topk=") and logits[5:].isdigit()
                                           and 0 < int(logits[5:]) <= num_classes)


@dataclass(frozen=True)
class Contents:
    """What a cache stores per crop: the stage means (always), logits (`full`, `topk=K` or `none`), the
    pooled embedding or not; in fp16 or fp32. A top-k cache also stores the log-sum-exp of the logits it
    leaves out (fp32): their total probability at T=1."""

    channels: tuple[int, ...]  # the teacher's stage channels (the means' widths)
    num_classes: int
    logits: str = "full"
    embed_dim: int = 0  # 0: no embedding stored
    dtype: str = "fp16"

    @property
    def topk(self) -> int:
        return int(self.logits.split("=", 1)[1]) if self.logits.startswith("topk=") else 0

    def arrays(self) -> dict[str, tuple[int, np.dtype]]:
        """Each stored array's columns and dtype."""
        value = np.dtype(DTYPES[self.dtype])
        out = {"means": (sum(self.channels), value)}
        if self.logits == "full":
            out["logits"] = (self.num_classes, value)
        elif self.topk:
            out["topk_values"] = (self.topk, value)
            out["topk_indices"] = (self.topk, np.dtype(np.int16 if self.num_classes < 2**15 else np.int32))
            out["tail_lse"] = (1, np.dtype(np.float32))
        if self.embed_dim:
            out["embed"] = (self.embed_dim, value)
        return out

    def bytes_per_crop(self) -> int:
        return sum(cols * dtype.itemsize for cols, dtype in self.arrays().values())

    def rows(self, targets: TeacherTargets) -> dict[str, np.ndarray]:
        """`targets` of a batch as the stored arrays' rows."""
        value = DTYPES[self.dtype]
        out = {"means": torch.cat([m.float() for m in targets.means], dim=1).cpu().numpy().astype(value)}
        if self.logits == "full":
            out["logits"] = targets.logits.float().cpu().numpy().astype(value)
        elif self.topk:
            top = targets.logits.float().topk(self.topk, dim=1)
            out["topk_values"] = top.values.cpu().numpy().astype(value)
            out["topk_indices"] = top.indices.cpu().numpy().astype(self.arrays()["topk_indices"][1])
            tail = targets.logits.float().scatter(1, top.indices, -math.inf)
            out["tail_lse"] = tail.logsumexp(dim=1, keepdim=True).cpu().numpy()
        if self.embed_dim:
            out["embed"] = targets.embed.float().cpu().numpy().astype(value)
        return out

    def targets(self, rows: dict[str, np.ndarray], device: torch.device) -> TeacherTargets:
        """Stored rows of a batch back as fp32 `TeacherTargets` on `device`. Top-k logits are made dense again
        as FKD does: each missing class gets an equal share of the missing classes' total exp(logit), so the
        softmax at T=1 is exact for the stored classes and for the missing ones' total (not at another T, see
        `cache.use.check_topk`)."""
        def dev(a: np.ndarray) -> Tensor:
            t = torch.from_numpy(a)
            return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)

        means = dev(rows["means"]).float().split(list(self.channels), dim=1)
        logits = None
        if self.logits == "full":
            logits = dev(rows["logits"]).float()
        elif self.topk:
            values = dev(rows["topk_values"]).float()
            fill = dev(rows["tail_lse"]).float() - math.log(max(self.num_classes - self.topk, 1))
            logits = fill.expand(-1, self.num_classes).clone()
            logits.scatter_(1, dev(rows["topk_indices"]).long(), values)
        embed = dev(rows["embed"]).float() if self.embed_dim else None
        return TeacherTargets(means=list(means), logits=logits, embed=embed)


def epoch_dir(root: Path, epoch: int, partial: bool = False) -> Path:
    return root / f"epoch-{epoch:04d}{'.partial' if partial else ''}"


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """An OSError writing the cache at `path` (a full disk, a read-only folder) as a one-line error."""
    try:
        yield
    except OSError as e:
        raise FastcdError(f"cannot write the teacher cache at {str(path)!r} ({e.strerror or e}); free space "
                          "there or choose another --out, then run `fastcd cache-teacher` again (it resumes)") from None


class RowFile:
    """A (rows, cols) `.npy` array written row by row with `pwrite`: its space is reserved when it is created
    (`posix_fallocate`), so a full disk is an error there, never a signal from a write through a memory map."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, int], fresh: bool) -> None:
        self.path, self.dtype, self.shape = path, dtype, shape
        self.row_bytes = shape[1] * dtype.itemsize
        if not fresh:
            fresh = not self._resumable()
        if fresh:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                          "fortran_order": False, "shape": shape})
            self.offset = len(header.getvalue())
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                self._pwrite(header.getvalue(), 0)
                os.posix_fallocate(self.fd, 0, self.offset + shape[0] * self.row_bytes)
            except OSError:
                os.close(self.fd)
                raise
        else:
            self.fd = os.open(path, os.O_RDWR)
        self.fresh = fresh

    def _resumable(self) -> bool:
        """The file is there with this shape and dtype, at its full size (then `offset` is where rows start)."""
        try:
            array = np.load(self.path, mmap_mode="r")
        except (OSError, ValueError):
            return False
        self.offset = array.offset
        return array.shape == self.shape and array.dtype == self.dtype and array.flags.c_contiguous

    def _pwrite(self, data: bytes | memoryview, at: int) -> None:
        if os.pwrite(self.fd, data, at) != len(data):
            raise OSError(f"short write to {self.path}")

    def write(self, indices: np.ndarray, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        for i, row in zip(indices.tolist(), rows, strict=True):
            self._pwrite(memoryview(row).cast("B"), self.offset + i * self.row_bytes)

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class EpochWriter:
    """Targets of one epoch written by sample index into `.npy` files under `epoch-NNNN.partial/`, with
    `progress.json` naming the batches done (written after the arrays are on disk, so a killed write resumes
    there); `finish` renames the folder into place. Every OSError is a one-line FastcdError."""

    def __init__(self, root: Path, epoch: int, contents: Contents, samples: int) -> None:
        self.root, self.epoch = root, epoch
        self.folder = epoch_dir(root, epoch, partial=True)
        progress = self.folder / "progress.json"
        fresh = not progress.is_file()
        with writing(self.folder):
            if fresh:
                shutil.rmtree(self.folder, ignore_errors=True)
                self.folder.mkdir(parents=True)
            self.files: dict[str, RowFile] = {}
            try:
                for name, (cols, dtype) in contents.arrays().items():
                    self.files[name] = RowFile(self.folder / f"{name}.npy", dtype, (samples, cols), fresh)
            except OSError:
                self.close()
                raise
        resumed = not fresh and not any(f.fresh for f in self.files.values())
        self.batches_done = json.loads(progress.read_text())["batches_done"] if resumed else 0

    def write(self, indices: Tensor, rows: dict[str, np.ndarray]) -> None:
        idx = indices.cpu().numpy()
        with writing(self.folder):
            for name, file in self.files.items():
                file.write(idx, rows[name])

    def checkpoint(self, batches_done: int) -> None:
        """Everything written so far is on disk, then `progress.json` says so."""
        with writing(self.folder):
            for file in self.files.values():
                file.flush()
            self.batches_done = batches_done
            atomic_write_json(self.folder / "progress.json", {"batches_done": batches_done})

    def close(self) -> None:
        """Close the files (also after an error: the next run resumes from `progress.json`)."""
        for file in self.files.values():
            file.close()
        self.files.clear()

    def finish(self) -> None:
        self.checkpoint(self.batches_done)
        self.close()
        with writing(self.folder):
            (self.folder / "progress.json").unlink()
            final = epoch_dir(self.root, self.epoch)
            shutil.rmtree(final, ignore_errors=True)
            self.folder.rename(final)


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    with writing(root):
        atomic_write_json(root / "manifest.json", manifest)


def new_manifest(identity: dict[str, Any], contents: Contents, epochs: int, samples: int) -> dict[str, Any]:
    stored = {**asdict(contents), "channels": list(contents.channels)}  # as JSON gives it back
    return {"format": FORMAT, "identity": identity, "contents": stored, "epochs": epochs, "samples": samples,
            "epochs_done": []}


MANIFEST_KEYS = {"identity": dict, "contents": dict, "epochs": int, "samples": int, "epochs_done": list}
CONTENTS_KEYS = {"channels": list, "num_classes": int, "logits": str, "embed_dim": int, "dtype": str}


def read_manifest(root: str | Path) -> dict[str, Any]:
    """A cache folder's manifest, or a one-line error naming what is wrong with the folder."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise FastcdError(f"teacher cache {str(root)!r} has no manifest.json; write it with "
                          "`fastcd cache-teacher CONFIG`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FastcdError(f"teacher cache manifest {str(path)!r} cannot be read ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise FastcdError(f"{str(path)!r} is not a {FORMAT} manifest (format {found!r}); write the cache again "
                          "with `fastcd cache-teacher --force`")
    for where, keys in (("", MANIFEST_KEYS), ("contents.", CONTENTS_KEYS)):
        part = manifest if not where else manifest["contents"]
        for key, kind in keys.items():
            if not isinstance(part.get(key), kind):
                raise FastcdError(f"teacher cache manifest {str(path)!r} has no valid {where}{key!r} (a "
                                  f"{kind.__name__}): the cache is damaged; write it again with "
                                  "`fastcd cache-teacher --force`")
    return manifest


def manifest_contents(manifest: dict[str, Any]) -> Contents:
    """The `Contents` a manifest records."""
    c = manifest["contents"]
    if c["dtype"] not in DTYPES or not valid_logits(c["logits"], c["num_classes"]):
        raise FastcdError(f"teacher cache manifest records contents {c} (dtype fp16|fp32, logits full|topk=K|none): "
                          "the cache is damaged; write it again with `fastcd cache-teacher --force`")
    return Contents(tuple(c["channels"]), c["num_classes"], c["logits"], c["embed_dim"], c["dtype"])


def open_epoch(root: Path, epoch: int, contents: Contents, samples: int) -> dict[str, np.ndarray]:
    """The arrays of finished epoch `epoch`, memory-mapped read-only, each checked for the shape and dtype
    `contents` and `samples` give; a FastcdError naming a missing, short or mis-shaped file."""
    folder = epoch_dir(root, epoch)
    arrays = {}
    for name, (cols, dtype) in contents.arrays().items():
        path = folder / f"{name}.npy"
        try:
            arrays[name] = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
            raise FastcdError(f"teacher cache file {str(path)!r} cannot be read ({e or type(e).__name__})") from None
        array = arrays[name]
        if array.shape != (samples, cols) or array.dtype != dtype:
            raise FastcdError(f"{path} holds {array.shape} {array.dtype}, the manifest says {(samples, cols)} "
                              f"{dtype}")
    return arrays


class CacheReader:
    """The finished epochs of a cache, read a batch at a time."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(root)
        self.contents = manifest_contents(self.manifest)
        self.epochs = self.manifest["epochs"]
        self._open: dict[int, dict[str, np.ndarray]] = {}

    def check(self, epochs: Iterable[int]) -> None:
        """Every epoch of `epochs` is finished and its files hold what the manifest says: a one-line error if not,
        found before a run deletes or trains anything rather than when the epoch starts."""
        for epoch in sorted(set(epochs)):
            self._finished(epoch)

    def _finished(self, epoch: int) -> dict[str, np.ndarray]:
        if epoch not in self.manifest["epochs_done"]:
            raise FastcdError(f"teacher cache {str(self.root)!r} has not finished epoch {epoch} (done: "
                              f"{self.manifest['epochs_done']}); resume `fastcd cache-teacher`")
        try:
            return open_epoch(self.root, epoch, self.contents, self.manifest["samples"])
        except FastcdError as e:
            raise FastcdError(f"{e}: the cache is damaged; run `fastcd cache-teacher` again to rewrite that "
                              "epoch") from None

    def _arrays(self, epoch: int) -> dict[str, np.ndarray]:
        if epoch not in self._open:
            self._open = {epoch: self._finished(epoch)}  # one epoch mapped at a time
        return self._open[epoch]

    def batches(self, epoch: int, batch_indices: Sequence[Tensor], device: torch.device) -> Iterator[TeacherTargets]:
        """The targets of each batch of `batch_indices` (sample indices) of cache epoch `epoch`."""
        arrays = self._arrays(epoch)
        for indices in batch_indices:
            idx = indices.cpu().numpy()
            yield self.contents.targets({name: np.ascontiguousarray(a[idx]) for name, a in arrays.items()}, device)
