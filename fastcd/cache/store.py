"""The cache's files: writing an epoch of targets by sample index (resumable), and reading a batch's back."""
from __future__ import annotations

import json
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

FORMAT = "fastcd-teacher-cache-v1"
DTYPES = {"fp16": np.float16, "fp32": np.float32}
TOPK_FILL = 30.0  # logits outside a stored top-k sit this far below its smallest (a softmax mass of ~1e-13 each)


@dataclass(frozen=True)
class Contents:
    """What a cache stores per crop: the stage means (always), logits (`full`, `topk=K` or `none`), the
    pooled embedding or not; in fp16 or fp32."""

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
        if self.embed_dim:
            out["embed"] = targets.embed.float().cpu().numpy().astype(value)
        return out

    def targets(self, rows: dict[str, np.ndarray], device: torch.device) -> TeacherTargets:
        """Stored rows of a batch back as fp32 `TeacherTargets` on `device` (top-k logits made dense again)."""
        def dev(a: np.ndarray) -> Tensor:
            t = torch.from_numpy(a)
            return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)

        means = dev(rows["means"]).float().split(list(self.channels), dim=1)
        logits = None
        if self.logits == "full":
            logits = dev(rows["logits"]).float()
        elif self.topk:
            values = dev(rows["topk_values"]).float()
            logits = (values.min(dim=1, keepdim=True).values - TOPK_FILL).expand(-1, self.num_classes).clone()
            logits.scatter_(1, dev(rows["topk_indices"]).long(), values)
        embed = dev(rows["embed"]).float() if self.embed_dim else None
        return TeacherTargets(means=list(means), logits=logits, embed=embed)


def epoch_dir(root: Path, epoch: int, partial: bool = False) -> Path:
    return root / f"epoch-{epoch:04d}{'.partial' if partial else ''}"


class EpochWriter:
    """Targets of one epoch written by sample index into memory-mapped arrays under `epoch-NNNN.partial/`,
    with `progress.json` naming the batches done (flushed together, so a killed write resumes there);
    `finish` renames the folder into place."""

    def __init__(self, root: Path, epoch: int, contents: Contents, samples: int) -> None:
        self.root, self.epoch = root, epoch
        self.folder = epoch_dir(root, epoch, partial=True)
        progress = self.folder / "progress.json"
        fresh = not progress.is_file()
        if fresh:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
        self.batches_done = 0 if fresh else json.loads(progress.read_text())["batches_done"]
        mode = "w+" if fresh else "r+"
        self.arrays = {name: np.lib.format.open_memmap(self.folder / f"{name}.npy", mode=mode, dtype=dtype,
                                                       shape=(samples, cols))
                       for name, (cols, dtype) in contents.arrays().items()}

    def write(self, indices: Tensor, rows: dict[str, np.ndarray]) -> None:
        idx = indices.cpu().numpy()
        for name, array in self.arrays.items():
            array[idx] = rows[name]

    def checkpoint(self, batches_done: int) -> None:
        """Everything written so far is on disk, then `progress.json` says so."""
        for array in self.arrays.values():
            array.flush()
        self.batches_done = batches_done
        atomic_write_json(self.folder / "progress.json", {"batches_done": batches_done})

    def finish(self) -> None:
        self.checkpoint(self.batches_done)
        self.arrays.clear()
        (self.folder / "progress.json").unlink()
        final = epoch_dir(self.root, self.epoch)
        shutil.rmtree(final, ignore_errors=True)
        self.folder.rename(final)


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(root / "manifest.json", manifest)


def new_manifest(identity: dict[str, Any], contents: Contents, epochs: int, samples: int) -> dict[str, Any]:
    stored = {**asdict(contents), "channels": list(contents.channels)}  # as JSON gives it back
    return {"format": FORMAT, "identity": identity, "contents": stored, "epochs": epochs, "samples": samples,
            "epochs_done": []}


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
    if manifest.get("format") != FORMAT:
        raise FastcdError(f"{str(path)!r} is not a {FORMAT} manifest (format {manifest.get('format')!r})")
    return manifest


class CacheReader:
    """The finished epochs of a cache, read a batch at a time."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(root)
        c = self.manifest["contents"]
        self.contents = Contents(tuple(c["channels"]), c["num_classes"], c["logits"], c["embed_dim"], c["dtype"])
        self.epochs = self.manifest["epochs"]
        self._open: dict[int, dict[str, np.ndarray]] = {}

    def _arrays(self, epoch: int) -> dict[str, np.ndarray]:
        if epoch not in self._open:
            if epoch not in self.manifest["epochs_done"]:
                raise FastcdError(f"teacher cache {str(self.root)!r} has not finished epoch {epoch} (done: "
                                  f"{self.manifest['epochs_done']}); resume `fastcd cache-teacher`")
            folder = epoch_dir(self.root, epoch)
            try:
                arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in self.contents.arrays()}
            except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
                raise FastcdError(f"teacher cache epoch {str(folder)!r} cannot be read ({e})") from None
            for name, array in arrays.items():
                cols, dtype = self.contents.arrays()[name]
                if array.shape != (self.manifest["samples"], cols) or array.dtype != dtype:
                    raise FastcdError(f"{folder / name}.npy holds {array.shape} {array.dtype}, the manifest says "
                                      f"{(self.manifest['samples'], cols)} {dtype}: the cache is damaged")
            self._open = {epoch: arrays}  # one epoch mapped at a time
        return self._open[epoch]

    def check(self, epochs: Iterable[int]) -> None:
        """Each of `epochs` is finished and its files hold the manifest's shapes: a one-line error if not, found
        before a run deletes or trains anything rather than when the epoch starts."""
        for epoch in sorted(set(epochs)):
            self._arrays(epoch)

    def batches(self, epoch: int, batch_indices: Sequence[Tensor], device: torch.device) -> Iterator[TeacherTargets]:
        """The targets of each batch of `batch_indices` (sample indices) of cache epoch `epoch`."""
        arrays = self._arrays(epoch)
        for indices in batch_indices:
            idx = indices.cpu().numpy()
            yield self.contents.targets({name: np.ascontiguousarray(a[idx]) for name, a in arrays.items()}, device)
