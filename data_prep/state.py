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

from fastcd.data_prep.manifest import MANIFEST_NAME
from fastcd.errors import FastcdError
from fastcd.utils.atomic import atomic_write_json

WORK_DIR = ".prepare"
STATE_VERSION = 2  # the layout of the records; older records are dropped, not misread


def remove_stale_temporaries(out: Path) -> None:
    """Delete temporary files (`.<name>.tmp`) left by a killed run in OUT and its split folders."""
    for folder in [out, *(p for p in out.iterdir() if p.is_dir() and p.name != WORK_DIR)]:
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink()


class RunState:
    """The records of one (possibly resumed) run into `out`."""

    def __init__(self, out: Path, digest: str):
        self.dir = out / WORK_DIR
        plan = self.dir / "plan.json"
        if plan.is_file() and json.loads(plan.read_text()).get("state_version") != STATE_VERSION:
            shutil.rmtree(self.dir)  # written by another fastcd: its outputs are redone
        if plan.is_file() and json.loads(plan.read_text()).get("digest") != digest:
            raise FastcdError(f"{out} holds an unfinished run of `fastcd prepare` with another source or "
                              f"other options; re-run it with the same arguments, or delete {self.dir}")
        if not plan.is_file() and (out / MANIFEST_NAME).is_file():
            raise FastcdError(f"{out} already holds a dataset prepared from another source or with other "
                              f"options; choose an empty OUT or delete {out / MANIFEST_NAME} first")
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
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
