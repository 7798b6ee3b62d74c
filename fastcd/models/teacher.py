"""Teacher weights: torchvision's pretrained ones (`torchvision:IMAGENET1K_V1`) or a fastcd checkpoint."""
from __future__ import annotations

import hashlib
import urllib.error

import torch
import torchvision

from fastcd.config import TeacherConfig
from fastcd.errors import FastcdError
from fastcd.models.fold import fold_batchnorm
from fastcd.models.pair import freeze
from fastcd.models.resnet import FeatureResNet, build_resnet


def _torchvision_state(cfg: TeacherConfig, weights_name: str) -> dict:
    if (cfg.width, cfg.stem, cfg.num_classes) != (1.0, "imagenet", 1000):
        raise FastcdError(f"teacher.weights=torchvision:{weights_name} needs width 1, the imagenet stem and "
                          f"1000 classes; the config has width {cfg.width}, stem {cfg.stem!r}, "
                          f"{cfg.num_classes} classes")
    try:
        weights = torchvision.models.get_model_weights(cfg.arch)[weights_name]
    except KeyError:
        valid = [w.name for w in torchvision.models.get_model_weights(cfg.arch)]
        raise FastcdError(f"torchvision has no weights {weights_name!r} for {cfg.arch}; "
                          f"valid: {', '.join(valid)}") from None
    try:
        return weights.get_state_dict(progress=True)
    except (urllib.error.URLError, OSError) as e:
        raise FastcdError(f"could not download {cfg.arch} weights {weights_name} from {weights.url} ({e}); "
                          "without network, copy the file into $TORCH_HOME/hub/checkpoints/ or set "
                          "teacher.weights to a fastcd checkpoint") from None


def _checkpoint_state(cfg: TeacherConfig, path: str) -> dict:
    from fastcd.utils.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    made = ckpt["config"]["student"]
    want = {"arch": cfg.arch, "stem": cfg.stem, "width": cfg.width, "num_classes": cfg.num_classes}
    have = {k: made[k] for k in want}
    if have != want:
        diff = ", ".join(f"{k} {have[k]!r} (config wants {want[k]!r})" for k in want if have[k] != want[k])
        raise FastcdError(f"teacher checkpoint {path!r} holds a different network: {diff}")
    return ckpt["model"]


RANDOM_SEED = 0  # a random teacher's initialisation: the same in every run, whatever was drawn before it


def load_teacher(cfg: TeacherConfig) -> FeatureResNet:
    """Build the teacher of `cfg` and load its weights. `none` leaves them random (for benchmarks), drawn from
    `RANDOM_SEED` apart from the run's random stream: every run, and a teacher cache, gets the same teacher."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        net = build_resnet(cfg.arch, cfg.num_classes, cfg.stem, cfg.width)
    if cfg.weights == "none":
        return net
    if cfg.weights.startswith("torchvision:"):
        state = _torchvision_state(cfg, cfg.weights.split(":", 1)[1])
    else:
        state = _checkpoint_state(cfg, cfg.weights)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise FastcdError(f"teacher weights {cfg.weights!r} do not fit {cfg.arch}: "
                          f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    return net


def weights_sha256(cfg: TeacherConfig) -> str:
    """sha256 of the teacher's weights as `load_teacher` loads them, whatever their origin (random ones
    included): names, dtypes, shapes and values, in order."""
    digest = hashlib.sha256()
    for name, tensor in load_teacher(cfg).state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def stage_channels(cfg: TeacherConfig) -> list[int]:
    """The teacher's stage output channels, without building its weights (what the connectors map to)."""
    with torch.device("meta"):
        return build_resnet(cfg.arch, cfg.num_classes, cfg.stem, cfg.width).stage_channels


def build_teacher(cfg: TeacherConfig, device: torch.device, memory_format: torch.memory_format) -> FeatureResNet:
    """The frozen teacher of `cfg` (weights loaded, BatchNorm as `bn_mode` says, folded if asked) on `device`, in
    `memory_format`."""
    teacher = freeze(load_teacher(cfg), cfg.bn_mode)
    if cfg.fold_bn:
        teacher = fold_batchnorm(teacher)
    return teacher.to(device, memory_format=memory_format)
