"""data_prep: bad files, both formats read back, resume after a kill, flat validation, verify, Fashion-MNIST."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageFile

from fastcd.cli import main
from fastcd.data_prep import prepare as prepare_module
from fastcd.data_prep.labels import read_labels
from fastcd.data_prep.manifest import FORMAT_VERSION, load_manifest
from fastcd.data_prep.normalise import normalise_bytes, normalise_file
from fastcd.data_prep.outdir import claimed
from fastcd.data_prep.pool import Lost, WorkerPool
from fastcd.data_prep.prepare import prepare
from fastcd.data_prep.shards import ShardWriter
from fastcd.data_prep.verify import verify
from fastcd.errors import FastcdError
from tests.prepare_fixtures import (
    BAD_FILES,
    doubled_unless_poisoned,
    huge_jpeg,
    jpeg_bytes,
    make_tree,
    random_image,
    write_bad_files,
)

MAX_SIDE = 96
SHARD = 7
OPTIONS = {"max_side": MAX_SIDE, "shard_samples": SHARD, "progress": False}


def tar_samples(path: Path) -> list[tuple[str, bytes, int]]:
    """(key, jpeg bytes, label) of each sample of a shard, read with Python's tarfile."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    assert [n.rsplit(".", 1)[1] for n, _ in members] == ["jpg", "cls"] * (len(members) // 2)
    return [(j[0][:-4], j[1], int(c[1])) for j, c in zip(members[::2], members[1::2])]


def split_samples(out: Path, manifest: dict, split: str) -> list[tuple[str, bytes, int]]:
    return [s for shard in manifest["splits"][split]["shards"] for s in tar_samples(out / shard["tar"])]


def dali_read_all(out: Path, shards: list[dict], n: int):
    """All n samples of `shards` through DALI's webdataset reader (with our index) and CPU decoder."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=[str(out / s["tar"]) for s in shards], ext=["jpg", "cls"],
                                         index_paths=[str(out / s["index"]) for s in shards], name="reader")
        return fn.decoders.image(jpg, device="cpu"), cls

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == n
    return p.run()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A random tree with every kind of bad file in its first training class, prepared once (2 workers)."""
    rng = np.random.default_rng()
    root = tmp_path_factory.mktemp("prepare")
    classes = sorted({f"n{rng.integers(10**8):08d}" for _ in range(3)})
    expected = make_tree(root / "src", rng, classes, per_class=8, max_side=MAX_SIDE)
    write_bad_files(root / "src" / "train" / classes[0], rng, huge_jpeg())
    names = sorted(p.name for p in (root / "src" / "train" / classes[0]).iterdir())
    good_train = [x for x in expected["train"] if not x[0].startswith(f"train/{classes[0]}/")]
    expected["train"] = [(f"train/{classes[0]}/{n}", 0) for n in names
                         if BAD_FILES.get(n, ("",))[0] != "skipped"] + good_train
    manifest = prepare(root / "src", root / "out", workers=2, **OPTIONS)
    return SimpleNamespace(src=root / "src", out=root / "out", manifest=manifest, classes=classes,
                           expected=expected, bad_dir=f"train/{classes[0]}")


def test_bad_files_repaired_or_skipped(dataset):
    train = dataset.manifest["splits"]["train"]
    skipped = {Path(s["path"]).name: s["reason"] for s in train["skipped"]}
    repaired = {Path(s["path"]).name: s["action"] for s in train["repaired"]}
    for name, (outcome, text) in BAD_FILES.items():
        listed = skipped if outcome == "skipped" else repaired
        assert text in listed.get(name, ""), (name, skipped, repaired)
    assert set(skipped) | set(repaired) == set(BAD_FILES)
    assert all(s["path"].startswith(dataset.bad_dir) for s in train["skipped"] + train["repaired"])
    for split in ("train", "val"):
        assert dataset.manifest["splits"][split]["num_samples"] == len(dataset.expected[split])
    assert dataset.manifest["classes"] == dataset.classes


