"""The ImageNet-shaped source of the full-size rehearsal: ImageNet's counts, layout and odd files."""
from __future__ import annotations

import hashlib

from fastcd.bench.scale_source import CLASSES, FEWEST, MOST, TRAIN_IMAGES, VAL_IMAGES, generate, layout
from fastcd.data_prep.labels import label_for, read_labels
from fastcd.data_prep.sources import open_source


def test_full_layout_has_imagenets_counts():
    lay = layout(1.0)
    assert lay.train_images == TRAIN_IMAGES and len(lay.val_labels) == VAL_IMAGES
    assert len(set(lay.synsets)) == CLASSES and lay.counts.min() == FEWEST and lay.counts.max() == MOST
    assert all(s.startswith("n") and len(s) == 9 for s in lay.synsets)


def test_generated_tree_is_imagenet_shaped_with_odd_files(tmp_path):
    src = tmp_path / "src"
    lay = generate(src, 0.002, workers=2, seed=3, progress=False)
    files = sorted((src / "train").rglob("*.JPEG"))
    assert len(files) == lay.train_images and len({f.parent.name for f in files}) == CLASSES
    blobs = [f.read_bytes() for f in files]
    assert len({hashlib.sha256(b).digest() for b in blobs}) == len(blobs)  # each image distinct
    assert all(200 <= len(b) <= 4096 for b in blobs if b.endswith(b"\xff\xd9"))  # the JPEGs: tiny
    heads = [b[:4] for b in blobs]
    assert heads.count(b"\x89PNG") == 1  # a PNG named .JPEG, as ImageNet has
    assert sum(not b.endswith(b"\xff\xd9") for b in blobs) >= 1  # the truncated one
    labels = read_labels(src / "LOC_val_solution.csv")
    assert len(list((src / "val").iterdir())) == len(lay.val_labels)
    source = open_source(str(src), labels_file=str(src / "LOC_val_solution.csv"))
    assert len(source.splits["train"].names) == lay.train_images
    val = source.splits["val"]
    assert [source.classes[c] for c in val.labels] == [label_for(n.split("/")[-1], labels) for n in val.names]
    written = files[0].stat().st_mtime_ns
    assert generate(src, 0.002, workers=2, seed=3, progress=False).train_images == lay.train_images
    assert files[0].stat().st_mtime_ns == written  # reused, not rewritten
