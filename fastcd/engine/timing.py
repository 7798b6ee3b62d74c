"""Time the training loop waits for its batches, without a host sync per step.

On a GPU, a CUDA event is recorded before and after `next(loader)`; their elapsed time is the GPU's time
between the end of the previous step's work and the batch being ready (the decode and normalisation a
GPU loader enqueues, and any gap while the host was still fetching). The events are read at log time
only. On a CPU, the host's `perf_counter` around `next()` is that time.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


class DataWait:
    """Accumulated seconds of waiting for batches; `start()`/`stop()` around each `next()`, `read()` at log time."""

    def __init__(self, device: torch.device, event: Callable[..., Any] | None = None) -> None:
        self.cuda = device.type == "cuda"
        self.event = event or (torch.cuda.Event if self.cuda else None)
        self.pending: list[tuple[Any, Any]] = []
        self.seconds = 0.0
        self._start: Any = None

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = self.event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self._start = self._mark()

    def stop(self) -> None:
        end = self._mark()
        if self.cuda:
            self.pending.append((self._start, end))
        else:
            self.seconds += end - self._start

    def read(self) -> float:
        """Seconds so far; on a GPU it waits for the last recorded event (intentional sync: log time only)."""
        if self.pending:
            self.pending[-1][1].synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self.pending) / 1e3
            self.pending.clear()
        return self.seconds