def test_shards_hold_the_samples_in_order(dataset):
    for split in ("train", "val"):
        samples = split_samples(dataset.out, dataset.manifest, split)
        assert [k for k, _, _ in samples] == [f"{i:09d}" for i in range(len(dataset.expected[split]))]
        assert [lab for _, _, lab in samples] == [lab for _, lab in dataset.expected[split]]
        for (_, data, _), (rel, _) in zip(samples, dataset.expected[split]):
            img = Image.open(io.BytesIO(data))
            assert img.format == "JPEG" and img.mode == "RGB" and max(img.size) <= MAX_SIDE
            assert not img.info.get("progressive")
            source = (dataset.src / rel).read_bytes()
            if Path(rel).name not in BAD_FILES and max(Image.open(io.BytesIO(source)).size) <= MAX_SIDE:
                assert data == source  # passed through byte for byte
        exif = next(d for (_, d, _), (rel, _) in zip(samples, dataset.expected[split]) if rel.endswith("exif.JPEG")) \
            if split == "train" else None
        if exif is not None:
            assert Image.open(io.BytesIO(exif)).size == (60, 90)  # 90x60 with orientation 6: rotated


def test_index_equals_dali_wds2idx(dataset, tmp_path):
    tool = Path(sys.executable).with_name("wds2idx")
    shard = dataset.manifest["splits"]["train"]["shards"][0]
    subprocess.run([str(tool), str(dataset.out / shard["tar"]), str(tmp_path / "ref.idx")],
                   check=True, capture_output=True)
    assert (dataset.out / shard["index"]).read_text() == (tmp_path / "ref.idx").read_text()


def test_both_formats_read_back(dataset):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    for split in ("train", "val"):
        entry, labels = dataset.manifest["splits"][split], [lab for _, lab in dataset.expected[split]]
        n = entry["num_samples"]

        images, cls = dali_read_all(dataset.out, entry["shards"], n)
        assert [int(bytes(np.array(cls.at(i)))) for i in range(n)] == labels
        shapes = [Image.open(io.BytesIO(d)).size for _, d, _ in split_samples(dataset.out, dataset.manifest, split)]
        assert [np.array(images.at(i)).shape for i in range(n)] == [(h, w, 3) for w, h in shapes]

        loader = Loader(str(dataset.out / entry["beton"]), batch_size=n, num_workers=1,
                        order=OrderOption.SEQUENTIAL,
                        pipelines={"image": [CenterCropRGBImageDecoder((16, 16), 1.0)], "label": [IntDecoder()]})
        ffcv_images, ffcv_labels = next(iter(loader))
        assert ffcv_labels.reshape(-1).tolist() == labels and ffcv_images.shape == (n, 16, 16, 3)
    assert verify(dataset.out) == {s: len(v) for s, v in dataset.expected.items()}


def _same_outputs(a: Path, b: Path) -> None:
    """Shards, indexes and manifests byte-identical (but the workers option); betons with the same records."""
    from ffcv.reader import Reader

    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        if rel.suffix in (".tar", ".idx"):
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
        elif rel.suffix == ".beton":
            meta_a, meta_b = Reader(str(a / rel)).metadata, Reader(str(b / rel)).metadata
            for field in ("mode", "width", "height"):
                assert np.array_equal(meta_a["f0"][field], meta_b["f0"][field])
            assert np.array_equal(meta_a["f1"], meta_b["f1"])
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    ma["options"].pop("workers"), mb["options"].pop("workers")
    assert ma == mb


def test_killed_run_resumes_to_the_same_result(dataset, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastcd.cli", "prepare", str(dataset.src), str(out), "--workers", "1",
           "--max-side", str(MAX_SIDE), "--shard-samples", str(SHARD), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first, second = out / "train" / "shard-000000.tar", out / "train" / "shard-000001.tar"
    deadline = time.monotonic() + 60
    while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)  # shard 0 is finished (its record precedes shard 1), the rest is not
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "manifest.json").exists()
    stamp = (first.stat().st_ino, first.stat().st_mtime_ns)
    with pytest.raises(FastcdError, match="unfinished run"):
        prepare(dataset.src, out, workers=1, **{**OPTIONS, "max_side": MAX_SIDE + 1})
    prepare(dataset.src, out, workers=1, **OPTIONS)
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == stamp  # the finished shard was not redone
    _same_outputs(dataset.out, out)


