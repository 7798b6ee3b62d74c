"""Generated ImageNet-layout trees for the data_prep tests: random good JPEGs plus every kind of bad file."""
from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import numpy as np
from PIL import Image

# file name -> (expected outcome, text expected in the manifest's action/reason)
BAD_FILES = {
    "cmyk.JPEG": ("repaired", "CMYK -> RGB"),
    "grey.JPEG": ("repaired", "L -> RGB"),
    "png.JPEG": ("repaired", "PNG data"),
    "exif.JPEG": ("repaired", "EXIF orientation 6"),
    "progressive.JPEG": ("repaired", "progressive -> baseline"),
    "huge.JPEG": ("repaired", "very large"),
    "truncated.JPEG": ("skipped", "truncated"),
    "cut-in-header.JPEG": ("skipped", "truncated or corrupt image data (OSError"),
    "ramp16.png": ("repaired", "I;16 -> RGB (values 0..65535 scaled to 0..255)"),
    "fifo.JPEG": ("skipped", "not a regular file (a FIFO)"),
    "oversized.JPEG": ("skipped", "more than the"),
    "empty.JPEG": ("skipped", "zero-byte"),
    "notes.txt": ("skipped", "not an image"),
}


def random_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Blocky random colours (compresses like a photo, unlike white noise)."""
    block = int(rng.integers(4, 16))
    cells = rng.integers(0, 256, (height // block + 1, width // block + 1, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(cells, np.ones((block, block, 1), np.uint8))[:height, :width])


def jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85, **kwargs)
    return buf.getvalue()


def ramp16_png() -> bytes:
    """A 16-bit greyscale PNG (Pillow mode I;16): a horizontal ramp over 0..65535."""
    buf = io.BytesIO()
    ramp = np.rint(np.tile(np.linspace(0, 1, 90), (60, 1)) * 65535).astype("<u2")
    Image.frombytes("I;16", (90, 60), ramp.tobytes()).save(buf, format="PNG")
    return buf.getvalue()


def write_bad_files(folder: Path, rng: np.random.Generator, huge: bytes) -> None:
    """Write every kind of bad file of BAD_FILES into `folder` (the FIFO as a FIFO, `oversized.JPEG`
    as a sparse file of more than 1 GiB)."""
    img = random_image(rng, 90, 60)
    exif = Image.Exif()
    exif[0x0112] = 6
    good = jpeg_bytes(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    contents = {
        "cmyk.JPEG": jpeg_bytes(img.convert("CMYK")),
        "grey.JPEG": jpeg_bytes(img.convert("L")),
        "png.JPEG": buf.getvalue(),
        "exif.JPEG": jpeg_bytes(img, exif=exif),
        "progressive.JPEG": jpeg_bytes(img, progressive=True),
        "huge.JPEG": huge,
        "truncated.JPEG": good[: len(good) * 2 // 3],
        "cut-in-header.JPEG": good[:300],
        "ramp16.png": ramp16_png(),
        "empty.JPEG": b"",
        "notes.txt": b"this folder holds pictures of ants\n",
    }
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    os.mkfifo(folder / "fifo.JPEG")
    with open(folder / "oversized.JPEG", "wb") as f:
        f.write(good)
        f.truncate((1 << 30) + 1)


def huge_jpeg() -> bytes:
    """A JPEG above Pillow's decompression-bomb threshold (9500 x 9500), cheap to encode: one colour."""
    return jpeg_bytes(Image.new("RGB", (9500, 9500), (40, 120, 200)))


def make_tree(root: Path, rng: np.random.Generator, classes: list[str], per_class: int, max_side: int,
              splits: tuple[str, ...] = ("train", "val")) -> dict[str, list[tuple[str, int]]]:
    """Good random JPEGs (some larger than `max_side`) in SRC/<split>/<class>/; returns (relative path, label)
    per split in the expected sample order (sorted classes, sorted files)."""
    expected: dict[str, list[tuple[str, int]]] = {}
    for split in splits:
        expected[split] = []
        for label, cls in enumerate(sorted(classes)):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                w, h = (int(v) for v in rng.integers(24, int(max_side * 1.5), 2))
                name = f"img_{rng.integers(1 << 30):010d}_{i}.JPEG"
                (folder / name).write_bytes(jpeg_bytes(random_image(rng, w, h)))
            expected[split] += [(f"{split}/{cls}/{n}", label) for n in sorted(p.name for p in folder.iterdir())]
    return expected


def doubled_unless_poisoned(x: int) -> int:
    """For the worker-pool test: 2x, but item 3 kills its process, item 5 hangs and item 7 raises."""
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    if x == 5:
        time.sleep(3600)
    if x == 7:
        raise ValueError("seven")
    return 2 * x
