"""Check, before a CPU run, that the kernels its memory format and autocast dtype pick compute what the
contiguous fp32 ones do, for the run's own convolutions; fall back to a checked combination if not.

oneDNN picks a CPU convolution kernel by layout, dtype, shape and ISA, and some are wrong: oneDNN issue 6035
(1x1 convolution backward_weights writes past the rtus workspace, nhwc, IC < ic_block) segfaults, hangs, or
silently returns weight gradients 615x off. So every convolution the run executes (the student's and
connectors' forward and backward at each training resolution, its forward at the validation resolution, the
teacher's forward, with the bias folded BatchNorm leaves) runs in a subprocess (`fastcd.engine.kernel_probe`,
where a crash is seen, not fatal) in each candidate and is compared with the contiguous fp32 reference. The
candidates, in order: the config's format and dtype, contiguous at that dtype, contiguous fp32 (the reference
itself). A known-bad shape fails without running. The verdict is cached per (CPU model and flags, torch
build, threads, oneDNN environment, probe and tolerances, convolutions, candidates) in
`$XDG_CACHE_HOME/fastcd/kernel-checks`, so a sweep pays once. CUDA runs are not checked.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastcd.config import Config
from fastcd.data.resolution import train_res
from fastcd.losses import build_loss
from fastcd.models import StudentWithConnectors, build_resnet
from fastcd.models.teacher import stage_channels
from fastcd.utils.atomic import atomic_write_json

PROBE = [sys.executable, "-m", "fastcd.engine.kernel_probe"]  # the child's command line
PROBE_TIMEOUT_S = 300.0  # a probe silent this long hung (one of issue 6035's forms)
CHECK_BATCH = 8  # images per probed convolution (at most data.batch_size): the kernels depend on the shape
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 5e-3}  # largest relative error a candidate may show
IC_BLOCK = 16  # oneDNN's AVX-512 fp32 input-channel block


@dataclass(frozen=True)
class ConvSpec:
    """One convolution the run executes: its parameters, input size and whether it is trained (backward)."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    bias: bool
    height: int
    width: int
    backward: bool

    def describe(self) -> str:
        """E.g. 'trained 1x1 conv 8->16 stride 2 at 48x48'."""
        kind = "trained" if self.backward else "forward-only"
        return (f"{kind} {self.kernel[0]}x{self.kernel[1]} conv {self.in_channels}->{self.out_channels} stride "
                f"{self.stride[0]} at {self.height}x{self.width}")


@dataclass(frozen=True)
class Candidate:
    """A memory format and autocast dtype, and what the check found of it."""

    channels_last: bool
    amp: str
    result: str = "unchecked"  # passed, mismatch, crashed, hung, known bad, reference, unchecked
    detail: str = ""

    @property
    def name(self) -> str:
        """E.g. 'channels_last bf16'."""
        return f"{'channels_last' if self.channels_last else 'contiguous'} {self.amp}"


@dataclass(frozen=True)
class KernelCheck:
    """What a run executes (`channels_last`, `amp`) and why: `candidates` lists what was tried, in order."""

    channels_last: bool
    amp: str
    reason: str  # what runs, and why: one line
    candidates: tuple[Candidate, ...] = ()
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        """Plain values, as run.json records them."""
        return dataclasses.asdict(self)

    def line(self) -> str:
        """The one line a run prints."""
        return f"CPU kernels: {self.reason}"


def _pair(value: Any) -> tuple[int, int]:
    """A Conv2d's (height, width) parameter as two ints."""
    return int(value[0]), int(value[1])