def _stopped_at(src: Path, out: Path, monkeypatch, split: str, nth: int) -> None:
    """Run prepare into `out` and interrupt it as it begins the `nth` shard (1-based) of `split`."""
    calls, real_write_shard = [], prepare_module._write_shard

    def shard_then_stop(source, *args, **kwargs):
        calls.append(source.name)
        if calls.count(split) == nth:
            raise KeyboardInterrupt
        return real_write_shard(source, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(prepare_module, "_write_shard", shard_then_stop)
        with pytest.raises(KeyboardInterrupt):
            prepare(src, out, workers=1, **OPTIONS)


def test_interrupted_at_each_stage_resumes(dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_write_beton = prepare_module.write_beton

    def beton_then_stop(path, *args, **kwargs):
        real_write_beton(path, *args, **kwargs)
        raise KeyboardInterrupt  # the .beton is complete under its temporary name, not yet renamed

    _stopped_at(dataset.src, out, monkeypatch, "train", 3)
    monkeypatch.setattr(prepare_module, "write_beton", beton_then_stop)
    with pytest.raises(KeyboardInterrupt):
        prepare(dataset.src, out, workers=1, **OPTIONS)
    assert not (out / "manifest.json").exists() and not (out / "train.beton").exists()
    monkeypatch.setattr(prepare_module, "write_beton", real_write_beton)
    prepare(dataset.src, out, workers=1, **OPTIONS)
    _same_outputs(dataset.out, out)
    assert prepare(dataset.src, out, workers=1, **OPTIONS)["digest"] == dataset.manifest["digest"]


def test_records_of_an_older_layout_are_redone(dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _stopped_at(dataset.src, out, monkeypatch, "train", 3)
    plan = out / ".prepare" / "plan.json"
    plan.write_text(json.dumps({"digest": json.loads(plan.read_text())["digest"]}))  # as an older fastcd wrote it
    for record in (out / ".prepare" / "train").glob("*.json"):
        record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "classes"}))
    prepare(dataset.src, out, workers=1, **OPTIONS)
    _same_outputs(dataset.out, out)


def test_ffcv_only_leaves_no_shards(dataset, tmp_path):
    from ffcv.reader import Reader

    manifest = prepare(dataset.src, tmp_path, formats=["ffcv"], splits=["train"], limit=12, workers=1, **OPTIONS)
    train = manifest["splits"]["train"]
    first = sorted(p.name for p in (dataset.src / dataset.bad_dir).iterdir())[:12]
    kept = [0 for name in first if BAD_FILES.get(name, ("",))[0] != "skipped"]  # all in class 0
    assert train["shards"] == [] and train["num_samples"] == len(kept) < 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "train.beton"]
    assert Reader(str(tmp_path / "train.beton")).metadata["f1"].tolist() == kept
    assert verify(tmp_path) == {"train": len(kept)}


@pytest.mark.parametrize("layout", ["csv", "loc", "flat_src"])
def test_flat_validation_with_labels(tmp_path, layout):
    rng = np.random.default_rng()
    classes = sorted({f"c{rng.integers(1000):03d}" for _ in range(3)})
    make_tree(tmp_path / "src", rng, classes, per_class=2, max_side=MAX_SIDE, splits=("train",))
    flat = tmp_path / "flat" if layout == "flat_src" else tmp_path / "src" / "val"
    flat.mkdir()
    names = sorted(f"ILSVRC2012_val_{i:08d}.JPEG" for i in rng.choice(10**6, 6, replace=False))
    truth = {n: classes[int(rng.integers(len(classes)))] for n in names}
    for n in names + ["unlabelled.JPEG"]:
        (flat / n).write_bytes(jpeg_bytes(random_image(rng, 40, 30)))
    rows = ["ImageId,PredictionString"] + [f"{Path(n).stem},{c} 1 2 30 40 {c} 3 4 5 6" for n, c in truth.items()] \
        if layout == "loc" else ["file,class"] + [f"{n},{c}" for n, c in truth.items()]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows[:1] + rows[1:][::-1]) + "\n")
    src = flat if layout == "flat_src" else tmp_path / "src"
    manifest = prepare(src, tmp_path / "out", labels=labels, formats=["dali"], workers=1, **OPTIONS)
    val = manifest["splits"]["val"]
    used_classes = sorted(set(truth.values())) if layout == "flat_src" else classes
    assert manifest["classes"] == used_classes
    assert [lab for _, _, lab in split_samples(tmp_path / "out", manifest, "val")] == \
        [used_classes.index(truth[n]) for n in names]
    assert [s["path"].rsplit("/", 1)[-1] for s in val["skipped"]] == ["unlabelled.JPEG"]


