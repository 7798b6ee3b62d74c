"""The sample table written at prepare time and the host feed that reads it per batch: the table equals
what the shards hold, an older folder is refused by name and upgraded once, the feed hands over the bytes,
labels and crops of exactly the epoch's batches, reuses its buffers safely, and stops cleanly."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastcd.config import DataConfig
from fastcd.data import LoaderContext, build_loader
from fastcd.data.crops import CropPlan
from fastcd.data.feed import HostFeed, Stopped, staged
from fastcd.data.prepared import ShardSamples, open_prepared
from fastcd.data_prep.manifest import manifest_path
from fastcd.data_prep.prepare import prepare, upgrade
from fastcd.data_prep.sample_table import HEIGHT, LABEL, OFFSET, WIDTH, read_table
from fastcd.data_prep.shards import read_index
from fastcd.data_prep.verify import verify
from fastcd.errors import FastcdError
from tests.test_loaders import smooth_image

CLASSES = 3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of images of odd, varied sizes (one greyscale), several shards, a source that also needs
    re-encoding (a PNG): the writer's sizes must be the stored JPEGs' sizes."""
    root = tmp_path_factory.mktemp("feed")
    rng = np.random.default_rng()
    for c in range(CLASSES):
        folder = root / "src" / "train" / f"c{c}"
        folder.mkdir(parents=True)
        for i in range(9):
            w, h = (int(v) for v in rng.integers(17, 130, 2))
            img = smooth_image(rng, w, h)
            if i == 0:
                img.convert("L").save(folder / f"{i}.jpg", quality=90)
            elif i == 1:
                img.save(folder / f"{i}.png")
            else:
                img.save(folder / f"{i}.jpg", quality=90)
    prepare(root / "src", root / "out", formats=["dali"], workers=1, shard_samples=5, progress=False, max_side=100)
    return root / "out"


def ctx(**kw) -> LoaderContext:
    return LoaderContext(torch.device("cpu"), num_classes=CLASSES, **kw)


def samples_of(path: Path) -> ShardSamples:
    return ShardSamples(open_prepared(str(path), "train", ctx(), "dali"))


def test_the_table_is_what_the_shards_hold(prepared: Path) -> None:
    manifest = json.loads(manifest_path(prepared).read_text())
    entry = manifest["splits"]["train"]
    table = read_table(prepared / entry["samples"]["file"])
    assert len(table) == entry["num_samples"] == 3 * 9
    row = 0
    for shard in entry["shards"]:
        data = (prepared / shard["tar"]).read_bytes()
        for sample in read_index(prepared / shard["index"]):
            jpg, cls = sample["jpg"], sample["cls"]
            width, height = Image.open(io.BytesIO(data[jpg.offset:jpg.offset + jpg.size])).size
            assert (table[row, HEIGHT], table[row, WIDTH]) == (height, width)
            assert table[row, LABEL] == int(data[cls.offset:cls.offset + cls.size])
            row += 1
    assert max(table[:, HEIGHT].max(), table[:, WIDTH].max()) <= 100  # the re-encoded, resized size
    assert verify(prepared)["train"] == 27


