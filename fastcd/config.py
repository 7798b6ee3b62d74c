"""Typed experiment configuration: dataclasses loaded from one YAML file per experiment.

Validated on load (unknown keys name the nearest valid one; choices and numeric ranges are checked),
overridable with `--set key=value` (dotted paths, list indices: `loss_list.1.loss_rate=3`), and stored
inside every checkpoint as plain values (`to_dict`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fastcd.errors import FastcdError
from fastcd.names import BASE_EPOCHS, TEACHER_INPUTS, loss_entry, nearest
from fastcd.paths import shipped_config
from fastcd.utils.ranges import Range, check_range

Arch = Literal["resnet18", "resnet34", "resnet50", "resnet152"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SEED_MAX = 2**31 - 1  # keeps every derived seed (sharding: seed * 1_000_003 + epoch) inside int64


def _ranged(default: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False, factory: bool = False) -> Any:
    """A dataclass field whose value must lie in the given interval (see `Range`)."""
    meta = {"range": Range(low, high, low_open, high_open)}
    if factory:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def _positive(default: Any, **kw: Any) -> Any:
    return _ranged(default, 0, low_open=True, **kw)


def _at_least(low: float, default: Any, **kw: Any) -> Any:
    return _ranged(default, low, **kw)


def _fraction(default: float, **kw: Any) -> Any:
    return _ranged(default, 0, 1, **kw)


@dataclass
class ModelConfig:
    """A ResNet: architecture, stem (`cifar` = 3x3 conv, no max-pool), width multiplier, classes."""

    arch: Arch = "resnet18"
    stem: Literal["imagenet", "cifar"] = "imagenet"
    width: float = _positive(1.0)
    num_classes: int = _at_least(1, 1000)


@dataclass
class TeacherConfig(ModelConfig):
    """The frozen teacher: weights `torchvision:<WEIGHTS>`, a fastcd checkpoint path, or `none` (random).
    With `cache` (a folder `fastcd cache-teacher` wrote) no teacher runs: the losses read its stored targets;
    `cache_reuse: cycle` lets a run longer than the cache replay its epochs (epoch e replays e mod E)."""

    arch: Arch = "resnet34"
    weights: str = "torchvision:IMAGENET1K_V1"
    bn_mode: Literal["eval", "train"] = "eval"
    fold_bn: bool = False  # fold BatchNorm into the convolutions (eval mode only): a faster forward
    cache: str = ""
    cache_reuse: Literal["exact", "cycle"] = "exact"


LossType = Literal["ce_family", "kd_family", "kdv2_family", "fd_family"]


@dataclass
class LossSpec:
    """One entry of `loss_list`, as in the seed; extra keys (`T`, ...) are the loss's parameters.

    `loss_type` defaults to the loss's own family (`DistillLoss.family`: CE ce_family, KD kd_family,
    GKD kdv2_family, CD/AT/FitNets/RKD fd_family); a family that contradicts the loss is an error.
    """

    loss_name: str
    loss_rate: float = _at_least(0, 1.0)
    factor: float = _at_least(0, 1.0)
    loss_type: LossType | None = None
    loss_rate_decay: Literal["lrdv1", "lrdv2"] = "lrdv1"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.loss_type = resolve_loss_type(self.loss_name, self.loss_type)


def resolve_loss_type(loss_name: str, loss_type: str | None, where: str = "") -> str:
    """`loss_type` of a loss_list entry: the loss's family when not given; a contradicting family is an error."""
    family = loss_entry(loss_name).family
    if loss_type not in (None, family):
        raise FastcdError(f"{where + ': ' if where else ''}{loss_name} is a {family} loss, loss_type {loss_type} "
                          f"contradicts it (the loss-rate decay would treat it as another family); "
                          f"drop loss_type or set {family}")
    return family


