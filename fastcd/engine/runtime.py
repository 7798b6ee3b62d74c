"""Where a run executes: device, process group (torchrun), precision, memory format, seeding."""
from __future__ import annotations

import contextlib
import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from fastcd.config import Config
from fastcd.data import LoaderContext
from fastcd.engine.kernel_check import KernelCheck, check_kernels
from fastcd.errors import FastcdError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Runtime:
    """The resolved device, rank layout, autocast dtype and memory format of a run (`kernel_check`: why)."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype = torch.float32
    owns_group: bool = False  # this run joined the process group (and leaves it: distributed.teardown)
    channels_last: bool = True
    kernel_check: KernelCheck | None = None

    @property
    def memory_format(self) -> torch.memory_format:
        """The format every model and batch of the run is in."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the run's dtype (a no-op for fp32)."""
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def setup_runtime(config: Config) -> Runtime:
    """Resolve `train.device`/`train.amp`; join the torchrun process group (NCCL on GPU, gloo on CPU), whose
    collectives give up after `train.dist_timeout_s`. On a CPU, the memory format and autocast dtype are those
    `check_kernels` found right for the run's convolutions on this machine (decided by rank 0, one line said)."""
    cfg = config.train
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise FastcdError(f"train.device={cfg.device!r} but no CUDA device is available; use cpu or auto")
    device = torch.device(f"cuda:{local_rank}" if want == "cuda" else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    owns = world_size > 1 and not dist.is_initialized()
    if owns:
        if device.type == "cuda":  # a timed-out collective aborts NCCL's communicators and raises in Python (mode 2),
            # where fastcd names the lost ranks (`distributed.describe_failure`); torchrun's default (1) has NCCL's
            # watchdog kill the process first, with no word of which rank stopped answering
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
    check = [KernelCheck(cfg.channels_last, amp, f"not checked on {device.type}")]
    if device.type == "cpu":
        if rank == 0:
            check = [check_kernels(config, amp)]
            print(check[0].line(), flush=True)
        if world_size > 1:
            dist.broadcast_object_list(check, src=0)
    return Runtime(device, rank, local_rank, world_size, AMP_DTYPES[check[0].amp], owns, check[0].channels_last,
                   check[0])


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a single process (valid before and after the process group)."""
    return int(os.environ.get("RANK", "0")) == 0


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loader_context(cfg: Config, rt: Runtime) -> LoaderContext:
    """Where and how the run's loaders deliver: its device, autocast dtype, layout, classes, rank and seed."""
    return LoaderContext(rt.device, rt.amp_dtype, rt.channels_last, cfg.student.num_classes, rt.rank,
                         rt.world_size, cfg.train.seed)