def _mode_file(mode: str) -> bytes | None:
    """A 256x16 horizontal ramp, black to white, stored in Pillow mode `mode` as PNG or TIFF (None when
    Pillow writes neither). 16-bit and I ramps span 0..65535, F ramps 0..1, the others 0..255."""
    ramp = np.tile(np.linspace(0, 1, 256), (16, 1))
    if mode.startswith("I;16"):
        img = Image.frombytes(mode, (256, 16), np.rint(ramp * 65535).astype(">u2" if mode == "I;16B" else "<u2")
                              .tobytes())
    elif mode in ("I", "F"):
        img = Image.fromarray(np.rint(ramp * 65535).astype(np.int32) if mode == "I" else ramp.astype(np.float32))
    else:
        img = Image.fromarray(np.rint(ramp * 255).astype(np.uint8)).convert("RGB").convert(mode)
    for fmt in ("PNG", "TIFF"):
        buf = io.BytesIO()
        try:
            img.save(buf, format=fmt)
        except (OSError, KeyError):
            continue
        return buf.getvalue()
    return None


@pytest.mark.parametrize("mode", [m for m in sorted(Image.MODES) if _mode_file(m) is not None])
def test_every_mode_comes_out_scaled(mode):
    result = normalise_bytes(_mode_file(mode), "ramp.tif", MAX_SIDE * 4, 95)
    assert result.jpeg is not None, result.note
    grey = np.asarray(Image.open(io.BytesIO(result.jpeg)).convert("L"), dtype=np.float64)
    profile = grey.mean(0).reshape(16, 16).mean(1)  # 16 column blocks, dark to light
    assert np.abs(profile - np.linspace(0, 255, 256).reshape(16, 16).mean(1)).max() < 6, (mode, profile)


@pytest.mark.parametrize("mode,values,reason", [("I", [-5, 70000], "outside 0..65535"),
                                                ("F", [0.0, 255.0], "outside 0..1.0"),
                                                ("F", [0.0, np.nan], "no known scale")])
def test_values_without_a_scale_are_skipped(mode, values, reason):
    buf = io.BytesIO()
    Image.fromarray(np.array([values] * 4, dtype=np.int32 if mode == "I" else np.float32)).save(buf, format="TIFF")
    result = normalise_bytes(buf.getvalue(), "x.tif", MAX_SIDE, 90)
    assert result.jpeg is None and reason in result.note


def test_decoder_exceptions_skip_the_file(monkeypatch):
    good = jpeg_bytes(random_image(np.random.default_rng(), 90, 60))
    assert "OSError: Truncated File Read" in normalise_bytes(good[:300], "cut.JPEG", MAX_SIDE, 90).note

    def broken_decoder(self):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken_decoder)
    assert normalise_bytes(good, "x.JPEG", MAX_SIDE, 90).note == \
        "truncated or corrupt image data (error: unpack requires a buffer of 4 bytes)"


def test_animated_images_say_which_frame_is_kept():
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    result = normalise_bytes(buf.getvalue(), "anim.gif", MAX_SIDE, 90)
    assert result.outcome == "repaired" and "first of 3 frames kept" in result.note
    assert np.asarray(Image.open(io.BytesIO(result.jpeg)))[15, 20].tolist()[0] > 200  # the first, red frame


def test_labels_file_must_be_a_regular_file(small_tree):
    os.mkfifo(small_tree.parent / "labels.fifo")
    with pytest.raises(FastcdError, match="labels.fifo does not exist or is not a regular file"):
        prepare(small_tree, small_tree.parent / "out", labels=small_tree.parent / "labels.fifo", **OPTIONS)


def test_non_regular_files_are_never_opened(tmp_path):
    os.mkfifo(tmp_path / "fifo.JPEG")
    (tmp_path / "loop.JPEG").symlink_to(tmp_path / "loop.JPEG")
    (tmp_path / "dev.JPEG").symlink_to("/dev/zero")
    reasons = {}

    def read_all():  # in a thread: opening the FIFO for reading would block until a writer came
        reasons.update((n, normalise_file(str(tmp_path / n), MAX_SIDE, 90).note)
                       for n in ("fifo.JPEG", "loop.JPEG", "dev.JPEG"))

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert reasons == {"fifo.JPEG": "not a regular file (a FIFO)",
                       "loop.JPEG": "cannot read file (Too many levels of symbolic links)",
                       "dev.JPEG": "not a regular file (a character device)"}