def test_a_damaged_table_is_found(prepared: Path, tmp_path: Path) -> None:
    copy = tmp_path / "out"
    shutil.copytree(prepared, copy)
    path = copy / "train" / "samples.npy"
    table = read_table(path)
    table[4, HEIGHT] += 1  # one size off: same file length
    np.save(path, table)
    with pytest.raises(FastcdError, match="sha256 differs"):
        verify(copy)
    table[4, LABEL] = CLASSES  # and a label out of range, the manifest edited to match: refused on open
    np.save(path, table)
    manifest = json.loads(manifest_path(copy).read_text())
    manifest["splits"]["train"]["samples"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path(copy).write_text(json.dumps(manifest))
    with pytest.raises(FastcdError, match="labels outside"):
        samples_of(copy)


@pytest.mark.parametrize("column", [LABEL, OFFSET])
def test_an_edited_table_is_refused_when_a_loader_opens_it(prepared: Path, tmp_path: Path, column: int) -> None:
    """A row edited in place (same file size): another valid label, or the offset of the next JPEG, which the
    range checks cannot see. Every loader that reads the table hashes it against the manifest on open."""
    copy = tmp_path / "out"
    shutil.copytree(prepared, copy)
    path = copy / "train" / "samples.npy"
    table = read_table(path)
    table[3, column] = table[4, column] if column == OFFSET else (table[3, LABEL] + 1) % CLASSES
    np.save(path, table)
    for backend in ("torch", "dali"):
        with pytest.raises(FastcdError, match=f"sample table {path} is damaged \\(its sha256 differs from the "
                                              f"manifest's.*run `fastcd prepare --verify {copy}`"):
            build_loader(DataConfig(backend=backend, path=str(copy), decode="workers" if backend == "torch"
                                    else "auto"), "train", ctx())


def folder_without_table(prepared: Path, tmp_path: Path) -> Path:
    """A copy of `prepared` as an earlier fastcd wrote it: no train sample table, none in the manifest."""
    old = tmp_path / "old"
    shutil.copytree(prepared, old)
    manifest = json.loads(manifest_path(old).read_text())
    del manifest["splits"]["train"]["samples"]
    manifest_path(old).write_text(json.dumps(manifest))
    (old / "train" / "samples.npy").unlink()
    return old


def test_an_older_folder_is_refused_by_name_then_upgraded_once(prepared: Path, tmp_path: Path) -> None:
    old = folder_without_table(prepared, tmp_path)
    with pytest.raises(FastcdError, match=f"fastcd prepare --upgrade {old}"):
        samples_of(old)
    assert upgrade(old, progress=False) == ["train"]
    assert upgrade(old, progress=False) == []
    assert np.array_equal(read_table(old / "train" / "samples.npy"), read_table(prepared / "train" / "samples.npy"))
    assert verify(old)["train"] == 27


def test_an_upgrade_on_a_full_disk_is_a_one_line_error_and_changes_nothing(prepared: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import fastcd.data_prep.sample_table as sample_table

    old = folder_without_table(prepared, tmp_path)
    before = manifest_path(old).read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(old / "train" / "samples.npy"))

    monkeypatch.setattr(sample_table, "write_table", full)
    with pytest.raises(FastcdError, match="upgrade of .* stopped: No space left on device .*run `fastcd prepare "
                                          "--upgrade` again"):
        upgrade(old, progress=False)
    assert manifest_path(old).read_bytes() == before and not (old / ".prepare.lock").exists()


def _damage_sample(old: Path, sample: int, where: int, keep_sha: bool) -> Path:
    """Overwrite two bytes of train sample `sample`'s JPEG, `where` bytes into it; with `keep_sha` the manifest
    records the damaged tar's sha256 (a shard damaged before it was hashed). Returns the tar."""
    manifest = json.loads(manifest_path(old).read_text())
    shards = manifest["splits"]["train"]["shards"]
    entries = [(shard, e) for shard in shards for e in read_index(old / shard["index"])]
    shard, entry = entries[sample]
    tar = old / shard["tar"]
    with open(tar, "r+b") as f:
        f.seek(entry["jpg"].offset + where)
        f.write(b"\0\0")
    if keep_sha:
        shard["sha256"] = hashlib.sha256(tar.read_bytes()).hexdigest()
        manifest_path(old).write_text(json.dumps(manifest))
    return tar


def test_an_upgrade_checks_the_shards_sha256_before_building_a_table(prepared: Path, tmp_path: Path) -> None:
    """A byte changed inside a JPEG's data, which no header read sees: the upgrade refuses the shard by name
    and leaves the folder as it was."""
    old = folder_without_table(prepared, tmp_path)
    tar = _damage_sample(old, 5, 200, keep_sha=False)
    before = manifest_path(old).read_bytes()
    with pytest.raises(FastcdError, match=f"shard {tar}: its sha256 differs from the manifest's, so no sample table "
                                          f"is built from it \\({old} is as it was\\)"):
        upgrade(old, progress=False)
    assert manifest_path(old).read_bytes() == before and not (old / "train" / "samples.npy").exists()


def test_an_upgrade_names_the_shard_and_sample_of_a_corrupt_jpeg_header(prepared: Path, tmp_path: Path) -> None:
    old = folder_without_table(prepared, tmp_path)
    tar = _damage_sample(old, 5, 0, keep_sha=True)
    with pytest.raises(FastcdError, match=f"^shard {tar}: sample 000000005.jpg: its JPEG header cannot be read "
                                          "\\(UnidentifiedImageError\\); the shard is damaged \\(`fastcd prepare "
                                          "--verify` names every damaged file\\)$"):
        upgrade(old, progress=False)


def test_gather_copies_each_jpeg_in_order(prepared: Path) -> None:
    s = samples_of(prepared)
    idx = np.array([26, 0, 13, 5, 5, 7])
    out = np.zeros(int(s.length[idx].sum()) + 3, dtype=np.uint8)
    lengths = s.gather(idx, out)
    assert lengths.tolist() == s.length[idx].tolist()
    assert out.tobytes()[:int(lengths.sum())] == b"".join(s.jpeg(int(i)).tobytes() for i in idx)


def test_the_feed_hands_over_the_epochs_batches_with_their_crops(prepared: Path) -> None:
    """Batches in the epoch's exact order (the global shuffle kept), each with its labels, bytes and the
    crop rows CropPlan gives those samples; buffers are reused across batches, never while in use."""
    cfg = DataConfig(backend="torch", path=str(prepared), batch_size=4, res=24, decode="device", workers=0)
    loader = build_loader(cfg, "train", ctx(seed=3))
    loader.set_epoch(2)
    s = loader.samples
    feed = HostFeed(s, slots=2, pin=False)
    plan = CropPlan(True, 24, cfg.scale_min, cfg.val_resize_ratio, 3, 2)
    seen, held = [], []
    for indices in loader.batch_indices():
        batch = feed.batch(indices, plan)
        idx = indices.numpy()
        assert batch.labels.tolist() == s.labels[idx].tolist()
        assert torch.equal(batch.rows, plan.rows(indices, torch.from_numpy(s.heights[idx]),
                                                 torch.from_numpy(s.widths[idx])))
        jpegs = batch.data.split(batch.lengths.tolist())
        assert all(bytes(j.numpy()) == s.jpeg(int(i)).tobytes() for j, i in zip(jpegs, idx))
        seen += idx.tolist()
        held.append(batch)
        if len(held) == 2:  # both buffers in use: the next batch waits until one is released
            feed.release(held.pop(0), None)
    assert seen == torch.cat(loader.batch_indices()).tolist()
    assert len({b.data_ptr() for b in feed.buffers}) == 2


def test_a_full_ring_waits_and_a_stop_ends_the_wait(prepared: Path) -> None:
    s = samples_of(prepared)
    feed = HostFeed(s, slots=1, pin=False)
    plan = CropPlan(True, 16, 0.35, 1.0, 0, 0)
    feed.batch(torch.tensor([0, 1]), plan)  # holds the only buffer
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(Stopped):
        feed.batch(torch.tensor([2]), plan, stop)
    feed.reset(torch.device("cpu"))
    assert feed.batch(torch.tensor([2]), plan).labels.tolist() == [int(s.labels[2])]


def test_an_epoch_stopped_early_does_not_starve_the_next(prepared: Path) -> None:
    cfg = DataConfig(backend="torch", path=str(prepared), batch_size=4, res=16, decode="device", workers=0)
    loader = build_loader(cfg, "train", ctx())
    for e in range(3):
        loader.set_epoch(e)
        it = iter(loader)
        next(it)
        it.close()
    loader.set_epoch(3)
    assert sum(len(y) for _, y in loader) == len(loader) * 4
    assert not [t for t in threading.enumerate() if t.name in ("fastcd-feed", "fastcd-decode")]


def test_a_new_epoch_stops_an_unfinished_one_before_reusing_the_buffers(prepared: Path) -> None:
    """An iterator of an earlier epoch still held (not closed) when the next epoch starts: its threads are
    stopped first, so no two batches ever share a buffer and every batch of the new epoch is right."""
    cfg = DataConfig(backend="torch", path=str(prepared), batch_size=4, res=16, decode="device", workers=0)
    loader = build_loader(cfg, "train", ctx())
    loader.set_epoch(0)
    held = iter(loader)
    next(held)  # kept alive, unfinished
    loader.set_epoch(1)
    want = [loader.samples.labels[b.numpy()].tolist() for b in loader.batch_indices()]
    assert [y.tolist() for _, y in loader] == want
    assert not [t for t in threading.enumerate() if t.name in ("fastcd-feed", "fastcd-decode")]


def test_staged_passes_errors_and_stops_its_source() -> None:
    closed = threading.Event()

    def source():
        try:
            yield from range(100)
        finally:
            closed.set()

    def make(item: int, stop: threading.Event) -> int:
        if item == 5:
            raise ValueError("item 5 is bad")
        return item * 2

    got = []
    with pytest.raises(ValueError, match="item 5 is bad"):
        for x in staged(source(), make, 2, torch.device("cpu"), "test-stage"):
            got.append(x)
    assert got == [0, 2, 4, 6, 8] and closed.wait(5)
