"""The prepared-data manifest: `OUT/manifest.json`, written last, read by every loader.

Layout (format version 2), paths relative to OUT:
`<split>.beton` (FFCV: `image` RGBImageField, `label` IntField) and `<split>/shard-NNNNNN.tar`
webdataset shards (`<key>.jpg`, `<key>.cls`, key = 9-digit global index) each with a DALI index
`<split>/shard-NNNNNN.idx`, and beside them the split's sample table `<split>/samples.npy` (each
sample's shard, JPEG offset and length, label and image size: `sample_table.py`; a folder prepared
before it existed lacks it until `fastcd prepare --upgrade`). Sample i is the same in every format.
Each `.beton`, tar and table has its sha256 and size in bytes in the manifest (version 2 added them
for the `.beton`): opening checks the sizes (a stat per file), `fastcd prepare --verify` the hashes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from fastcd.errors import FastcdError
from fastcd.utils.atomic import atomic_write_json

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"


def manifest_path(out_dir: str | os.PathLike) -> Path:
    """Where the manifest of a prepared dataset lives."""
    return Path(out_dir) / MANIFEST_NAME


def referenced_files(manifest: dict) -> dict[str, int | None]:
    """Every output file the manifest names (relative to OUT), in split order, with its size in bytes
    (None for the DALI indexes, whose size is not recorded)."""
    files: dict[str, int | None] = {}
    for split in manifest["splits"].values():
        if split.get("beton"):
            files[split["beton"]] = split["beton_bytes"]
        for shard in split["shards"]:
            files |= {shard["tar"]: shard["bytes"], shard["index"]: None}
        if "samples" in split:
            files[split["samples"]["file"]] = split["samples"]["bytes"]
    return files


def load_manifest(out_dir: str | os.PathLike) -> dict:
    """Read and check `OUT/manifest.json`: right format version and every referenced file present."""
    path = manifest_path(out_dir)
    if not path.is_file():
        raise FastcdError(f"no prepared dataset at {out_dir}: {path} is missing; "
                          f"run `fastcd prepare SRC {out_dir}` first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FastcdError(f"{path} is not readable JSON ({e}); re-run `fastcd prepare`") from e
    found = manifest.get("format_version") if isinstance(manifest, dict) else None
    if found != FORMAT_VERSION:
        raise FastcdError(f"{path} has format_version {found!r}, this fastcd reads {FORMAT_VERSION}; "
                          f"re-run `fastcd prepare` to rebuild {out_dir}")
    try:
        files = referenced_files(manifest)
    except (KeyError, TypeError, AttributeError) as e:
        raise FastcdError(f"{path} lacks an entry ({e}); re-run `fastcd prepare` to rebuild {out_dir}") from e
    missing = [f for f in files if not (Path(out_dir) / f).is_file()]
    if missing:
        raise FastcdError(f"{out_dir} is incomplete: {len(missing)} file(s) named in {MANIFEST_NAME} are "
                          f"missing (first: {missing[0]}); re-run `fastcd prepare`")
    for name, size in files.items():
        if size is not None and (Path(out_dir) / name).stat().st_size != size:
            raise FastcdError(f"{Path(out_dir) / name} is {(Path(out_dir) / name).stat().st_size} bytes, "
                              f"{MANIFEST_NAME} says {size}: it is damaged; re-run `fastcd prepare` to rebuild it")
    return manifest


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> Path:
    """Write the manifest atomically (the last output of a prepare run)."""
    path = manifest_path(out_dir)
    atomic_write_json(path, manifest)
    return path