@dataclass
class DataConfig:
    """Which loader backend reads which data, at which resolution, with which batch size."""

    backend: Literal["imagefolder", "fashion-mnist", "synthetic", "torch", "ffcv", "dali"] = "imagefolder"
    path: str = ""
    batch_size: int = _at_least(1, 256)
    val_batch_size: int = _at_least(0, 0)
    workers: int = _at_least(0, 8)
    res: int = _at_least(1, 224)
    val_res: int = _at_least(1, 224)
    val_resize_ratio: float = _fraction(0.875, low_open=True)
    scale_min: float = _fraction(0.08, low_open=True)
    min_res: int = _at_least(0, 0)
    max_res: int = _at_least(0, 0)
    start_ramp: int = _at_least(0, 0)
    end_ramp: int = _at_least(0, 0)
    flip_tta: bool = False
    train_subset: int = _at_least(0, 0)
    val_subset: int = _at_least(0, 0)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = _positive(lambda: list(IMAGENET_STD), factory=True)
    decode: Literal["auto", "workers", "device"] = "auto"  # torch backend: decode in CPU workers or batched on
    # the training device (nvjpeg on a GPU); auto: device on CUDA, workers elsewhere
    dali_hw_decoder_load: float = _fraction(0.65)  # share of JPEGs sent to the GPU's hardware decoder (A100/H100)
    dali_prefetch: int = _at_least(1, 2)  # batches DALI prepares ahead
    dali_preallocate: int = _at_least(0, 0)  # expected max image side, to preallocate the mixed decoder (0 = off)
    ffcv_os_cache: bool = True  # let the OS page cache hold the .beton (shared by processes)


@dataclass
class OptimConfig:
    """SGD and its per-iteration learning-rate schedule (lr for the given batch size).

    `milestones` and `step_size` count epochs of the preset's original run (`train.dataset_type`:
    100 for imagenet, 200 for cifar) and scale with `train.epochs`, like the loss-decay milestones;
    `warmup_epochs` and `peak_epoch` are epochs of this run.
    """

    lr: float = _positive(0.1)
    momentum: float = _fraction(0.9, high_open=True)
    weight_decay: float = _at_least(0, 1e-4)
    nesterov: bool = False
    fused: bool | None = None  # null: the fused kernel on GPU, foreach elsewhere
    schedule: Literal["multistep", "step", "cosine", "linear"] = "multistep"
    milestones: list[int] = _at_least(0, lambda: [30, 60, 90], factory=True)
    gamma: float = _positive(0.1)
    step_size: int = _at_least(1, 30)
    warmup_epochs: float = _at_least(0, 0.0)
    peak_epoch: float = _at_least(0, 2.0)
    end_lr_ratio: float = _fraction(0.0)


@dataclass
class TrainConfig:
    """The run: epochs, the loss-decay preset (`dataset_type`), precision, layout, seed, outputs."""

    epochs: int = _at_least(1, 100)
    dataset_type: Literal["imagenet", "cifar"] = "imagenet"
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    channels_last: bool = True
    compile: bool = False
    device: str = "auto"
    seed: int = _ranged(0, 0, SEED_MAX)  # seeds numpy, torch and the crops (sharding: seed * 1_000_003 + epoch)
    out_dir: str = ""
    log_every: int = _at_least(1, 50)
    max_steps_per_epoch: int = _at_least(0, 0)
    progress: bool = True
    tensorboard: bool = False  # also log the scalars to <out>/tensorboard (needs the tensorboard package)
    dist_timeout_s: float = _positive(600.0)  # DDP: a collective waits this long for a silent rank, then fails
    resume: Literal["never", "auto"] = "never"  # auto: continue <out>/latest.pt of the same run (engine.elastic)
    checkpoint_every_steps: int = _at_least(0, 0)  # also write latest.pt every N optimizer steps (0: at epoch ends)
    eval_every: int = _at_least(0, 1)  # evaluate after every N-th epoch (0: none) and always after the last

    def evaluates(self, epoch: int) -> bool:
        """Whether 1-based `epoch` is evaluated: every `eval_every`-th, and the last."""
        return epoch == self.epochs or (self.eval_every > 0 and epoch % self.eval_every == 0)


@dataclass
class Config:
    """One experiment. `teacher: null` trains the student alone."""

    name: str = "experiment"
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig | None = field(default_factory=TeacherConfig)
    loss_list: list[LossSpec] = field(default_factory=lambda: [LossSpec("CELoss")])
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the YAML form), as stored in checkpoints."""
        out = dataclasses.asdict(self)
        out["loss_list"] = [_spec_to_dict(s) for s in self.loss_list]
        return out

    @property
    def out_path(self) -> Path:
        """The run's output folder (`train.out_dir`, default `runs/<name>`)."""
        return Path(self.train.out_dir or f"runs/{self.name}")


