"""Labels of a flat validation folder, read from a file of (file name, class) rows.

Accepted layouts, comma- or whitespace-separated, with or without a header row:
- `ILSVRC2012_val_00000001.JPEG,n01751748` (file name, class name), or the class as an integer
  index into the sorted class names (caffe-style `val.txt`, derived from ImageNet's devkit);
- Kaggle's `LOC_val_solution.csv`: `ImageId,PredictionString`, the class being the first token
  of PredictionString and ImageId the file name without its extension.
Rows are matched to files by full name or by name without extension.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from fastcd.errors import FastcdError

HEADER_WORDS = {"imageid", "image", "file", "filename", "file_name", "name", "path"}


def _rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and "," in lines[0]:
        return [[c.strip() for c in row] for row in csv.reader(io.StringIO("\n".join(lines)))]
    return [line.split(maxsplit=1) for line in lines]


def read_labels(path: str | Path, classes: list[str] | None = None) -> dict[str, str]:
    """Map file name (and file stem) -> class name. Integer classes index `classes` when given."""
    path = Path(path)
    try:
        rows = _rows(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise FastcdError(f"cannot read labels file {path}: {e}") from e
    if rows and rows[0][0].strip().lower() in HEADER_WORDS:
        rows = rows[1:]
    out: dict[str, str] = {}
    for line_no, row in enumerate(rows, 1):
        if len(row) < 2 or not row[1].split():
            raise FastcdError(f"{path}: row {line_no} {row!r} is not 'file name, class name' "
                              f"(or LOC_val_solution's 'ImageId,PredictionString')")
        name, cls = row[0], row[1].split()[0]
        if cls.isdigit() and classes is not None and cls not in classes:
            if int(cls) >= len(classes):
                raise FastcdError(f"{path}: row {line_no} has class index {cls}, but there are "
                                  f"{len(classes)} classes")
            cls = classes[int(cls)]
        out[name] = cls
        out.setdefault(Path(name).stem, cls)
    if not out:
        raise FastcdError(f"labels file {path} has no rows")
    return out


def label_for(file_name: str, labels: dict[str, str]) -> str | None:
    """The class of `file_name` (matched by name, then by name without extension), or None."""
    return labels.get(file_name) or labels.get(Path(file_name).stem)