def test_worker_pool_survives_a_dying_or_stuck_worker():
    with WorkerPool(doubled_unless_poisoned, workers=2, item_seconds=1, chunksize=4) as pool:
        start = time.monotonic()
        got = list(pool.map(range(12)))
        assert time.monotonic() - start < 30
        assert got[3] == Lost("the worker decoding it killed by SIGKILL")
        assert got[5] == Lost("the worker decoding it took more than 1 s")
        assert got[7] == Lost("ValueError: seven")
        assert [g for i, g in enumerate(got) if i not in (3, 5, 7)] == [2 * i for i in range(12) if i not in (3, 5, 7)]
        abandoned = pool.map(range(100, 200))
        assert next(abandoned) == 200
        abandoned.close()
        assert list(pool.map([1, 2])) == [2, 4]  # nothing left over from the abandoned map


def test_worker_pool_sends_nothing_to_a_worker_that_died_between_maps():
    """A worker killed while idle: the next map's send finds its pipe closed, replaces it and loses no item (it
    used to end in BrokenPipeError)."""
    with WorkerPool(doubled_unless_poisoned, workers=2, item_seconds=5, chunksize=2) as pool:
        assert list(pool.map([1, 2])) == [2, 4]
        for w in pool._pool:
            w.proc.kill()
            w.proc.join()
        assert list(pool.map([0, 1, 2, 4, 6, 8])) == [0, 2, 4, 8, 12, 16]


def test_odd_trees_are_reported(tmp_path, capsys):
    rng = np.random.default_rng()
    src, good = tmp_path / "src", jpeg_bytes(random_image(rng, 40, 30))
    make_tree(src, rng, ["a", "b"], per_class=2, max_side=MAX_SIDE)
    (src / "train" / "a" / "extra").mkdir()
    (src / "train" / "a" / "extra" / "nested.JPEG").write_bytes(good)
    (src / "train" / "stray.JPEG").write_bytes(good)
    (src / "train" / os.fsdecode(b"odd\xffname.JPEG")).write_bytes(good)
    (src / "train" / "c").mkdir()
    (src / "train" / "c" / "broken.JPEG").write_bytes(good[:100])
    (src / "train" / "b" / os.fsdecode(b"caf\xe9.JPEG")).write_bytes(good)  # Latin-1 name, not UTF-8
    assert main(["prepare", str(src), str(tmp_path / "out"), "--formats", "dali", "--workers", "1",
                 "--max-side", str(MAX_SIDE)]) == 0
    err = capsys.readouterr().err
    train, val = (load_manifest(tmp_path / "out")["splits"][s] for s in ("train", "val"))
    assert {s["path"]: s["reason"].split(" (")[0] for s in train["skipped"]} == {
        "train/stray.JPEG": "not inside a class folder", "train/odd\\xffname.JPEG": "not inside a class folder",
        "train/a/extra/": "a folder inside a class folder", "train/c/broken.JPEG": "truncated or corrupt image data"}
    assert train["num_samples"] == 5  # a's 2, b's 2 and b's Latin-1 name
    assert train["empty_classes"] == ["c"] and val["empty_classes"] == ["c"]
    assert "train: skipped 4 file(s) or folder(s)" in err and "train: no usable image in 1 class(es): c;" in err
    assert "train: 5 samples" in err and "no usable image in 1 class(es)\n" in err  # the summary says so too


def test_split_without_a_usable_image_fails_cleanly(tmp_path):
    rng = np.random.default_rng()
    make_tree(tmp_path / "src", rng, ["a"], per_class=2, max_side=MAX_SIDE, splits=("train",))
    (tmp_path / "src" / "val" / "a").mkdir(parents=True)
    (tmp_path / "src" / "val" / "a" / "empty.JPEG").write_bytes(b"")
    with pytest.raises(FastcdError, match=r"split val has no usable image \(1 file\(s\) skipped; the first "
                                          r"skipped: val/a/empty.JPEG \(zero-byte file\)\)"):
        prepare(tmp_path / "src", tmp_path / "out", workers=1, **OPTIONS)


