"""`fastcd repro fashion-mnist --vs-original` at a tiny size, the Fashion-MNIST JPEG tree, and the choice of
fastcd's path from the per-knob breakdown."""
import json

import numpy as np
import pytest
from PIL import Image

from fastcd.cli import main
from fastcd.data.fashion_mnist import FASHION_MNIST_DIR, load_split
from fastcd.data.fashion_mnist_jpeg import class_folders, write_jpeg_tree
from fastcd.errors import FastcdError
from fastcd.vs_original import FAST_DEFAULT, KNOBS, choose, fast_overrides, original_overrides
from tests.test_repro import TINY_ARGS


def test_jpeg_tree_holds_the_idx_images_in_label_order(tmp_path) -> None:
    import torchvision

    root = tmp_path / "jpeg"
    record = write_jpeg_tree(root, 200, 100)
    assert record["splits"] == {"train": 200, "val": 100}
    images, labels = load_split(FASHION_MNIST_DIR, "train")
    tree = torchvision.datasets.ImageFolder(str(root / "train"))
    assert tree.classes == class_folders() and tree.classes == sorted(tree.classes)
    assert sorted(label for _, label in tree.samples) == sorted(labels[:200].tolist())
    path, label = next((p, lab) for p, lab in tree.samples if p.endswith("/00007.jpg"))
    assert label == labels[7]
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.format == "JPEG" and not im.info.get("progressive")
        pixels = np.asarray(im)[:, :, 0].astype(int)
    assert np.abs(pixels - images[7].astype(int)).mean() < 3  # quality 95: close to the idx pixels


def test_jpeg_tree_is_kept_when_it_holds_the_same_and_refuses_a_foreign_folder(tmp_path) -> None:
    root = tmp_path / "jpeg"
    write_jpeg_tree(root, 100, 100)
    stamp = (root / "tree.json").stat().st_mtime_ns
    write_jpeg_tree(root, 100, 100)
    assert (root / "tree.json").stat().st_mtime_ns == stamp
    write_jpeg_tree(root, 120, 100)
    assert json.loads((root / "tree.json").read_text())["splits"]["train"] == 120
    assert sum(1 for _ in (root / "train").rglob("*.jpg")) == 120
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(FastcdError, match="not a Fashion-MNIST JPEG tree"):
        write_jpeg_tree(tmp_path / "other", 100, 100)


def test_original_and_fastcd_overrides_say_what_each_pipeline_runs(tmp_path) -> None:
    original = original_overrides(tmp_path / "jpeg", 2)
    for o in ("data.backend=imagefolder", "train.amp=fp32", "train.channels_last=false", "teacher.bn_mode=train",
              "teacher.fold_bn=false", "optim.fused=false", "loss_list.1.impl=eager", "loss_list.2.impl=eager"):
        assert o in original
    fast = fast_overrides(tmp_path / "prep", 2, *FAST_DEFAULT)
    assert f"data.path={tmp_path / 'prep'}" in fast and "data.backend=dali" in fast
    for o in ("teacher.bn_mode=eval", "teacher.fold_bn=true", "train.channels_last=true", "train.amp=bf16",
              "optim.fused=true"):
        assert o in fast  # each knob's value replaces the knob-off default
    keys = [o.split("=")[0] for o in fast]
    assert len(keys) == len(set(keys))
    assert "train.channels_last=false" in fast_overrides(tmp_path / "prep", 2, "torch", ["train.amp=bf16"])


def _ok(knob: str, img_s: float, vs: float, *, stalled: float = 1.0) -> dict:
    """A breakdown row; `stalled` < 1 scales its wall-clock figures as a stall would, not its median step."""
    return {"knob": knob, "status": "ok", "images_per_s": img_s * stalled, "vs_previous": vs * stalled,
            "images_per_s_median_step": img_s, "vs_previous_median_step": vs}


def test_choose_keeps_the_knobs_that_helped_and_the_fastest_prepared_loader() -> None:
    rows = [_ok("original", 100, 1.0), _ok("teacher BN eval", 90, 0.90), _ok("teacher BN folded", 99, 1.1),
            _ok("channels_last", 90, 0.91), _ok("autocast bf16", 135, 1.5),
            _ok("fused optimizer", 133, 0.98, stalled=0.42), _ok("loader torch", 140, 0.93, stalled=0.5),
            {"knob": "loader ffcv", "status": "failed", "reason": "x"}, _ok("loader dali", 170, 1.13)]
    c = choose(rows)
    assert c.backend == "dali"
    assert c.knobs == ["teacher.bn_mode=eval", "teacher.fold_bn=true", "train.amp=bf16", "optim.fused=true"]
    assert any("channels_last: 0.91x the row before (median step); left out" in r for r in c.reasons)
    assert any("teacher BN eval: 0.90x the row before (median step); kept" in r for r in c.reasons)
    # within the noise at the median step, though a stall made its wall-clock rate 0.41x
    assert any("fused optimizer: 0.98x the row before (median step); kept" in r for r in c.reasons)
    none_ran = choose([_ok("original", 100, 1.0)])
    assert none_ran.backend == FAST_DEFAULT[0] and len(none_ran.reasons) == 1 + len(KNOBS)


