"""The host side of the GPU feed, per batch: what the host must do before a batch can be decoded.

`HostFeed.batch(indices, plan)` gathers the batch's JPEG bytes from the memory-mapped shards straight
into one reused buffer (pinned when the batch goes to a GPU), and takes the labels, image sizes and crop
rows of the whole batch from the split's sample table in vectorised calls (`ShardSamples`,
`CropPlan.rows`): no JPEG header is parsed, no label read and no Python object made per sample, so the
host spends microseconds per image. The buffers form a ring: a buffer is refilled only after the batch
that used it was decoded (`release`, with the CUDA event after which its bytes are no longer read).

`staged` runs a per-batch function in a background thread, a bounded number of batches ahead of the
consumer (on its own CUDA stream when the device is a GPU); the torch backend chains two stages, the
host feed and the device's decode and crop, so both overlap the training step.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from fastcd.data.crops import CropPlan
from fastcd.data.prepared import ShardSamples

WAIT = 0.1  # seconds between checks of the stop flag while a queue is full or empty
GROWTH = 1.25  # a buffer too small for a batch is replaced by one this much larger than the batch


@dataclass
class FedBatch:
    """One batch as the host hands it to the decoder."""

    data: Tensor  # uint8: the batch's JPEGs one after another (a view of a ring buffer)
    lengths: Tensor  # int64 (B,): each JPEG's length in `data`
    labels: Tensor  # int64 (B,)
    indices: Tensor  # int64 (B,): the batch's samples (to name one that does not decode)
    rows: Tensor  # float32 (B, len(crops.ROW)): each sample's crop box, flip and image size
    slot: int  # the ring buffer that holds `data`, to `release` once decoded


class HostFeed:
    """Batches of a split's shards for a decoder: bytes, lengths, labels and crop rows, per batch."""

    def __init__(self, samples: ShardSamples, slots: int, pin: bool) -> None:
        self.samples, self.pin = samples, pin
        self.buffers = [torch.empty(0, dtype=torch.uint8) for _ in range(slots)]
        self.free: queue.Queue[tuple[int, torch.cuda.Event | None]] = queue.Queue()
        self.reset(torch.device("cpu"))

    def reset(self, device: torch.device) -> None:
        """Every buffer free again, at the start of an epoch: a consumer that stopped early left batches
        unreleased (their decoding, on a GPU, is waited for here)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # intentional sync: once per epoch, before buffers are reused
        self.free = queue.Queue()
        for slot in range(len(self.buffers)):
            self.free.put((slot, None))

    def _slot(self, stop: threading.Event | None) -> int:
        """A buffer no batch is using any more (waiting for one to be released)."""
        while True:
            try:
                slot, event = self.free.get(timeout=WAIT)
                break
            except queue.Empty:
                if stop is not None and stop.is_set():
                    raise Stopped from None
        if event is not None:
            event.synchronize()  # the decoder's reads of this buffer are done
        return slot

    def _buffer(self, slot: int, size: int) -> Tensor:
        if self.buffers[slot].numel() < size:
            self.buffers[slot] = torch.empty(int(size * GROWTH), dtype=torch.uint8, pin_memory=self.pin)
        return self.buffers[slot]

    def batch(self, indices: Tensor, plan: CropPlan, stop: threading.Event | None = None) -> FedBatch:
        """The batch of samples `indices` (int64, host) under crop plan `plan`."""
        s = self.samples
        idx = indices.numpy()
        slot = self._slot(stop)
        total = int(s.length[idx].sum())
        buffer = self._buffer(slot, total)
        lengths = torch.from_numpy(s.gather(idx, buffer.numpy()))
        rows = plan.rows(indices, torch.from_numpy(s.heights[idx]), torch.from_numpy(s.widths[idx]))
        labels = torch.from_numpy(s.labels[idx])
        if self.pin:  # so the decoder's copies to the GPU are asynchronous
            rows, labels = rows.pin_memory(), labels.pin_memory()
        return FedBatch(buffer[:total], lengths, labels, indices, rows, slot)

    def release(self, batch: FedBatch, event: torch.cuda.Event | None) -> None:
        """`batch`'s buffer may be refilled once `event` (None: now) has completed."""
        self.free.put((batch.slot, event))


class Stopped(Exception):
    """The consumer stopped while a producer waited."""


def staged(items: Iterable, make: Callable[..., object], depth: int, device: torch.device,
           name: str) -> Iterator:
    """`make(item, stop)` for each of `items`, computed in a background thread up to `depth` results ahead
    of the consumer (on its own CUDA stream on a GPU; the consumer's stream waits for each result's event,
    and its tensors are recorded on the consumer's stream). Errors are raised in the consumer; stopping
    early stops the thread, which `make` can see through the `stop` event it is given."""
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=WAIT)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                for item in items:
                    out = make(item, stop)
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(side)
                    if not put(("item", out, event)):
                        return
        except Stopped:
            return
        except BaseException as e:  # handed to the consumer, which raises it
            put(("error", e, None))
            return
        finally:
            if hasattr(items, "close"):  # a generator's own stage stops with this one
                items.close()
        put(("end", None, None))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            try:
                kind, out, event = ready.get(timeout=WAIT)
            except queue.Empty:
                if not thread.is_alive() and ready.empty():
                    raise RuntimeError(f"the {name} thread ended without a result") from None
                continue
            if kind == "end":
                return
            if kind == "error":
                raise out
            if cuda:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for t in out if isinstance(out, tuple) else ():
                    if isinstance(t, Tensor) and t.is_cuda:
                        t.record_stream(current)
            yield out
    finally:
        stop.set()
        thread.join()

