"""An ordered parallel map over spawned worker processes that survives a worker's death or hang.

`multiprocessing.Pool` loses the task of a worker that dies (a decoder's segfault, the OOM killer)
and then waits forever. Here items travel in chunks, each worker holds at most DEPTH chunks and
answers them in order, so the parent knows which chunk a dead or stuck worker was on: it replaces
the worker and runs that chunk's items again one per task; the item that fails alone gets
`Lost(reason)` as its result. Memory stays bounded: at most WINDOW_PER_WORKER chunks per worker
are taken from the input ahead of the next result yielded. Items and functions must pickle; items
should be small (paths, small arrays).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from multiprocessing.connection import Connection, wait
from typing import Any

from fastcd.utils.lifeline import end_with_parent

DEPTH = 2  # chunks sent to a worker at once: one running, one waiting (no idle round trip)
WINDOW_PER_WORKER = 4  # chunks taken from the input per worker ahead of the next result yielded
STOP_SECONDS = 5
START_SECONDS = 120  # for a new worker to start (spawn, imports) before its first chunk's limit applies


@dataclass(frozen=True)
class Lost:
    """Stands in for the result of an item whose worker died or ran past the time limit."""

    reason: str


def _answer(fn: Callable[[Any], Any], item: Any) -> Any:
    try:
        return fn(item)
    except Exception as e:  # one item's failure is that item's result, not the worker's end
        return Lost(f"{type(e).__name__}: {e}")


def _serve(fn: Callable[[Any], Any], conn: Connection) -> None:
    """Worker loop: say it is ready, then answer each chunk of (index, item) with (index, fn(item))
    pairs (Lost when fn raises) until told to stop or the parent is gone."""
    end_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        conn.send(None)  # up and running: the time limit of the first task starts now
        while (task := conn.recv()) is not None:
            conn.send([(index, _answer(fn, item)) for index, item in task])
    except (EOFError, OSError):  # the parent is gone
        return


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exited with status {exitcode}"


class _Worker:
    def __init__(self, ctx, fn: Callable[[Any], Any]):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(fn, child), daemon=True)
        self.proc.start()
        child.close()
        self.tasks: deque[list[tuple[int, Any]]] = deque()  # chunks sent and not answered, in order
        self.since = time.monotonic()  # when the first chunk in `tasks` started
        self.ready = False  # said it has started

    def send(self, chunk: list[tuple[int, Any]]) -> bool:
        """Send `chunk`; False, and nothing recorded, when the worker has died and closed its pipe."""
        try:
            self.conn.send(chunk)
        except OSError:  # BrokenPipeError: it died since it was last collected
            return False
        if not self.tasks:
            self.since = time.monotonic()
        self.tasks.append(chunk)
        return True

    def answers(self) -> Iterator[tuple[int, Any]]:
        """The answers that have arrived (none once the worker is dead and drained)."""
        while self.tasks and self.conn.poll():
            try:
                answer = self.conn.recv()
            except (EOFError, OSError):
                return
            self.since, self.ready = time.monotonic(), True
            if answer is not None:  # None: the worker has started
                self.tasks.popleft()
                yield from answer

    def deadline(self, item_seconds: float) -> float:
        """When the first chunk in `tasks` has run too long (a worker still starting gets START_SECONDS)."""
        return self.since + (item_seconds if self.ready else max(item_seconds, START_SECONDS))

    def stop(self, kill: bool) -> None:
        """End the process: asked to when idle, killed when `kill` (or when it does not stop)."""
        if not kill:
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.proc.join(STOP_SECONDS)
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.conn.close()


class WorkerPool:
    """`workers` spawned processes running `fn`, started on first use; use as a context manager.

    A chunk of `chunksize` items may take `item_seconds`; when it takes longer, or its worker dies,
    its items are run again one by one, each with that limit.
    """

    def __init__(self, fn: Callable[[Any], Any], workers: int, item_seconds: float, chunksize: int = 16):
        self.fn, self.workers, self.item_seconds, self.chunksize = fn, workers, item_seconds, chunksize
        self._ctx = multiprocessing.get_context("spawn")
        self._pool: list[_Worker] = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker."""
        for w in self._pool:
            w.stop(kill=bool(w.tasks))
        self._pool = []

    def _wait(self) -> None:
        """Until a busy worker answers or dies, or the oldest task reaches the time limit."""
        busy = [w for w in self._pool if w.tasks]
        deadline = min(w.deadline(self.item_seconds) for w in busy)
        wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=max(0.0, deadline - time.monotonic()))

    def _collect(self, done: dict[int, Any], retry: deque[list[tuple[int, Any]]]) -> None:
        """Move arrived answers into `done`; replace dead or stuck workers: an item alone in its chunk is
        `Lost`, a larger chunk is split into single items to run again (first), other chunks are resent."""
        for i, w in enumerate(self._pool):
            done.update(w.answers())
            overran = bool(w.tasks) and time.monotonic() > w.deadline(self.item_seconds)
            if not overran and w.proc.is_alive():
                continue
            if w.tasks:
                failed = w.tasks.popleft()
                retry.extend(w.tasks)
                if len(failed) > 1:
                    retry.extendleft([task] for task in reversed(failed))
                else:
                    why = f"took more than {self.item_seconds:g} s" if overran else _death(w.proc.exitcode)
                    done[failed[0][0]] = Lost(f"the worker decoding it {why}")
            w.stop(kill=True)
            self._pool[i] = _Worker(self._ctx, self.fn)

    def map(self, items: Iterable[Any]) -> Iterator[Any]:
        """fn(item) for each item, in order; `Lost(reason)` for an item that killed or stalled its worker."""
        self._pool += [_Worker(self._ctx, self.fn) for _ in range(self.workers - len(self._pool))]
        source, window = enumerate(items), WINDOW_PER_WORKER * self.workers * self.chunksize
        retry: deque[list[tuple[int, Any]]] = deque()
        done: dict[int, Any] = {}
        taken = yielded = 0
        exhausted = False
        try:
            while True:
                dead = False
                for w in self._pool:
                    while len(w.tasks) < DEPTH and (retry or not exhausted and taken < yielded + window):
                        if retry:
                            chunk = retry.popleft()
                        elif chunk := list(islice(source, self.chunksize)):
                            taken += len(chunk)
                        else:
                            exhausted = True
                            break
                        if not w.send(chunk):
                            retry.appendleft(chunk)
                            dead = True
                            break
                if dead:  # replace the dead worker (and take what the others answered) before sending again
                    self._collect(done, retry)
                    continue
                while yielded in done:
                    yield done.pop(yielded)
                    yielded += 1
                if exhausted and yielded == taken:
                    return
                if any(w.tasks for w in self._pool):  # else the yields above made room: send more first
                    self._wait()
                    self._collect(done, retry)
        finally:
            for w in [w for w in self._pool if w.tasks]:  # abandoned mid-way: no stale answers for the next map
                w.stop(kill=True)
                self._pool.remove(w)