@pytest.fixture
def small_tree(tmp_path) -> Path:
    """Two classes of 2 train and 2 val JPEGs."""
    make_tree(tmp_path / "src", np.random.default_rng(), ["a", "b"], per_class=2, max_side=MAX_SIDE)
    return tmp_path / "src"


@pytest.mark.parametrize("case,message", [
    ("out_is_src", "is inside SRC"), ("out_in_src", "is inside SRC"), ("src_in_out_split", "which prepare writes into"),
    ("out_is_file", "is a file; give a folder"), ("out_under_file", "cannot create OUT .* \\(Not a directory\\)"),
    ("out_unwritable", "cannot write in OUT /sys"), ("limit_0", "--limit 0: must be at least 1"),
    ("limit_negative", "--limit -3: must be at least 1"), ("max_side_huge", "--max-side 70000: must be in 16..65500")])
def test_bad_out_and_arguments_give_one_line_errors(small_tree, case, message, capsys):
    tmp = small_tree.parent
    (tmp / "file").write_text("x")
    if case == "src_in_out_split":
        shutil.copytree(small_tree, tmp / "o" / "train")
    src, out, extra = {"out_is_src": (small_tree, small_tree, []), "out_in_src": (small_tree, small_tree / "o", []),
                       "src_in_out_split": (tmp / "o" / "train", tmp / "o", []),
                       "out_is_file": (small_tree, tmp / "file", []),
                       "out_under_file": (small_tree, tmp / "file" / "o", []),
                       "out_unwritable": (small_tree, Path("/sys"), []),
                       "limit_0": (small_tree, tmp / "o", ["--limit", "0"]),
                       "limit_negative": (small_tree, tmp / "o", ["--limit", "-3"]),
                       "max_side_huge": (small_tree, tmp / "o", ["--max-side", "70000"])}[case]
    assert main(["prepare", str(src), str(out), "--workers", "1", "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in small_tree.rglob("*") if p.is_file() and "img_" not in p.name) == []


def test_empty_name_lists_are_refused(small_tree, capsys):
    with pytest.raises(SystemExit):
        main(["prepare", str(small_tree), str(small_tree.parent / "o"), "--splits", ","])
    assert "--splits: give at least one name" in capsys.readouterr().err


def test_second_prepare_into_one_out_is_refused(small_tree, capsys):
    out = small_tree.parent / "out"
    with claimed(out, str(small_tree), ["train", "val"]):
        assert main(["prepare", str(small_tree), str(out), "--workers", "1", "--quiet"]) == 2
        assert f"{out} is being written by another `fastcd prepare` (pid {os.getpid()} on " in capsys.readouterr().err
    (out / ".prepare.lock").write_text("pid 1 on a host where it was killed\n")  # a killed run's lock file
    prepare(small_tree, out, workers=1, **OPTIONS)
    assert not (out / ".prepare.lock").exists()


def test_disk_errors_stop_cleanly_and_resume(small_tree, monkeypatch, capsys):
    out = small_tree.parent / "out"

    def disk_full(self, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(ShardWriter, "_write", disk_full)
        assert main(["prepare", str(small_tree), str(out), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"prepare into {out} stopped: No space left on device; fix that and run the same command" in err
    assert main(["prepare", str(small_tree), str(out), "--workers", "1", "--quiet"]) == 0
    assert verify(out) == {"train": 4, "val": 4}


def test_unreadable_folders(small_tree, monkeypatch):
    real_scandir = os.scandir

    def scandir(path):
        if not isinstance(path, int) and Path(path).name in ("b", "locked"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    train = prepare(small_tree, small_tree.parent / "out", formats=["dali"], workers=1, **OPTIONS)["splits"]["train"]
    assert train["skipped"] == [{"path": "train/b/", "reason": "cannot list the folder (Permission denied)"}]
    assert train["empty_classes"] == ["b"] and train["num_samples"] == 2
    (small_tree.parent / "locked").mkdir()
    with pytest.raises(FastcdError, match="cannot list .*locked \\(Permission denied\\); SRC must be readable"):
        prepare(small_tree.parent / "locked", small_tree.parent / "out2", workers=1, **OPTIONS)


def test_a_bad_entry_costs_that_entry_only(small_tree):
    """A symlink loop in a class folder (or in a split folder) is skipped by name; its class keeps every good
    image."""
    (small_tree / "train" / "a" / "loop.JPEG").symlink_to(small_tree / "train" / "a" / "loop.JPEG")
    (small_tree / "train" / "ring").symlink_to(small_tree / "train" / "ring")
    train = prepare(small_tree, small_tree.parent / "out", formats=["dali"], workers=1, **OPTIONS)["splits"]["train"]
    assert train["num_samples"] == 4 and not train.get("empty_classes")
    assert {s["path"]: s["reason"] for s in train["skipped"]} == {
        "train/a/loop.JPEG": "cannot be read (Too many levels of symbolic links)",
        "train/ring": "cannot be read (Too many levels of symbolic links)"}


def test_changed_pixels_are_found_only_with_rehash(small_tree, tmp_path, capsys):
    """A rerun compares file names, labels and options, and says so; `--rehash` re-reads SRC, finds a file whose
    pixels changed (same name, same label) and rebuilds its split from the new pixels."""
    out = tmp_path / "out"
    first = prepare(small_tree, out, formats=["dali"], workers=1, progress=False)
    changed = small_tree / "train" / "a" / sorted(os.listdir(small_tree / "train" / "a"))[0]
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(changed, format="JPEG")
    assert prepare(small_tree, out, formats=["dali"], workers=1) == first
    assert "not the files' contents: --rehash re-reads them" in capsys.readouterr().out
    assert main(["prepare", str(small_tree), str(out), "--formats", "dali", "--workers", "1", "--rehash"]) == 0
    assert "split(s) train changed since they were prepared" in capsys.readouterr().err
    rebuilt = load_manifest(out)
    assert rebuilt["splits"]["val"]["source_sha256"] == first["splits"]["val"]["source_sha256"]
    assert rebuilt["splits"]["train"]["source_sha256"] != first["splits"]["train"]["source_sha256"]
    new_pixels = np.asarray(Image.open(io.BytesIO(split_samples(out, rebuilt, "train")[0][1])))
    assert abs(int(new_pixels.mean()) - 200) <= 2
    assert prepare(small_tree, out, formats=["dali"], workers=1, rehash=True) == rebuilt
    assert "re-hashed and unchanged" in capsys.readouterr().out


def test_labels_file_layouts(tmp_path):
    path = tmp_path / "val.txt"
    path.write_text("ILSVRC2012_val_00000001.JPEG 2\nILSVRC2012_val_00000002.JPEG 0\n")
    got = read_labels(path, ["a", "b", "c"])
    assert got["ILSVRC2012_val_00000001.JPEG"] == "c" and got["ILSVRC2012_val_00000002"] == "a"
    path.write_text("ILSVRC2012_val_00000001.JPEG\n")
    with pytest.raises(FastcdError, match="file name, class name"):
        read_labels(path)


def test_strict_fails_naming_unreadable_files(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["prepare", str(dataset.src), str(out), "--strict", "--formats", "dali", "--workers", "1",
                 "--max-side", str(MAX_SIDE), "--quiet"])
    err = capsys.readouterr().err
    unreadable = sum(outcome == "skipped" for outcome, _ in BAD_FILES.values())
    assert code == 2 and f"--strict: {unreadable} unreadable" in err and "cut-in-header.JPEG" in err
    assert "empty.JPEG" in err and "fifo.JPEG (not a regular file" in err
    assert not (out / "manifest.json").exists()


def _flip(path: Path, offset: int, count: int = 1) -> None:
    """Invert `count` bytes of `path` from `offset` (the size stays the same)."""
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _verify_error(out: Path, capsys) -> str:
    assert main(["prepare", "--verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_verify_finds_damage(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(dataset.out, out)
    assert main(["prepare", "--verify", str(out)]) == 0
    val = dataset.manifest["splits"]["val"]
    _flip(out / val["shards"][-1]["tar"], 700)
    assert "sha256 differs" in _verify_error(out, capsys)
    shutil.copy(dataset.out / val["shards"][-1]["tar"], out / val["shards"][-1]["tar"])

    beton, good = out / "train.beton", (dataset.out / "train.beton").read_bytes()
    _flip(beton, len(good) // 2, 16)
    assert "train.beton: sha256 differs from the manifest" in _verify_error(out, capsys)
    beton.write_bytes(good[: len(good) - 100])
    assert f"train.beton is {len(good) - 100} bytes, manifest.json says {len(good)}" in _verify_error(out, capsys)

    beton.write_bytes(bytes(100) + good[100:])  # a manifest that vouches for a file ffcv cannot read
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"]["beton_sha256"] = hashlib.sha256(beton.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert "train.beton: cannot be read (AssertionError: file format mismatch" in _verify_error(out, capsys)

    (out / dataset.manifest["splits"]["train"]["shards"][0]["index"]).unlink()
    with pytest.raises(FastcdError, match="missing"):
        load_manifest(out)


def test_resume_redoes_outputs_damaged_between_runs(dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _stopped_at(dataset.src, out, monkeypatch, "val", 1)  # train finished (shards and .beton), val not begun
    train = out / "train"
    _flip(train / "shard-000000.tar", 1000)
    _flip(train / "shard-000001.idx", 5)
    _flip(out / "train.beton", (out / "train.beton").stat().st_size // 2, 16)
    prepare(dataset.src, out, workers=1, **OPTIONS)
    _same_outputs(dataset.out, out)
    assert verify(out) == {s: len(v) for s, v in dataset.expected.items()}


@pytest.mark.parametrize("damage", ["truncated_shard", "older_manifest"])
def test_finished_out_with_missing_bytes_is_rebuilt(dataset, tmp_path, damage):
    out = tmp_path / "out"
    shutil.copytree(dataset.out, out)
    if damage == "truncated_shard":
        shard = out / dataset.manifest["splits"]["val"]["shards"][-1]["tar"]
        shard.write_bytes(shard.read_bytes()[:-1024])
    else:
        manifest = json.loads((out / "manifest.json").read_text())
        for split in manifest["splits"].values():
            split.pop("beton_sha256"), split.pop("beton_bytes")
        (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    prepare(dataset.src, out, workers=1, **OPTIONS)
    _same_outputs(dataset.out, out)
    assert verify(out) == {s: len(v) for s, v in dataset.expected.items()}


def test_quiet_shows_no_progress_bars(small_tree, capsys):
    out = small_tree.parent / "out"
    assert main(["prepare", str(small_tree), str(out), "--workers", "1", "--quiet"]) == 0
    assert capsys.readouterr() == (f"wrote {out}/manifest.json\n", "")


def test_load_manifest_rejects_other_versions(dataset, tmp_path):
    with pytest.raises(FastcdError, match="fastcd prepare"):
        load_manifest(tmp_path)
    manifest = dict(dataset.manifest, format_version=FORMAT_VERSION + 1)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FastcdError, match=f"format_version {FORMAT_VERSION + 1}.*re-run"):
        load_manifest(tmp_path)


def _check_fashion_mnist(out: Path, manifest: dict, split: str) -> None:
    from fastcd.data.fashion_mnist import FASHION_MNIST_DIR, read_idx

    prefix = {"train": "train", "val": "t10k"}[split]
    images = read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    samples = split_samples(out, manifest, split)
    assert [lab for _, _, lab in samples] == labels.tolist()
    for i in np.random.default_rng().choice(len(samples), 20, replace=False):
        decoded = np.asarray(Image.open(io.BytesIO(samples[i][1])).convert("L"), dtype=np.float32)
        assert np.abs(decoded - images[i]).mean() < 6


def test_fashion_mnist_validation_split(tmp_path):
    manifest = prepare("fashion-mnist", tmp_path, splits=["val"], workers=2, shard_samples=4000, progress=False)
    assert manifest["splits"]["val"]["num_samples"] == 10000 and len(manifest["classes"]) == 10
    assert manifest["classes"][0] == "T-shirt/top" and manifest["splits"]["val"]["stats"]["encoded"] == 10000
    _check_fashion_mnist(tmp_path, manifest, "val")


@pytest.mark.slow
def test_fashion_mnist_end_to_end(tmp_path):
    assert main(["prepare", "fashion-mnist", str(tmp_path), "--quiet"]) == 0
    manifest = load_manifest(tmp_path)
    assert {s: v["num_samples"] for s, v in manifest["splits"].items()} == {"train": 60000, "val": 10000}
    for split in ("train", "val"):
        _check_fashion_mnist(tmp_path, manifest, split)
    assert verify(tmp_path) == {"train": 60000, "val": 10000}
