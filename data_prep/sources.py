"""What to convert: the samples of each split, in their deterministic order, with labels.

Three kinds of SRC: an ImageNet-layout tree (`SRC/<split>/<class>/<file>`), a flat folder of
files labelled by `--labels FILE` (either `SRC/<split>/` or SRC itself, as the `val` split), and
the word `fashion-mnist`. Class indices are the sorted class names, shared by all splits.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np

from fastcd.data_prep.labels import label_for, read_labels
from fastcd.errors import FastcdError

FASHION_MNIST = "fashion-mnist"
SPLITS = ("train", "val")


class Packed(Sequence[str]):
    """Strings `prefix + part` stored as the parts' bytes in one buffer and their end offsets: about the part's
    length plus 8 bytes each, instead of a Python object each (ImageNet's 1.33 M paths and names would be about
    250 bytes a sample as lists). `decode` turns a part's bytes back into text (`os.fsdecode` for file names)."""

    def __init__(self, prefix: str, parts: bytes, ends: np.ndarray, decode: Callable[[bytes], str]) -> None:
        self.prefix, self.parts, self.ends, self.decode = prefix, parts, ends, decode

    @classmethod
    def join(cls, prefix: str, chunks: list[tuple[bytes, np.ndarray]], decode: Callable[[bytes], str]) -> Packed:
        """From (bytes, part lengths) chunks, in order (one per class folder, say)."""
        lengths = np.concatenate([n for _, n in chunks]) if chunks else np.zeros(0, np.int64)
        return cls(prefix, b"".join(b for b, _ in chunks), np.cumsum(lengths, dtype=np.int64), decode)

    def __len__(self) -> int:
        return len(self.ends)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Packed: ...

    def __getitem__(self, i: int | slice) -> str | Packed:
        if isinstance(i, slice):  # a leading run (`--limit`)
            start, stop, step = i.indices(len(self))
            if start != 0 or step != 1:
                raise ValueError("Packed takes only leading slices")
            return Packed(self.prefix, self.parts[:int(self.ends[stop - 1]) if stop else 0], self.ends[:stop],
                          self.decode)
        i = range(len(self))[i]
        lo = int(self.ends[i - 1]) if i else 0
        return self.prefix + self.decode(self.parts[lo:int(self.ends[i])])


@dataclass
class SplitSource:
    """One split: per sample a file path (or a pixel array), its name for messages, and its label."""

    name: str
    items: Sequence[str] | np.ndarray
    names: Sequence[str]
    labels: np.ndarray  # int32, one per sample
    skipped: list[dict] = field(default_factory=list)  # dropped before conversion (e.g. no label)


class _Listing:
    """The files of a split as they are found, per folder: their relative paths packed, and their labels."""

    def __init__(self) -> None:
        self.chunks: list[tuple[bytes, np.ndarray]] = []
        self.labels: list[np.ndarray] = []

    def add(self, folder: str, files: list[str], labels: list[int] | int) -> None:
        """`files` of `folder` ('' or 'class/'), with one label for all or one each."""
        parts = [os.fsencode(folder + name) for name in files]
        self.chunks.append((b"".join(parts), np.fromiter(map(len, parts), np.int64, len(parts))))
        self.labels.append(np.full(len(files), labels, np.int32) if isinstance(labels, int)
                           else np.asarray(labels, np.int32))

    def split(self, split: str, root: Path, prefix: str, skipped: list[dict]) -> SplitSource:
        """The listing as a split: items `root/<part>`, names `<prefix><part>` (printable, `shown`)."""
        items = Packed.join(f"{root}{os.sep}", self.chunks, os.fsdecode)
        names = Packed(prefix, items.parts, items.ends, lambda b: shown(os.fsdecode(b)))
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, np.int32)
        return SplitSource(split, items, names, labels, skipped)


@dataclass
class Source:
    """All requested splits of one SRC and the class names in index order."""

    classes: list[str]
    splits: dict[str, SplitSource]


def shown(name: str) -> str:
    """A file name as printable text: bytes that are not UTF-8 appear as `\\xNN` (the manifest is JSON)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _entries(folder: Path) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Sorted visible sub-folder names and file names of `folder`, and the entries that cannot be told apart
    (a symlink loop, say) with the reason: one bad entry costs that entry, not the folder."""
    dirs, files, bad = [], [], []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            try:
                (dirs if entry.is_dir() else files).append(entry.name)
            except OSError as e:
                bad.append((entry.name, f"cannot be read ({e.strerror})"))
    return sorted(dirs), sorted(files), sorted(bad)


def _tree_split(src: Path, split: str, folder: Path, classes: list[str]) -> SplitSource:
    index = {c: i for i, c in enumerate(classes)}
    class_dirs, stray, bad = _entries(folder)
    skipped = [{"path": shown(f"{split}/{name}"), "reason": "not inside a class folder"} for name in stray]
    skipped += [{"path": shown(f"{split}/{name}"), "reason": reason} for name, reason in bad]
    listing = _Listing()
    for cls in class_dirs:
        if cls not in index:
            raise FastcdError(f"{folder / cls} is a class folder missing from the class list taken from "
                              f"{src}/train; every split must use the training classes")
        try:
            sub_dirs, files, bad = _entries(folder / cls)
        except OSError as e:
            skipped.append({"path": shown(f"{split}/{cls}/"), "reason": f"cannot list the folder ({e.strerror})"})
            continue
        skipped += [{"path": shown(f"{split}/{cls}/{d}/"), "reason": "a folder inside a class folder (not read: "
                     "images must lie directly in the class folder)"} for d in sub_dirs]
        skipped += [{"path": shown(f"{split}/{cls}/{name}"), "reason": reason} for name, reason in bad]
        listing.add(f"{cls}{os.sep}", files, index[cls])
    return listing.split(split, folder, f"{split}/", skipped)


