"""The teacher-target cache: written once (resumably) by `fastcd cache-teacher`, read by `teacher.cache`; CD
from an fp32 cache trains exactly as from the live teacher; a cache that does not match the run is refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import fastcd.cache.write as cache_write
from fastcd.cache.store import CacheReader
from fastcd.cli import main
from fastcd.config import config_from_dict
from fastcd.data import build_loader
from fastcd.engine.runtime import Runtime, loader_context
from fastcd.engine.trainer import train
from fastcd.errors import FastcdError
from fastcd.models import teacher_targets
from fastcd.models.teacher import build_teacher
from tests.conftest import tiny_dict

CE_CD = [{"loss_name": "CELoss"}, {"loss_name": "CDLoss", "loss_rate": 6}]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A trained tiny ResNet-34 (one epoch on the synthetic data): a teacher with real, loadable weights."""
    root = tmp_path_factory.mktemp("teacher")
    raw = tiny_dict(str(root / "run"))
    student = {k: v for k, v in raw["teacher"].items() if k != "weights"}
    raw.update(teacher=None, student=student, loss_list=[{"loss_name": "CELoss"}])
    raw["train"]["epochs"] = 1
    train(config_from_dict(raw))
    return str(root / "run" / "latest.pt")


def distill(tmp_path: Path, teacher: str, name: str, loss_list: list[dict], *overrides: str) -> Path:
    """A tiny CD run's config file (fp32, log every step) distilling from `teacher`; returns its path."""
    raw = tiny_dict(str(tmp_path / name))
    raw["teacher"]["weights"] = teacher
    raw["loss_list"] = loss_list
    raw["train"].update(amp="fp32", device="cpu", log_every=1, epochs=2)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config_from_dict(raw, list(overrides)).to_dict()))
    return path


def step_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