def _spec_to_dict(spec: LossSpec) -> dict[str, Any]:
    d = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "params"}
    return {**d, **spec.params}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to type `tp`, or raise FastcdError naming `where`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in typing.get_args(tp):
                return None
            raise FastcdError(f"{where}: may not be null")
        (arg,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, arg, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise FastcdError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}"
                              f"{nearest(str(value), [str(c) for c in choices])}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise FastcdError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise FastcdError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise FastcdError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise FastcdError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise FastcdError(f"{where}: expected a finite number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise FastcdError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def _from_dict(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise FastcdError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    if cls is LossSpec:
        return _loss_spec(raw, where)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise FastcdError(f"unknown config key {path!r}{nearest(str(key), names)}; "
                              f"valid keys{' of ' + where if where else ''}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _loss_spec(raw: dict[str, Any], where: str) -> LossSpec:
    if "loss_name" not in raw:
        raise FastcdError(f"{where}: a loss_list entry needs a loss_name")
    hints = typing.get_type_hints(LossSpec)
    core = {f.name for f in dataclasses.fields(LossSpec)} - {"params"}
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in raw.items() if k in core}
    kwargs["loss_type"] = resolve_loss_type(kwargs["loss_name"], kwargs.get("loss_type"), where)
    params = {k: v for k, v in raw.items() if k not in core}
    allowed = list(loss_entry(kwargs["loss_name"]).params)
    for key in params:
        if key not in allowed:
            raise FastcdError(f"unknown key {where}.{key} for loss {kwargs['loss_name']!r}"
                              f"{nearest(key, sorted(core) + allowed)}; "
                              f"valid: {', '.join(sorted(core) + allowed)}")
    return LossSpec(**kwargs, params=params)


class NullSectionError(FastcdError):
    """`--set a.b=...` where `a` is null: setting a field must not bring a whole section into being."""


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in nested dicts/lists; a field inside a null section (`teacher: null`) is an error
    naming the section (set the whole section instead: `teacher={arch: resnet34, ...}`)."""
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            idx = _index(key, node, keys[: i + 1])
            if last:
                node[idx] = value
            node = node[idx]
        elif last:
            node[key] = value
        else:
            if key in node and node[key] is None:
                section = ".".join(keys[: i + 1])
                raise NullSectionError(f"--set {dotted}: {section} is null in this config, so it has no field "
                                       f"{keys[i + 1]!r}; set the whole section instead, e.g. "
                                       f"--set '{section}={{{keys[i + 1]}: ...}}'")
            node = node.setdefault(key, {})


def _index(key: str, node: list, keys: list[str]) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise FastcdError(f"--set {'.'.join(keys)}: {key!r} is not an index of a list of {len(node)}")
    return int(key)


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """`key=value` strings -> (dotted key, YAML-parsed value)."""
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise FastcdError(f"--set {pair!r}: expected key=value, e.g. train.epochs=16")
        key, text = pair.split("=", 1)
        try:
            out.append((key.strip(), yaml.safe_load(text) if text.strip() else ""))
        except yaml.YAMLError as e:
            raise FastcdError(f"--set {pair!r}: the value is not valid YAML{_yaml_where(e)}") from None
    return out


def add_set_argument(parser: argparse.ArgumentParser, help: str = "override a config field") -> None:
    """The `--set KEY=VALUE ...` option of every command: several pairs after one `--set`, and `--set` repeated."""
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help=f"{help}; several pairs may follow one --set (after the positional arguments), e.g. "
                             "--set train.epochs=16 loss_list.1.T=4 (optim.milestones, optim.step_size and the "
                             "loss-decay milestones count epochs of the preset's 100 (imagenet) or 200 (cifar) "
                             "and scale with train.epochs)")


def at_least_one(text: str) -> int:
    """An argparse type: a whole number of 1 or more (`--epochs 0` is refused, not read as "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def drop_overrides_into_null(path: str | Path, overrides: list[str]) -> list[str]:
    """`overrides` less those that set a field inside a section that is null in the config at `path` (after
    the overrides before them): for one list of overrides shared by configs with and without a teacher."""
    raw = _deep_merge(Config().to_dict(), _read_yaml(Path(path)))
    kept = []
    for override, (key, value) in zip(overrides, parse_overrides(overrides), strict=True):
        try:
            _set_path(raw, key, value)
        except NullSectionError:
            continue
        kept.append(override)
    return kept


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Build and validate a Config from plain values plus `key=value` overrides."""
    raw = _deep_merge(Config().to_dict(), yaml.safe_load(yaml.safe_dump(raw)))  # defaults, then the file
    for key, value in parse_overrides(overrides or []):
        _set_path(raw, key, value)
    cfg = _from_dict(Config, raw, "")
    validate(cfg)
    return cfg


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def _yaml_where(e: yaml.YAMLError) -> str:
    """Where and what a YAML error is: ' at line L, column C: problem (context)' (1-based, as editors count)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    return f"{where}: {problem}{f' ({context})' if context else ''}"


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML file's mapping, merged over the file its `base:` key names (relative to it)."""
    if not path.is_file():
        raise FastcdError(f"config file {str(path)!r} does not exist")
    if path.resolve() in seen:
        raise FastcdError(f"config file {str(path)!r} includes itself through 'base'")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise FastcdError(f"config file {str(path)!r} is not valid YAML{_yaml_where(e)}") from None
    if not isinstance(raw, dict):
        raise FastcdError(f"config file {str(path)!r} must hold a mapping at the top level")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _deep_merge(_read_yaml(path.parent / base, (*seen, path.resolve())), raw)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML experiment file (with its `base:` chain); errors are one line naming the file. A relative
    `configs/...` path that is not in the current directory is one of the shipped configs."""
    path = Path(path)
    if not path.is_file():
        path = shipped_config(path) or path
    return config_from_dict(_read_yaml(path), overrides)


def _check_ranges(obj: Any, where: str) -> None:
    """Every field with a `Range` (and every nested dataclass, list item by item) lies in its interval."""
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            _check_ranges(item, f"{where}[{i}]")
        return
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), f"{where}.{f.name}" if where else f.name
        rng = f.metadata.get("range")
        if rng is not None:
            for i, v in enumerate(value) if isinstance(value, list) else [(None, value)]:
                check_range(v, rng, path if i is None else f"{path}[{i}]")
        elif dataclasses.is_dataclass(value) or (isinstance(value, list) and value
                                                  and dataclasses.is_dataclass(value[0])):
            _check_ranges(value, path)


def validate(cfg: Config) -> None:
    """Numeric ranges, and checks across fields that the types alone cannot express."""
    _check_ranges(cfg, "")
    if not cfg.loss_list:
        raise FastcdError("loss_list is empty: give at least one loss, e.g. {loss_name: CELoss}")
    if cfg.teacher is not None and cfg.teacher.num_classes != cfg.student.num_classes:
        raise FastcdError(f"teacher.num_classes={cfg.teacher.num_classes} differs from "
                          f"student.num_classes={cfg.student.num_classes}")
    if cfg.teacher is not None and cfg.teacher.fold_bn and cfg.teacher.bn_mode != "eval":
        raise FastcdError("teacher.fold_bn=true needs teacher.bn_mode=eval (batch statistics cannot fold)")
    for name in ("mean", "std"):
        if len(getattr(cfg.data, name)) != 3:
            raise FastcdError(f"data.{name} needs 3 values (R, G, B), got {getattr(cfg.data, name)}")
    if bool(cfg.data.min_res) != bool(cfg.data.max_res):
        raise FastcdError("data.min_res and data.max_res go together (progressive resizing): set both or neither")
    base = BASE_EPOCHS[cfg.train.dataset_type]
    for name, values in (("milestones", cfg.optim.milestones), ("step_size", [cfg.optim.step_size])):
        for v in values:
            if v > base:
                raise FastcdError(f"optim.{name}: {v} is past the {cfg.train.dataset_type} preset's {base} epochs "
                                  f"(it counts epochs of a {base}-epoch run and scales to train.epochs)")
    for i, spec in enumerate(cfg.loss_list):
        needs = set(loss_entry(spec.loss_name).inputs)
        if cfg.teacher is None and needs & set(TEACHER_INPUTS):
            raise FastcdError(f"loss_list[{i}] {spec.loss_name} needs a teacher but teacher is null")
        if cfg.teacher is not None and cfg.teacher.cache and "tea_feats" in needs:
            raise FastcdError(f"loss_list[{i}] {spec.loss_name} needs the teacher's whole stage maps, which a "
                              "teacher cache does not hold (only their channel means, logits, embedding): "
                              "train it with a live teacher (teacher.cache empty)")
    if cfg.teacher is not None and cfg.teacher.cache and cfg.teacher.bn_mode != "eval":
        raise FastcdError("teacher.cache needs teacher.bn_mode=eval: with batch statistics the teacher's "
                          "targets for a crop depend on the rest of its batch, so they cannot be stored")
