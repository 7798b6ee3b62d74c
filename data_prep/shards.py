"""Webdataset tar shards with their DALI index, written in one pass.

A shard holds, per sample, `<key>.jpg` then `<key>.cls` (key = 9-digit global index). Tar headers
are fixed (mtime 0, uid/gid 0, mode 0644) so the same samples give byte-identical shards. The
index is the text format of DALI's `wds2idx` tool, version "v1.2": a line `v1.2 <samples>`, then
one line per sample listing each member as `<ext> <data offset> <size> <member name>`.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

INDEX_VERSION = "v1.2"
BLOCK = 512
KEY_DIGITS = 9


def sample_key(index: int) -> str:
    """The webdataset key of the sample with global index `index` in its split."""
    return f"{index:0{KEY_DIGITS}d}"


def shard_name(shard: int) -> str:
    """File stem of shard number `shard`."""
    return f"shard-{shard:06d}"


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.USTAR_FORMAT)


@dataclass
class IndexEntry:
    """Where one member of a sample lies in its tar."""

    ext: str
    offset: int
    size: int
    name: str


class ShardWriter:
    """Write one shard's tar and DALI index to the given (temporary) paths, hashing the tar as it goes."""

    def __init__(self, tar_path: Path, index_path: Path):
        self._tar = open(tar_path, "wb")
        self._index_path = index_path
        self._lines: list[str] = []
        self._offset = 0
        self._sha = hashlib.sha256()

    def _write(self, data: bytes) -> None:
        self._tar.write(data)
        self._sha.update(data)
        self._offset += len(data)

    def _member(self, name: str, data: bytes) -> IndexEntry:
        self._write(_tar_header(name, len(data)))
        entry = IndexEntry(name.rsplit(".", 1)[1], self._offset, len(data), name)
        self._write(data)
        self._write(b"\0" * (-len(data) % BLOCK))
        return entry

    def add(self, key: str, jpeg: bytes, label: int) -> None:
        """Append one sample: its JPEG bytes and its label."""
        members = [self._member(f"{key}.jpg", jpeg), self._member(f"{key}.cls", str(label).encode())]
        self._lines.append(" ".join(f"{m.ext} {m.offset} {m.size} {m.name}" for m in members))

    @property
    def num_samples(self) -> int:
        return len(self._lines)

    def close(self) -> dict:
        """Finish the tar (two zero blocks), fsync both files; return the tar's `sha256` and size in
        `bytes`, and the index's `index_sha256`."""
        self._write(b"\0" * (2 * BLOCK))
        self._tar.flush()
        os.fsync(self._tar.fileno())
        self._tar.close()
        text = (f"{INDEX_VERSION} {len(self._lines)}\n" + "".join(line + "\n" for line in self._lines)).encode()
        with open(self._index_path, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return {"sha256": self._sha.hexdigest(), "bytes": self._offset,
                "index_sha256": hashlib.sha256(text).hexdigest()}

    def abort(self) -> None:
        """Close without finishing (the caller removes the temporary files)."""
        self._tar.close()


def read_index(index_path: str | os.PathLike) -> list[dict[str, IndexEntry]]:
    """Parse a DALI webdataset index: per sample, extension -> member location."""
    lines = Path(index_path).read_text().splitlines()
    version, count = lines[0].split()
    if version != INDEX_VERSION or int(count) != len(lines) - 1:
        raise ValueError(f"{index_path}: header {lines[0]!r} does not match {len(lines) - 1} sample lines")
    samples = []
    for line in lines[1:]:
        parts = line.split()
        entries = [IndexEntry(parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3])
                   for i in range(0, len(parts), 4)]
        samples.append({e.ext: e for e in entries})
    return samples


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()
