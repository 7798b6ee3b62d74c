"""data_prep.sources: a split's listing holds no Python object per sample, and lists what it always listed."""
from __future__ import annotations

import hashlib
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fastcd.data_prep.prepare import _digest
from fastcd.data_prep.sources import Packed, open_source, shown

CLASSES, PER_CLASS = 40, 500  # 20,000 files


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SRC/train/<class>/<file>, empty files (listing reads no bytes), one name that is not UTF-8."""
    root = tmp_path_factory.mktemp("tree")
    for c in range(CLASSES):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for k in range(PER_CLASS):
            (folder / f"n{c:08d}_{k * 7 + 1}.JPEG").touch()
    (root / "train" / "n00000003" / os.fsdecode(b"odd\xffname.JPEG")).touch()
    return root


def test_listing_costs_under_100_bytes_a_sample(tree: Path) -> None:
    """ImageNet's 1.33 M files as Python lists of paths, names and labels were about 250 bytes a sample."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    source = open_source(str(tree))
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    n = len(source.splits["train"].names)
    assert n == CLASSES * PER_CLASS + 1
    assert held / n < 100, f"{held / n:.0f} bytes a sample"


def test_paths_names_and_labels_are_those_listed(tree: Path) -> None:
    split = open_source(str(tree)).splits["train"]
    expected = sorted((c, f) for c in os.listdir(tree / "train") for f in os.listdir(tree / "train" / c))
    assert list(split.items) == [str(tree / "train" / c / f) for c, f in expected]
    assert list(split.names) == [shown(f"train/{c}/{f}") for c, f in expected]
    assert split.labels.dtype == np.int32
    assert split.labels.tolist() == [int(c[1:]) for c, _ in expected]
    odd = [i for i, name in enumerate(split.names) if "odd" in name]
    assert split.names[odd[0]] == "train/n00000003/odd\\xffname.JPEG"
    assert os.path.exists(split.items[odd[0]])  # the undecodable byte round-trips into the path
    head = split.names[:5]
    assert isinstance(head, Packed) and list(head) == list(split.names)[:5] and len(split.items[:0]) == 0


def test_digest_is_what_lists_gave(tree: Path) -> None:
    """A folder prepared before keeps its identity: the digest is computed over the same text as from lists."""
    source = open_source(str(tree))
    split = source.splits["train"]
    sha = hashlib.sha256(b'[{"a": 1}, ' + str(source.classes).replace("'", '"').encode() + b"]")
    sha.update(b"\0train\0")
    sha.update("\n".join(list(split.names)).encode())
    sha.update(bytes(str([int(x) for x in split.labels]), "ascii"))
    assert _digest({"a": 1}, source) == sha.hexdigest()