def test_choose_takes_the_fastest_backend_that_replays_fastcd_s_crops(monkeypatch: pytest.MonkeyPatch) -> None:
    """A faster backend with crops of its own ran but is not eligible, and the report says so; which backends
    replay the crops comes from `data.base.REPLAYS_CROPS`, not a name written here."""
    import fastcd.vs_original as vs
    from fastcd.data.base import REPLAYS_CROPS

    assert REPLAYS_CROPS[FAST_DEFAULT[0]]
    loaders = [_ok("loader torch", 600, 0.9), _ok("loader ffcv", 881, 1.3), _ok("loader dali", 875, 1.29)]
    monkeypatch.setattr(vs, "REPLAYS_CROPS", {**REPLAYS_CROPS, "ffcv": False})
    c = choose([_ok("original", 100, 1.0), *loaders])
    assert c.backend == "dali"
    assert c.reasons[0] == ("- loader: dali, the fastest backend that replays fastcd's crops (875 img/s at the median "
                            "step, 1.29x ImageFolder with the knobs above; torch 600 img/s; ffcv 881 img/s does not "
                            "replay them)")
    alone = choose([_ok("original", 100, 1.0), loaders[1]])
    assert alone.backend == FAST_DEFAULT[0]
    assert "no backend that replays fastcd's crops ran in the breakdown (ffcv 881 img/s" in alone.reasons[0]
    monkeypatch.setattr(vs, "REPLAYS_CROPS", {**REPLAYS_CROPS, "ffcv": True})
    every = choose(loaders)
    assert every.backend == "ffcv"
    assert ("(881 img/s at the median step, 1.30x ImageFolder with the knobs above; torch 600 img/s; dali 875 img/s)"
            in every.reasons[0])


def test_vs_original_trains_both_pipelines_per_seed_and_reports_the_ratio(tmp_path, capsys) -> None:
    pytest.importorskip("nvidia.dali")
    args = ["repro", "fashion-mnist", "--vs-original", "--seeds", "2", "--epochs", "1", "--teacher-epochs", "1",
            "--train-subset", "128", "--val-subset", "64", "--knob-steps", "0", "--out", str(tmp_path / "runs"),
            "--report-dir", str(tmp_path / "report")]
    assert main(args + TINY_ARGS) == 0
    (md,) = (tmp_path / "report").glob("vs-original-fashion-mnist-*.md")
    text = md.read_text()
    assert "| original | ImageFolder + PIL over JPEG" in text and "| fastcd | prepared shards + dali" in text
    assert "wall-clock per run: fastcd" in text and "goal at most 0.5x" in text and "within the seed spread" in text
    assert "teacher.bn_mode=train" in text and "data.backend=dali" in text
    (record,) = (tmp_path / "report").glob("*-vs-original.json")
    run = json.loads(record.read_text())[-1]
    assert run["rows"]["original"]["top1"] and len(run["rows"]["fastcd"]["seconds"]) == 2 and run["wall_ratio"] > 0
    for seed in (0, 1):
        for pipeline, backend in (("original", "imagefolder"), ("fastcd", "dali")):
            config = (tmp_path / "runs" / f"seed{seed}" / pipeline / "config.yaml").read_text()
            assert f"backend: {backend}" in config and f"seed: {seed}" in config
    assert (tmp_path / "runs" / "prepared" / "manifest.json").is_file()
    assert "report:" in capsys.readouterr().out


@pytest.mark.slow
def test_breakdown_measures_every_knob_and_loader_in_a_spawned_process(tmp_path) -> None:
    """The per-knob breakdown at a tiny size (ffcv's numba compilation makes it slow)."""
    from fastcd.data_prep.prepare import prepare
    from fastcd.vs_original import LOADERS, breakdown

    write_jpeg_tree(tmp_path / "jpeg", 256, 128)
    prepare(str(tmp_path / "jpeg"), str(tmp_path / "prep"), workers=1, progress=False)
    common = ["data.train_subset=256", "data.val_subset=128", "train.progress=false", *TINY_ARGS[1::2]]
    rows = breakdown(common, tmp_path / "jpeg", tmp_path / "prep", 1, 2)
    assert [r["knob"] for r in rows] == ["original", *(n for n, _ in KNOBS), *(f"loader {b}" for b in LOADERS)]
    assert all(r["status"] in ("ok", "failed") for r in rows) and rows[0]["status"] == "ok"
    assert choose(rows).backend in LOADERS