def _flat_split(src: Path, split: str, folder: Path, labels_file: Path, classes: list[str]) -> SplitSource:
    by_name = read_labels(labels_file, classes)
    index = {c: i for i, c in enumerate(classes)}
    prefix = "" if folder == src else f"{split}/"
    _, files, bad = _entries(folder)
    skipped = [{"path": shown(prefix + name), "reason": reason} for name, reason in bad]
    kept, labels = [], []
    for name in files:
        cls = label_for(name, by_name)
        if cls is None:
            skipped.append({"path": shown(prefix + name), "reason": f"no label in {labels_file.name}"})
            continue
        if cls not in index:
            raise FastcdError(f"{labels_file}: class {cls!r} of {name} is not one of the {len(classes)} "
                              f"classes (class folders of {src}/train, or the classes in the labels file)")
        kept.append(name)
        labels.append(index[cls])
    listing = _Listing()
    listing.add("", kept, labels)
    return listing.split(split, folder, prefix, skipped)


def _open_tree(src: Path, splits: Sequence[str] | None, labels_file: Path | None) -> Source:
    top_dirs, top_files, _ = _entries(src)
    if not top_dirs and top_files:  # SRC itself is a flat validation folder
        if labels_file is None:
            raise FastcdError(f"{src} holds files but no split folders; for a flat validation folder "
                              f"give --labels FILE, otherwise use SRC/train/<class>/... and SRC/val/<class>/...")
        if splits not in (None, ["val"], ("val",)):
            raise FastcdError(f"{src} is a flat folder, which can only be the 'val' split; use --splits val")
        classes = sorted(set(read_labels(labels_file).values()))
        return Source(classes, {"val": _flat_split(src, "val", src, labels_file, classes)})
    wanted = list(splits) if splits else [s for s in SPLITS if s in top_dirs]
    missing = [s for s in wanted if not (src / s).is_dir()]
    if missing or not wanted:
        raise FastcdError(f"{src} has no {'/'.join(missing or SPLITS)} folder; expected an ImageNet layout "
                          f"SRC/<split>/<class>/<image> (found: {', '.join(top_dirs) or 'nothing'})")
    if (src / "train").is_dir():
        classes = _entries(src / "train")[0]
    elif labels_file is not None:
        classes = sorted(set(read_labels(labels_file).values()))
    else:
        classes = sorted({c for s in wanted for c in _entries(src / s)[0]})
    out = {}
    for split in wanted:
        folder = src / split
        if _entries(folder)[0]:
            out[split] = _tree_split(src, split, folder, classes)
        elif labels_file is not None:
            out[split] = _flat_split(src, split, folder, labels_file, classes)
        else:
            raise FastcdError(f"{folder} has no class folders; give --labels FILE for a flat folder")
    return Source(classes, out)


def _open_fashion_mnist(splits: Sequence[str] | None) -> Source:
    from fastcd.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_split

    out = {}
    for split in splits or SPLITS:
        if split not in SPLITS:
            raise FastcdError(f"fashion-mnist has splits train and val (the t10k files), not {split!r}")
        images, labels = load_split(FASHION_MNIST_DIR, split)
        names = [f"{FASHION_MNIST}/{split}/{i:05d}" for i in range(len(images))]
        out[split] = SplitSource(split, images, names, labels.astype(np.int32))
    return Source(list(FASHION_MNIST_CLASSES), out)


def _limited(split: SplitSource, limit: int | None) -> SplitSource:
    if limit is None:
        return split
    return SplitSource(split.name, split.items[:limit], split.names[:limit], split.labels[:limit], split.skipped)


def open_source(src: str, splits: Sequence[str] | None = None, labels_file: str | None = None,
                limit: int | None = None) -> Source:
    """List the samples of SRC's requested splits (all present ones when `splits` is None)."""
    if src == FASHION_MNIST:
        source = _open_fashion_mnist(splits)
    else:
        path = Path(src)
        if not path.is_dir():
            raise FastcdError(f"SRC {src} is not a folder; give an ImageNet-layout folder or 'fashion-mnist'")
        if labels_file is not None and not Path(labels_file).is_file():  # a FIFO would block the read
            raise FastcdError(f"labels file {labels_file} does not exist or is not a regular file")
        try:
            source = _open_tree(path, splits, Path(labels_file) if labels_file else None)
        except OSError as e:
            raise FastcdError(f"cannot list {e.filename} ({e.strerror}); SRC must be readable") from e
    for split in source.splits.values():
        if not split.names:
            raise FastcdError(f"split {split.name} of {src} has no files")
    source.splits = {name: _limited(s, limit) for name, s in source.splits.items()}
    return source
