"""Shared fixtures: a tiny distillation config on synthetic data that trains in seconds on a CPU."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcd.config import Config, config_from_dict

if not torch.cuda.is_available():  # the Triton kernels run on CPU tensors through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (read when a kernel module is imported: here, first)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread: tiny models run as fast on it, and competing OpenMP threads slow a shared
    machine down many times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

@pytest.fixture(autouse=True, scope="session")
def kernel_check_cache(tmp_path_factory: pytest.TempPathFactory):
    """The CPU kernel checks' verdicts (`fastcd.engine.kernel_check`) go to a folder of this session, not the
    user's cache: the first run of a shape checks it, the others read the verdict."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = before

CD_GKD_EDT = [
    {"loss_name": "CELoss", "loss_type": "ce_family", "loss_rate_decay": "lrdv2"},
    {"loss_name": "KDLossv2", "T": 2, "loss_type": "kdv2_family", "loss_rate_decay": "lrdv2"},
    {"loss_name": "CDLoss", "loss_rate": 6, "factor": 0.9, "loss_type": "fd_family", "loss_rate_decay": "lrdv2"},
]


def tiny_dict(out_dir: str) -> dict:
    """Plain values of a tiny R34 -> R18 (width 1/16, CIFAR stem, 16 px) CD+GKD+EDT run on synthetic data."""
    return {
        "name": "tiny",
        "student": {"arch": "resnet18", "stem": "cifar", "width": 0.0625, "num_classes": 4},
        "teacher": {"arch": "resnet34", "stem": "cifar", "width": 0.0625, "num_classes": 4, "weights": "none"},
        "loss_list": CD_GKD_EDT,
        "data": {"backend": "synthetic", "res": 16, "val_res": 16, "val_resize_ratio": 1.0, "batch_size": 32,
                 "train_subset": 256, "val_subset": 64, "scale_min": 0.5},
        "optim": {"lr": 0.05, "schedule": "cosine", "weight_decay": 0.0},
        "train": {"epochs": 3, "out_dir": out_dir, "log_every": 2, "progress": False, "seed": 3},
    }


@pytest.fixture
def tiny_config(tmp_path):
    """Factory: `tiny_config("train.epochs=2", ...)` -> Config writing to a fresh tmp folder."""

    def make(*overrides: str) -> Config:
        return config_from_dict(tiny_dict(str(tmp_path / "run")), list(overrides))

    return make


def prepared_dict(out_dir: str, prepared: Path, workers: int) -> dict:
    """`tiny_dict` over the `prepared` folder through the torch backend's CPU workers (3 classes, fp32, 1 epoch)."""
    raw = tiny_dict(out_dir)
    for model in ("student", "teacher"):
        raw[model]["num_classes"] = 3
    raw["data"] = {"backend": "torch", "path": str(prepared), "res": 16, "val_res": 16, "batch_size": 4,
                   "workers": workers, "scale_min": 0.5, "decode": "workers"}
    raw["train"].update(amp="fp32", device="cpu", epochs=1)
    return raw


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny prepared dataset (3 classes, 4 training and 2 validation JPEGs each) in both formats."""
    from PIL import Image

    from fastcd.data_prep.prepare import prepare

    root = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for c in ("ant", "bee", "cat"):
            (root / "src" / split / c).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (int(rng.integers(40, 64)), int(rng.integers(40, 64)), 3), np.uint8)
                Image.fromarray(pixels).save(root / "src" / split / c / f"{i}.jpg", quality=90)
    prepare(root / "src", root / "out", formats=["ffcv", "dali"], workers=1, progress=False)
    return root / "out"
