"""The teacher-target cache: written once (resumably) by `fastcd cache-teacher`, read by `teacher.cache`; CD
from an fp32 cache trains exactly as from the live teacher; a cache that does not match the run is refused."""
from __future__ import annotations

import importlib.util
import json
import os
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
from tests.conftest import prepared_dict, tiny_dict

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


@pytest.mark.parametrize("weights", ["trained", "none"])
def test_cd_from_an_fp32_cache_trains_as_from_the_live_teacher(tmp_path: Path, teacher: str, weights: str) -> None:
    """With trained weights, and with random ones (`none`): training builds its teacher after the student, the
    cache command builds it alone; both must run the same teacher."""
    weights = teacher if weights == "trained" else "none"
    live = distill(tmp_path, weights, "live", CE_CD)
    cache = tmp_path / "cache"
    assert main(["cache-teacher", str(live), "--dtype", "fp32", "--out", str(cache)]) == 0
    cached = distill(tmp_path, weights, "cached", CE_CD, f"teacher.cache={cache}")
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
    for logits, T in (("full", 2), ("topk=2", 1)):
        losses = [{"loss_name": "CELoss"}, {"loss_name": "KDLossv2", "T": T},
                  {"loss_name": "CDLoss", "loss_rate": 6}, {"loss_name": "RKDLoss"}]
        cfg_path = distill(tmp_path, teacher, f"src-{logits}", losses)
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
        "teacher.precision: the cache has 'fp32', this run 'bf16'": ["train.amp=bf16"],
        "teacher.fold_bn": ["teacher.fold_bn=true"],
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
    live = build_teacher(cfg.teacher, cpu, torch.contiguous_format)
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