def test_cd_from_an_fp32_cache_trains_as_from_the_live_teacher(tmp_path: Path, teacher: str) -> None:
    live = distill(tmp_path, teacher, "live", CE_CD)
    cache = tmp_path / "cache"
    assert main(["cache-teacher", str(live), "--dtype", "fp32", "--out", str(cache)]) == 0
    cached = distill(tmp_path, teacher, "cached", CE_CD, f"teacher.cache={cache}")
    train(config_from_dict(yaml.safe_load(live.read_text())))
    train(config_from_dict(yaml.safe_load(cached.read_text())))
    a, b = step_records(tmp_path / "live"), step_records(tmp_path / "cached")
    assert len(a) == len(b) == 2 * 8
    for ra, rb in zip(a, b, strict=True):  # every step's CD term, to fp32 rounding
        assert rb["losses"][1] == pytest.approx(ra["losses"][1], rel=1e-5)
    wa = torch.load(tmp_path / "live" / "latest.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "cached" / "latest.pt", weights_only=True)["model"]
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["epochs_done"] == [0, 1] and manifest["contents"]["logits"] == "none"


def test_kd_gkd_and_rkd_read_their_targets_from_the_cache(tmp_path: Path, teacher: str) -> None:
    losses = [{"loss_name": "CELoss"}, {"loss_name": "KDLossv2", "T": 2}, {"loss_name": "CDLoss", "loss_rate": 6},
              {"loss_name": "RKDLoss"}]
    cfg_path = distill(tmp_path, teacher, "src", losses)
    for logits in ("full", "topk=2"):
        cache = tmp_path / f"cache-{logits}"
        assert main(["cache-teacher", str(cfg_path), "--logits", logits, "--out", str(cache)]) == 0
        cfg = config_from_dict(yaml.safe_load(cfg_path.read_text()),
                               [f"teacher.cache={cache}", f"train.out_dir={tmp_path / logits}"])
        history = train(cfg)
        assert all(np.isfinite(r["losses"]).all() for r in history) and history[-1]["losses"][1] > 0
    rows = np.load(tmp_path / "cache-topk=2" / "epoch-0000" / "topk_indices.npy")
    assert rows.shape == (256, 2) and rows.dtype == np.int16


def test_a_cache_that_does_not_match_the_run_is_refused(tmp_path: Path, teacher: str) -> None:
    src = distill(tmp_path, teacher, "src", CE_CD)
    cache = tmp_path / "cache"
    assert main(["cache-teacher", str(src), "--out", str(cache)]) == 0
    base = yaml.safe_load(src.read_text())
    other_teacher = tmp_path / "other.pt"
    ckpt = torch.load(teacher, weights_only=True)
    ckpt["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, other_teacher)
    cases = {
        "seed": ["train.seed=4"],
        "weights_sha256": [f"teacher.weights={other_teacher}"],
        "resolutions": ["data.res=12"],
        "fingerprint": ["data.train_subset=200"],
        "scale_min": ["data.scale_min=0.3"],
        "holds 2 epochs of crops": ["train.epochs=3"],
        "holds no logits": ["loss_list.1.loss_name=KDLoss", "loss_list.1.loss_type=kd_family"],
        "holds no pooled embedding,": ["loss_list.1.loss_name=RKDLoss"],
    }
    for message, overrides in cases.items():
        cfg = config_from_dict(base, [f"teacher.cache={cache}", f"train.out_dir={tmp_path / 'x'}", *overrides])
        with pytest.raises(FastcdError, match=message):
            train(cfg, force=True)
    cycled = config_from_dict(base, [f"teacher.cache={cache}", "train.epochs=3", "teacher.cache_reuse=cycle",
                                     f"train.out_dir={tmp_path / 'cycle'}"])
    assert len(train(cycled)) == 3
    with pytest.raises(FastcdError, match="whole stage maps"):
        config_from_dict(base, [f"teacher.cache={cache}", "loss_list.1.loss_name=ATLoss"])
    with pytest.raises(FastcdError, match="bn_mode=eval"):
        config_from_dict(base, [f"teacher.cache={cache}", "teacher.bn_mode=train"])
    with pytest.raises(FastcdError, match="no manifest.json"):
        train(config_from_dict(base, [f"teacher.cache={tmp_path / 'nowhere'}", f"train.out_dir={tmp_path / 'y'}"]))


def test_each_rank_reads_the_targets_of_its_own_crops(tmp_path: Path, teacher: str) -> None:
    """Under torchrun each rank's loader yields a disjoint share of an epoch's samples; what that rank reads from
    a cache written in one process are the teacher's targets on exactly the crops the rank decodes."""
    src = distill(tmp_path, teacher, "src", CE_CD)
    cache = tmp_path / "cache"
    assert main(["cache-teacher", str(src), "--dtype", "fp32", "--out", str(cache)]) == 0
    cfg = config_from_dict(yaml.safe_load(src.read_text()))
    reader, cpu = CacheReader(cache), torch.device("cpu")
    live = build_teacher(cfg.teacher, cpu, channels_last=False)
    shares = []
    for rank in (0, 1):
        loader = build_loader(cfg.data, "train", loader_context(cfg, Runtime(cpu, rank, rank, world_size=2)))
        loader.set_epoch(1)
        indices = loader.batch_indices()
        shares.append(set(torch.cat(indices).tolist()))
        for (images, _), stored in zip(loader, reader.batches(1, indices, cpu), strict=True):
            live_means = teacher_targets(live, images, means=True, feats=False).means
            for got, want in zip(stored.means, live_means, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # batch composition differs
    assert shares[0] and len(shares[0]) == len(shares[1]) and not shares[0] & shares[1]


def test_an_interrupted_cache_write_resumes_to_the_same_files(tmp_path: Path, teacher: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    src = distill(tmp_path, teacher, "src", CE_CD)
    clean = tmp_path / "clean"
    assert main(["cache-teacher", str(src), "--out", str(clean)]) == 0
    monkeypatch.setattr(cache_write, "FLUSH_EVERY", 2)
    calls = {"n": 0}
    real_write = cache_write.EpochWriter.write

    def dying_write(self, indices, rows):
        calls["n"] += 1
        if calls["n"] == 12:  # epoch 2, batch 4: epoch 1 finished, two flushes of epoch 2 on disk
            raise KeyboardInterrupt
        real_write(self, indices, rows)

    monkeypatch.setattr(cache_write.EpochWriter, "write", dying_write)
    resumed = tmp_path / "resumed"
    assert main(["cache-teacher", str(src), "--out", str(resumed)]) == 130
    assert json.loads((resumed / "manifest.json").read_text())["epochs_done"] == [0]
    assert json.loads((resumed / "epoch-0001.partial" / "progress.json").read_text())["batches_done"] == 2
    monkeypatch.setattr(cache_write.EpochWriter, "write", real_write)
    assert main(["cache-teacher", str(src), "--out", str(resumed)]) == 0
    for epoch in ("epoch-0000", "epoch-0001"):
        assert np.array_equal(np.load(resumed / epoch / "means.npy"), np.load(clean / epoch / "means.npy"))
    assert not list(resumed.glob("*.partial"))
    other = ["--set", "train.seed=9"]
    assert main(["cache-teacher", str(src), "--out", str(resumed), *other]) == 2  # another config: refused


def test_backends_that_cannot_replay_crops_are_refused(tmp_path: Path, teacher: str) -> None:
    from fastcd.data.base import BatchLoader

    class Opaque(BatchLoader):
        """A backend with crops of its own (as ffcv's and imagefolder's)."""

        def __len__(self) -> int:
            return 0

        def set_epoch(self, epoch: int) -> None:
            pass

        def __iter__(self):
            return iter(())

    with pytest.raises(FastcdError, match="cannot be used with a teacher cache"):
        Opaque().fingerprint()
