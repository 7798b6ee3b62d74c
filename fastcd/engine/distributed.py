"""Collectives the trainer itself runs under torchrun, and what happens when a rank fails or goes silent.

- A non-finite loss met on any rank stops every rank at the same log step, with the same message (the
  first bad step over all ranks, the rank, each loss's value there).
- A collective that does not complete within `train.dist_timeout_s` (a rank stopped, hung or died)
  raises on the ranks still answering; they then check in through the rendezvous store for a short
  grace period, and the ranks that never check in are named as lost.
"""
from __future__ import annotations

import re
import time

import torch
import torch.distributed as dist

from fastcd.engine.metrics import Meter
from fastcd.engine.runtime import Runtime

ROLL_CALL = "fastcd/roll-call/"
# gloo reports a peer that timed out or went away as a plain RuntimeError that names the transport's source file,
# e.g. "[.../gloo/transport/tcp/pair.cc:545] Read error ...: Connection reset by peer" or
# "[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete".
GLOO_TRANSPORT = re.compile(r"\[[^\]\s]*gloo/transport/[^\]\s]*\]")


def first_nonfinite(meter: Meter, rt: Runtime) -> tuple[int, int, list[float]] | None:
    """(step, rank, loss values) of the first non-finite loss over all ranks, or None; the same on every
    rank (an all-gather under DDP: intentional sync, log time only)."""
    local = torch.cat([meter.bad_step.view(1).double(), meter.bad_terms.double()])
    rows = [local]
    if rt.distributed:
        rows = [torch.empty_like(local) for _ in range(rt.world_size)]
        dist.all_gather(rows, local)
    found = [(int(row[0]), rank, row[1:].tolist()) for rank, row in enumerate(torch.stack(rows).cpu())
             if row[0] >= 0]
    return min(found) if found else None


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that timed out or lost its peer (rather than a bug of this rank): torch's
    distributed errors (NCCL's, the store's) by type, gloo's by its transport's source location. Another error
    that merely mentions a timeout (a DataLoader's, a file system's) is not one."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError)
                                                 and GLOO_TRANSPORT.search(str(error)) is not None)


def silent_ranks(rt: Runtime, grace_s: float) -> list[int]:
    """The ranks that do not check in through the rendezvous store within `grace_s` seconds."""
    store = dist.distributed_c10d._get_default_store()
    store.set(f"{ROLL_CALL}{rt.rank}", "here")
    deadline = time.monotonic() + grace_s
    while True:
        missing = [r for r in range(rt.world_size) if not store.check([f"{ROLL_CALL}{r}"])]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.2)


def describe_failure(rt: Runtime, error: BaseException, timeout_s: float) -> str:
    """The one-line message of a failed collective: which ranks were lost, or the backend's error."""
    lost = silent_ranks(rt, min(timeout_s, 30.0))
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if not lost:
        return f"a collective failed on rank {rt.rank} ({first})"
    names = ", ".join(map(str, lost))
    return (f"rank{'s' if len(lost) > 1 else ''} {names} stopped answering: no reply within "
            f"train.dist_timeout_s={timeout_s:g} s to a collective ({first}); training stopped on every rank "
            "still answering")


def teardown(rt: Runtime) -> None:
    """Leave the process group this run joined (on success and on error)."""
    if rt.owns_group and dist.is_initialized():
        dist.destroy_process_group()