def test_backends_that_cannot_replay_crops_are_refused(tmp_path: Path, teacher: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing and reading a cache both check the loader's `replays_crops` flag, before anything else."""
    from fastcd.cache.use import open_cache
    from fastcd.data.base import BatchLoader

    class Opaque(BatchLoader):
        """A backend with crops of its own (as ffcv's and imagefolder's)."""

        def __len__(self) -> int:
            return 0

        def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
            pass

        def __iter__(self):
            return iter(())

    cfg = config_from_dict(yaml.safe_load(distill(tmp_path, teacher, "src", CE_CD).read_text()))
    monkeypatch.setattr(cache_write, "build_loader", lambda *args: Opaque())
    with pytest.raises(FastcdError, match="data.backend 'synthetic' cannot be used with a teacher cache"):
        cache_write.write_cache(cfg, tmp_path / "cache", 1, cache_write.contents_for(cfg))
    assert not (tmp_path / "cache").exists()
    cached = config_from_dict(cfg.to_dict(), [f"teacher.cache={tmp_path / 'nowhere'}"])
    with pytest.raises(FastcdError, match="cannot be used with a teacher cache: its crops are not fastcd's"):
        open_cache(cached, Opaque(), ())


def test_a_cache_of_another_config_is_a_typed_refusal_that_experiments_rebuild(tmp_path: Path,
                                                                               teacher: str) -> None:
    from fastcd.experiments import write_teacher_cache

    base = yaml.safe_load(distill(tmp_path, teacher, "src", CE_CD).read_text())
    cache = tmp_path / "cache"
    first, second = (config_from_dict(base, [f"teacher.cache={cache}", f"train.seed={seed}"]) for seed in (1, 2))
    write_teacher_cache([first])
    live = config_from_dict(second.to_dict(), ["teacher.cache="])
    with pytest.raises(cache_write.CacheMismatch, match="holds a cache for another config or options"):
        cache_write.write_cache(live, cache, 2, cache_write.contents_for(live, dtype="fp32"))
    write_teacher_cache([second])
    assert json.loads((cache / "manifest.json").read_text())["identity"]["seed"] == 2


def peaked_teacher_logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of a trained classifier over 100 classes (an MLP fitted for 150 SGD steps to Gaussian clusters:
    mean top-1 probability 0.78, the 90 classes outside a top-10 hold 0.7% of the mass), and of two students:
    untrained and trained for 20 steps."""
    g = torch.Generator().manual_seed(0)
    classes, dim, n = 100, 32, 4096
    labels = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(classes, dim, generator=g)[labels] + 1.8 * torch.randn(n, dim, generator=g)

    def fit(steps: int) -> torch.nn.Module:
        net = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.ReLU(), torch.nn.Linear(64, classes))
        opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
        for _ in range(steps):
            i = torch.randint(0, n, (256,), generator=g)
            with torch.enable_grad():
                loss = torch.nn.functional.cross_entropy(net(x[i]), labels[i])
                opt.zero_grad()
                loss.backward()
            opt.step()
        return net

    with torch.no_grad():
        return fit(150)(x[:512]), fit(0)(x[:512]), fit(20)(x[:512])


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_top10_logits_give_the_full_logit_kd_loss_at_T1(dtype: str) -> None:
    from fastcd.cache.store import Contents
    from fastcd.losses.kd import kd_rows
    from fastcd.models import TeacherTargets

    teacher, *students = peaked_teacher_logits()
    contents = Contents((1,), 100, "topk=10", 0, dtype)
    stored = TeacherTargets(means=[torch.zeros(len(teacher), 1)], logits=teacher, embed=None)
    dense = contents.targets(contents.rows(stored), torch.device("cpu")).logits
    top = teacher.topk(10, dim=1).indices
    tail = teacher.softmax(1).scatter(1, top, 0).sum(1)
    assert tail.mean() > 0.005  # the missing classes hold a mass that matters
    rebuilt = dense.softmax(1).scatter(1, top, 0).sum(1)  # their total, as the full softmax has it
    torch.testing.assert_close(rebuilt, tail, rtol=0.01 if dtype == "fp16" else 1e-5, atol=1e-7)
    for student in students:
        full, cached = kd_rows(student, teacher, 1.0).mean(), kd_rows(student, dense, 1.0).mean()
        assert abs(cached - full) / full < 0.01


def test_top_k_logits_are_refused_to_a_loss_at_another_temperature(tmp_path: Path, teacher: str) -> None:
    """Only the missing classes' total at T=1 is stored: at T=4 a top-10 cache of the 100-class teacher above
    gives a KD loss 36-42% below the full logits' (uniform tail), so it is refused, when written and when read."""
    kd = [{"loss_name": "CELoss"}, {"loss_name": "KDLoss", "T": 1}, {"loss_name": "CDLoss", "loss_rate": 6}]
    src = distill(tmp_path, teacher, "src", kd)
    cache = tmp_path / "cache"
    assert main(["cache-teacher", str(src), "--logits", "topk=2", "--out", str(cache)]) == 0
    hot = config_from_dict(yaml.safe_load(src.read_text()), [f"teacher.cache={cache}", "loss_list.1.T=4",
                                                             f"train.out_dir={tmp_path / 'hot'}"])
    with pytest.raises(FastcdError, match="top 2 of 4 logits, and KDLoss reads them at T=4"):
        train(hot)
    assert main(["cache-teacher", str(src), "--logits", "topk=2", "--out", str(tmp_path / "c2"),
                 "--set", "loss_list.1.T=4"]) == 2
    assert main(["cache-teacher", str(src), "--logits", "topk=4", "--out", str(tmp_path / "c3"),  # all classes
                 "--set", "loss_list.1.T=4"]) == 0


def test_a_second_writer_is_refused_and_a_damaged_epoch_is_written_again(tmp_path: Path, teacher: str,
                                                                         capsys: pytest.CaptureFixture) -> None:
    from fastcd.data_prep.outdir import locked

    src = distill(tmp_path, teacher, "src", CE_CD)
    cache = tmp_path / "cache"
    with locked(cache, cache_write.LOCK_NAME, "fastcd cache-teacher", "cache folder"):  # another run holds it
        assert main(["cache-teacher", str(src), "--out", str(cache)]) == 2
    assert "is being written by another `fastcd cache-teacher`" in capsys.readouterr().err
    assert not (cache / "manifest.json").exists()
    assert main(["cache-teacher", str(src), "--out", str(cache)]) == 0
    kept = np.load(cache / "epoch-0001" / "means.npy")
    (cache / "epoch-0001" / "means.npy").unlink()  # the manifest still lists epoch 1 as done
    cfg = config_from_dict(yaml.safe_load(src.read_text()), [f"teacher.cache={cache}"])
    with pytest.raises(FastcdError, match="epoch-0001/means.npy' cannot be read"):
        train(cfg)  # found before training: nothing was trained, no checkpoint
    assert not (tmp_path / "src" / "latest.pt").exists()
    capsys.readouterr()
    assert main(["cache-teacher", str(src), "--out", str(cache)]) == 0
    assert "epoch 1 is listed as done, but" in capsys.readouterr().out
    assert np.array_equal(np.load(cache / "epoch-0001" / "means.npy"), kept)
    assert len(train(cfg)) == 2


def test_bad_configs_and_manifests_are_one_line_errors(tmp_path: Path, teacher: str,
                                                        capsys: pytest.CaptureFixture) -> None:
    src = distill(tmp_path, teacher, "src", CE_CD)
    assert main(["cache-teacher", str(src), "--out", str(tmp_path / "x"), "--set", "teacher=null",
                 "loss_list=[{loss_name: CELoss}]"]) == 2
    assert "has no teacher (teacher: null)" in capsys.readouterr().err
    cache = tmp_path / "cache"
    assert main(["cache-teacher", str(src), "--out", str(cache)]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    del manifest["contents"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FastcdError, match="has no valid 'contents'"):
        train(config_from_dict(yaml.safe_load(src.read_text()), [f"teacher.cache={cache}"]))
    capsys.readouterr()
    assert main(["cache-teacher", str(src), "--out", str(cache)]) == 2
    err = capsys.readouterr().err
    assert "has no valid 'contents'" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "file").write_text("")
    assert main(["cache-teacher", str(src), "--out", str(tmp_path / "file")]) == 2
    assert "cannot create cache folder" in capsys.readouterr().err


def test_a_full_disk_is_a_one_line_error(tmp_path: Path, teacher: str, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    """Space is reserved when an epoch's files are created, and rows are written by file I/O: ENOSPC, there or
    later, is an error naming the folder (a write through a memory map would end the process with SIGBUS)."""
    import errno
    import os

    src = distill(tmp_path, teacher, "src", CE_CD)

    def full(*_args) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_pwrite = os.pwrite

    def rows_full(fd: int, data: bytes | memoryview, at: int) -> int:  # the rows fail, not the headers
        return full() if isinstance(data, memoryview) else real_pwrite(fd, data, at)

    for call, fake in (("posix_fallocate", full), ("pwrite", rows_full), ("fsync", full)):
        with monkeypatch.context() as m:
            m.setattr(os, call, fake)
            assert main(["cache-teacher", str(src), "--out", str(tmp_path / call)]) == 2
        err = capsys.readouterr().err
        assert "No space left on device" in err and len(err.strip().splitlines()) == 1, err


def test_a_full_tmpfs_is_a_one_line_error_not_a_bus_error(tmp_path: Path, teacher: str) -> None:
    """The real thing, where this user may mount: a 40 KiB tmpfs holds one epoch of the tiny cache, not two."""
    import subprocess
    import sys

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        src = distill(tmp_path, teacher, "src", CE_CD)
        done = subprocess.run([sys.executable, "-m", "fastcd.cli", "cache-teacher", str(src), "--out",
                               str(disk / "cache")], capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert done.returncode == 2, done
    assert "No space left on device" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_cycling_a_cache_under_a_resolution_ramp_is_refused(tmp_path: Path, teacher: str) -> None:
    ramp = ["data.min_res=16", "data.max_res=32", "data.start_ramp=0", "data.end_ramp=2"]  # 16, 32, 32, ...
    src = distill(tmp_path, teacher, "src", CE_CD, *ramp)
    cache = tmp_path / "cache"
    assert main(["cache-teacher", str(src), "--out", str(cache)]) == 0
    base = yaml.safe_load(src.read_text())
    cycled = config_from_dict(base, [f"teacher.cache={cache}", "teacher.cache_reuse=cycle", "train.epochs=3"])
    with pytest.raises(FastcdError, match="epoch 3 would replay cache epoch 1 at 16 px, where the resolution "
                                          "schedule .* gives 32 px"):
        train(cycled)
    fixed = ["data.min_res=0", "data.max_res=0", "data.res=32"]
    src = distill(tmp_path, teacher, "fixed", CE_CD, *fixed)
    assert main(["cache-teacher", str(src), "--out", str(tmp_path / "c2")]) == 0
    cfg = config_from_dict(yaml.safe_load(src.read_text()), [f"teacher.cache={tmp_path / 'c2'}",
                                                            "teacher.cache_reuse=cycle", "train.epochs=3"])
    assert len(train(cfg)) == 3


@pytest.fixture(scope="module")
def workers_cache(tmp_path_factory: pytest.TempPathFactory, prepared: Path) -> tuple[dict, Path]:
    """A tiny config over `prepared` through the torch backend's workers, and the cache written through it."""
    root = tmp_path_factory.mktemp("workers-cache")
    raw = prepared_dict(str(root / "run"), prepared, workers=0)
    raw["loss_list"] = CE_CD
    src = root / "src.yaml"
    src.write_text(yaml.safe_dump(raw))
    assert main(["cache-teacher", str(src), "--out", str(root / "cache")]) == 0
    return raw, root / "cache"


def test_a_cache_is_refused_by_the_resampling_not_the_backend_name(tmp_path: Path,
                                                                   workers_cache: tuple[dict, Path]) -> None:
    """What must agree is the crop definition and the named resampling: `data.decode: device` resamples by area,
    where the workers' cache is antialiased, and is refused, naming it; `decode: auto` is the workers on a CPU
    and is accepted. The backend's name is not compared."""
    from fastcd.cache.identity import identity

    raw, cache = workers_cache
    assert json.loads((cache / "manifest.json").read_text())["identity"]["data"]["resampling"] == "antialiased"
    with pytest.raises(FastcdError, match="data.resampling: the cache has 'antialiased', this run 'area'") as refused:
        train(config_from_dict(raw, [f"teacher.cache={cache}", "data.decode=device"]))
    assert "\n" not in str(refused.value)
    assert len(train(config_from_dict(raw, [f"teacher.cache={cache}", "data.decode=auto",
                                            f"train.out_dir={tmp_path / 'auto'}"]))) == 1

    synthetic = config_from_dict(tiny_dict(str(tmp_path / "s")))
    loader = build_loader(synthetic.data, "train", loader_context(synthetic, Runtime(torch.device("cpu"), 0, 0, 1)))
    renamed = config_from_dict(tiny_dict(str(tmp_path / "s")), ["data.backend=fashion-mnist"])
    assert identity(renamed, loader, 2) == identity(synthetic, loader, 2)


def test_dali_reads_a_cache_written_through_the_torch_workers(tmp_path: Path,
                                                              workers_cache: tuple[dict, Path]) -> None:
    """DALI decodes with another JPEG decoder but resamples as the torch workers do (antialiased bilinear), over
    the same prepared folder (the same data fingerprint): it reads their cache and trains from it."""
    pytest.importorskip("nvidia.dali")
    raw, cache = workers_cache
    cfg = config_from_dict(raw, ["data.backend=dali"])
    ctx = loader_context(cfg, Runtime(torch.device("cpu"), 0, 0, 1))
    dali = build_loader(cfg.data, "train", ctx)
    workers = build_loader(config_from_dict(raw).data, "train", ctx)
    assert dali.fingerprint() == workers.fingerprint()
    assert len(train(config_from_dict(raw, [f"teacher.cache={cache}", "data.backend=dali",
                                            f"train.out_dir={tmp_path / 'dali'}"]))) == 1


def test_a_cache_written_through_ffcv_is_read_by_area_resampling_only(tmp_path: Path,
                                                                      workers_cache: tuple[dict, Path]) -> None:
    """ffcv executes fastcd's crops with the area resampling: the torch backend's device decode (also area) reads
    its cache and trains from it; dali (antialiased) is refused, naming the resampling."""
    pytest.importorskip("ffcv")
    raw, _ = workers_cache
    src = tmp_path / "ffcv.yaml"
    src.write_text(yaml.safe_dump({**raw, "data": {**raw["data"], "backend": "ffcv", "workers": 1}}))
    assert main(["cache-teacher", str(src), "--out", str(tmp_path / "cache")]) == 0
    cache = tmp_path / "cache"
    assert json.loads((cache / "manifest.json").read_text())["identity"]["data"]["resampling"] == "area"
    assert len(train(config_from_dict(raw, [f"teacher.cache={cache}", "data.decode=device",
                                            f"train.out_dir={tmp_path / 'device'}"]))) == 1
    if importlib.util.find_spec("nvidia.dali"):
        with pytest.raises(FastcdError, match="data.resampling: the cache has 'area', this run 'antialiased'"):
            train(config_from_dict(raw, [f"teacher.cache={cache}", "data.backend=dali"]))


def test_a_cache_of_the_previous_format_is_a_one_line_refusal(tmp_path: Path, teacher: str) -> None:
    """A v2 cache (its identity named the decoder, not the resampling) is refused by its format, in one line
    naming `fastcd cache-teacher`."""
    src = distill(tmp_path, teacher, "src", CE_CD)
    cache = tmp_path / "cache"
    assert main(["cache-teacher", str(src), "--out", str(cache)]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["format"] = "fastcd-teacher-cache-v2"
    manifest["identity"]["data"] = {k: v for k, v in manifest["identity"]["data"].items() if k != "resampling"}
    manifest["identity"]["data"]["pixels"] = ("uint8 images in memory; bilinear affine resampling "
                                            "(transforms.resized_crop_affine)")  # as v2 wrote it
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FastcdError, match="format 'fastcd-teacher-cache-v2'.*`fastcd cache-teacher") as refused:
        train(config_from_dict(yaml.safe_load(src.read_text()), [f"teacher.cache={cache}"]))
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("backend,beside_data", [("torch", True), ("ffcv", True), ("dali", True),
                                                 ("fashion-mnist", False), ("synthetic", False)])
def test_default_cache_lies_beside_prepared_data_for_every_prepared_backend(backend, beside_data):
    cfg = config_from_dict({"name": "x", "data": {"backend": backend, "path": "/data/prepared"}})
    root = Path("/data/prepared") if beside_data else Path("runs")
    assert cache_write.default_out(cfg) == root / "teacher-cache" / "x"
