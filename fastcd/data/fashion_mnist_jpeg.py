"""Fashion-MNIST written as JPEG files in the ImageNet layout (`<root>/<split>/<class>/<index>.jpg`): the input
of the original pipeline (ImageFolder + PIL) and of `fastcd prepare`, so both read the same bytes.

Each image is a baseline RGB JPEG (the grey value in all three channels), which `fastcd prepare` passes
through byte for byte. Class folders are `<label>_<name>`, so their sorted order (ImageFolder's class
indices) is the label order. The tree is written to a temporary folder and renamed; `tree.json` records
what it holds, and a tree that already holds the same is kept.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from PIL import Image

from fastcd.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_split
from fastcd.errors import FastcdError

JPEG_QUALITY = 95
MARKER = "tree.json"


def class_folders() -> list[str]:
    """The class folder names, in label order (`0_t-shirt-top`, `1_trouser`, ...)."""
    return [f"{i}_{re.sub(r'[^a-z0-9]+', '-', name.lower())}" for i, name in enumerate(FASHION_MNIST_CLASSES)]


def write_jpeg_tree(root: str | Path, train_subset: int = 0, val_subset: int = 0, quality: int = JPEG_QUALITY,
                    source: str | Path = FASHION_MNIST_DIR) -> dict:
    """Write the first `train_subset` training and `val_subset` test images (0: all) under `root` as
    `train/` and `val/`; return the tree's record (counts per split, quality, source). Kept as it is when
    `root` already holds the same tree."""
    root = Path(root)
    record = {"source": str(source), "quality": quality, "classes": class_folders(), "splits": {}}
    splits = {}
    for split, limit in (("train", train_subset), ("val", val_subset)):
        images, labels = load_split(source, split)
        splits[split] = (images[:limit or len(images)], labels[:limit or len(labels)])
        record["splits"][split] = len(splits[split][0])
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == record:
        return record
    if root.exists() and any(root.iterdir()) and not marker.is_file():
        raise FastcdError(f"{root} exists and is not a Fashion-MNIST JPEG tree (no {MARKER}); choose another folder")
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    folders = class_folders()
    for split, (images, labels) in splits.items():
        for folder in folders:
            (tmp / split / folder).mkdir(parents=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            path = tmp / split / folders[int(label)] / f"{i:05d}.jpg"
            Image.fromarray(image).convert("RGB").save(path, format="JPEG", quality=quality, progressive=False)
    (tmp / MARKER).write_text(json.dumps(record, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return record
