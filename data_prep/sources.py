"""What to convert: the samples of each split, in their deterministic order, with labels.

Three kinds of SRC: an ImageNet-layout tree (`SRC/<split>/<class>/<file>`), a flat folder of
files labelled by `--labels FILE` (either `SRC/<split>/` or SRC itself, as the `val` split), and
the word `fashion-mnist`. Class indices are the sorted class names, shared by all splits.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastcd.data_prep.labels import label_for, read_labels
from fastcd.errors import FastcdError

FASHION_MNIST = "fashion-mnist"
SPLITS = ("train", "val")


@dataclass
class SplitSource:
    """One split: per sample a file path (or a pixel array), its name for messages, and its label."""

    name: str
    items: Sequence[str] | np.ndarray
    names: list[str]
    labels: list[int]
    skipped: list[dict] = field(default_factory=list)  # dropped before conversion (e.g. no label)


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
    out = SplitSource(split, [], [], [], [{"path": shown(f"{split}/{name}"), "reason": "not inside a class folder"}
                                          for name in stray])
    out.skipped += [{"path": shown(f"{split}/{name}"), "reason": reason} for name, reason in bad]
    for cls in class_dirs:
        if cls not in index:
            raise FastcdError(f"{folder / cls} is a class folder missing from the class list taken from "
                              f"{src}/train; every split must use the training classes")
        try:
            sub_dirs, files, bad = _entries(folder / cls)
        except OSError as e:
            out.skipped.append({"path": shown(f"{split}/{cls}/"), "reason": f"cannot list the folder ({e.strerror})"})
            continue
        out.skipped += [{"path": shown(f"{split}/{cls}/{d}/"), "reason": "a folder inside a class folder (not read: "
                         "images must lie directly in the class folder)"} for d in sub_dirs]
        out.skipped += [{"path": shown(f"{split}/{cls}/{name}"), "reason": reason} for name, reason in bad]
        for name in files:
            out.items.append(str(folder / cls / name))
            out.names.append(shown(f"{split}/{cls}/{name}"))
            out.labels.append(index[cls])
    return out


def _flat_split(src: Path, split: str, folder: Path, labels_file: Path, classes: list[str]) -> SplitSource:
    by_name = read_labels(labels_file, classes)
    index = {c: i for i, c in enumerate(classes)}
    prefix = "" if folder == src else f"{split}/"
    _, files, bad = _entries(folder)
    out = SplitSource(split, [], [], [], [{"path": shown(prefix + name), "reason": reason} for name, reason in bad])
    for name in files:
        cls = label_for(name, by_name)
        if cls is None:
            out.skipped.append({"path": shown(prefix + name), "reason": f"no label in {labels_file.name}"})
            continue
        if cls not in index:
            raise FastcdError(f"{labels_file}: class {cls!r} of {name} is not one of the {len(classes)} "
                              f"classes (class folders of {src}/train, or the classes in the labels file)")
        out.items.append(str(folder / name))
        out.names.append(shown(prefix + name))
        out.labels.append(index[cls])
    return out


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
        out[split] = SplitSource(split, images, names, labels.astype(int).tolist())
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