def _specs(module: nn.Module, images: torch.Size, backward: bool) -> list[ConvSpec]:
    """The convolutions `module` runs on a batch of shape `images` (a forward on the meta device)."""
    found: list[ConvSpec] = []

    def record(conv: nn.Conv2d, args: tuple[torch.Tensor, ...]) -> None:
        found.append(ConvSpec(conv.in_channels, conv.out_channels, _pair(conv.kernel_size), _pair(conv.stride),
                              _pair(conv.padding), _pair(conv.dilation), conv.groups, conv.bias is not None,
                              args[0].shape[2], args[0].shape[3], backward))

    hooks = [m.register_forward_pre_hook(record) for m in module.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        module(torch.empty(images, device="meta"))
    for h in hooks:
        h.remove()
    return found


def conv_specs(cfg: Config) -> list[ConvSpec]:
    """Each distinct convolution of `cfg`'s run, at a batch of `CHECK_BATCH` (or fewer) images."""
    batch = min(cfg.data.batch_size, CHECK_BATCH)
    t = cfg.teacher
    stages = sorted({i for s in cfg.loss_list for i in build_loss(s.loss_name, s.params).connector_stages()})
    with torch.device("meta"):
        student = StudentWithConnectors(build_resnet(cfg.student.arch, cfg.student.num_classes, cfg.student.stem,
                                                     cfg.student.width),
                                        stage_channels(t) if t is not None else None, stages if t else ())
        teacher = build_resnet(t.arch, t.num_classes, t.stem, t.width) if t is not None else None
    specs = []
    for res in sorted({train_res(cfg.data, e) for e in range(cfg.train.epochs)}):
        specs += _specs(student, torch.Size((batch, 3, res, res)), backward=True)
        if teacher is not None:  # folded BatchNorm leaves each convolution a bias
            specs += [dataclasses.replace(s, bias=t.fold_bn) for s in _specs(teacher.eval(), torch.Size(
                (batch, 3, res, res)), backward=False)]
    specs += _specs(student.student.eval(), torch.Size((batch, 3, cfg.data.val_res, cfg.data.val_res)), False)
    return sorted(set(specs), key=dataclasses.astuple)


def known_bad(spec: ConvSpec) -> str:
    """Why `spec`'s channels_last kernel is known to be wrong on a CPU, or ''."""
    if spec.backward and spec.kernel == (1, 1) and max(spec.stride) > 1 and spec.in_channels < IC_BLOCK:
        return f"{spec.describe()} is oneDNN issue 6035 (1x1 backward_weights, nhwc, IC < ic_block)"
    return ""


def machine_key() -> dict[str, Any]:
    """What decides which kernels run: the CPU's model and flags, torch's build, threads, oneDNN's environment."""
    cpu: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "flags") and key.strip() not in cpu:
                cpu[key.strip()] = value.strip()
    except OSError:  # not Linux: the platform's description
        import platform

        cpu = {"model name": platform.processor(), "flags": platform.machine()}
    return {**cpu, "torch": torch.__version__, "config": torch.__config__.show(), "threads": torch.get_num_threads(),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("ONEDNN_", "DNNL_"))}}


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/fastcd/kernel-checks` (default ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastcd" / "kernel-checks"


def _ending(returncode: int, stderr: str) -> str:
    """How the probe ended: '' when it finished, else its signal or its last line of error."""
    if returncode == 0:
        return ""
    if returncode < 0:
        return f"crashed ({signal.Signals(-returncode).name})"
    lines = stderr.strip().splitlines()
    return f"failed (exit {returncode}: {lines[-1] if lines else 'no message'})"


def _probe(specs: list[ConvSpec], variants: list[Candidate], batch: int) -> list[Candidate]:
    """Run `variants` on `specs` in the child process; each comes back with its result."""
    job = {"batch": batch, "threads": torch.get_num_threads(), "convs": [dataclasses.asdict(s) for s in specs],
           "variants": [{"channels_last": v.channels_last, "amp": v.amp} for v in variants]}
    try:
        proc = subprocess.run(PROBE, input=json.dumps(job), capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S)
        stdout, how = proc.stdout, _ending(proc.returncode, proc.stderr)
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        stdout, how = out.decode() if isinstance(out, bytes) else out, f"hung (no answer in {PROBE_TIMEOUT_S:.0f} s)"
    errors: dict[tuple[int, int], float] = {}
    last: tuple[int, int] | None = None
    for line in stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            last = (row["variant"], row["conv"])
            if "error" in row:
                errors[last] = row["error"]
    done = []
    for i, v in enumerate(variants):
        worst = max(range(len(specs)), key=lambda j: errors.get((i, j), 0.0))
        if how and (last is None and i == 0 or last is not None and last[0] == i and last not in errors):
            where = specs[last[1]].describe() if last is not None else "the probe"
            done.append(dataclasses.replace(v, result="hung" if how.startswith("hung") else "crashed",
                                            detail=f"{where} {how}"))
        elif any((i, j) not in errors for j in range(len(specs))):
            done.append(dataclasses.replace(v, detail="the probe stopped before it"))
        elif errors[(i, worst)] > TOLERANCE[v.amp]:
            done.append(dataclasses.replace(v, result="mismatch", detail=f"{specs[worst].describe()} is off by "
                                            f"{errors[(i, worst)]:.3g} (relative; tolerance {TOLERANCE[v.amp]:g})"))
        else:
            done.append(dataclasses.replace(v, result="passed", detail=f"{len(specs)} convolutions within "
                                            f"{TOLERANCE[v.amp]:g} of contiguous fp32, worst "
                                            f"{errors[(i, worst)]:.2g}"))
    return done


def _cached(path: Path) -> list[Candidate]:
    """The verdicts stored at `path`; none if it is missing or unreadable (the check then runs again)."""
    try:
        return [Candidate(**c) for c in json.loads(path.read_text())["candidates"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def check_kernels(cfg: Config, amp: str) -> KernelCheck:
    """The memory format and autocast dtype a CPU run of `cfg` (asking for `amp`) executes, and why."""
    wanted = [Candidate(cfg.train.channels_last, amp), Candidate(False, amp), Candidate(False, "fp32")]
    wanted = list(dict.fromkeys(wanted))
    if len(wanted) == 1:
        return KernelCheck(False, "fp32", "contiguous fp32, as configured (the reference: nothing to check)",
                           (Candidate(False, "fp32", "reference"),))
    specs = conv_specs(cfg)
    for i, c in enumerate(wanted):
        bad = next(filter(None, map(known_bad, specs)), "") if c.channels_last else ""
        if bad:
            wanted[i] = dataclasses.replace(c, result="known bad", detail=bad)
    wanted[-1] = dataclasses.replace(wanted[-1], result="reference")
    batch = min(cfg.data.batch_size, CHECK_BATCH)
    to_run = [c for c in reversed(wanted) if c.result == "unchecked"]  # least wanted first: a crash of the
    # first wanted then leaves the others' results
    key = {"machine": machine_key(), "probe": PROBE, "tolerance": TOLERANCE, "batch": batch,
           "convs": [dataclasses.asdict(s) for s in specs], "variants": [c.name for c in to_run]}
    path = cache_dir() / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]}.json"
    ran = _cached(path) if to_run else []
    cached = bool(ran)
    if to_run and not cached:
        ran = _probe(specs, to_run, batch)
        atomic_write_json(path, {"key": key, "candidates": [dataclasses.asdict(c) for c in ran]})
    found = {c.name: c for c in ran}
    tried = tuple(found.get(c.name, c) for c in wanted)
    chosen = next(c for c in tried if c.result in ("passed", "reference"))
    if chosen is tried[0]:
        reason = f"{chosen.name}, as configured (checked: {chosen.detail}{', cached' if cached else ''})"
    else:
        failed = next(c for c in tried if c.result not in ("passed", "reference", "unchecked"))
        which = "" if failed is tried[0] else f"{failed.name} "
        reason = f"{chosen.name}, not {tried[0].name}: {which}{failed.result}, {failed.detail}"
    return KernelCheck(chosen.channels_last, chosen.amp, reason, tried, cached)
