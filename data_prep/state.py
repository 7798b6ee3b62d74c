"""Bookkeeping that lets an interrupted `fastcd prepare` resume: `OUT/.prepare/`.

`plan.json` holds the digest of the source listing and the output-affecting options, and the
layout version of the records; each finished shard and `.beton` leaves a small JSON record,
written after its files were renamed into place. A re-run with the same digest keeps exactly the
recorded outputs (records of another layout version are dropped: those outputs are redone); the
folder is removed once the manifest is written.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from fastcd.errors import FastcdError
from fastcd.utils.atomic import atomic_write_json

WORK_DIR = ".prepare"
PLAN_NAME = "plan.json"
# The layout of the records (3: a shard records its sources' sha256); older records are dropped, not misread.
STATE_VERSION = 3


def remove_stale_temporaries(out: Path, splits: list[str]) -> None:
    """Delete temporary files (`.<name>.tmp`) left by a killed run in OUT and in its split folders
    (only the folders prepare writes: OUT may hold other things)."""
    for folder in [out, *(out / s for s in splits)]:
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink()


def unfinished(out: Path) -> bool:
    """Whether OUT holds the plan of a run that has not finished."""
    return (out / WORK_DIR / PLAN_NAME).is_file()


class RunState:
    """The records of one (possibly resumed) run into `out`."""

    def __init__(self, out: Path, digest: str, splits: list[str]):
        self.dir = out / WORK_DIR
        plan = self.dir / PLAN_NAME
        if plan.is_file() and json.loads(plan.read_text()).get("state_version") != STATE_VERSION:
            shutil.rmtree(self.dir)  # written by another fastcd: its outputs are redone
        if plan.is_file() and json.loads(plan.read_text()).get("digest") != digest:
            raise FastcdError(f"{out} holds an unfinished run of `fastcd prepare` with another source or "
                              f"other options; re-run it with the same arguments, or delete {self.dir}")
        remove_stale_temporaries(out, splits)
        if self.dir.is_dir():
            for tmp in self.dir.rglob(".*.tmp"):
                tmp.unlink()
        atomic_write_json(plan, {"digest": digest, "state_version": STATE_VERSION})

    def staging(self, split: str) -> Path:
        """Where shards go when the DALI format was not asked for (removed at the end)."""
        return self.dir / "staging" / split

    def _record(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def load(self, name: str, *files: Path) -> dict | None:
        """The record `name` if it exists and every file it vouches for is present, else None."""
        path = self._record(name)
        if not path.is_file() or not all(f.is_file() for f in files):
            return None
        return json.loads(path.read_text())

    def save(self, name: str, record: dict) -> None:
        atomic_write_json(self._record(name), record)

    def finish(self) -> None:
        """Remove the run's bookkeeping (and any staged shards): the manifest now describes OUT."""
        shutil.rmtree(self.dir)
