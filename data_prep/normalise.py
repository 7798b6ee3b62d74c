"""Turn one source image into an RGB baseline JPEG within `max_side`, decoding it at most once.

A baseline RGB JPEG that already fits (no EXIF rotation) passes through byte for byte; it is
still decoded once (at 1/8 scale, which reads every coefficient) so truncated files are caught.
Anything else that Pillow can read is decoded, rotated, converted to RGB (high-bit-depth values
scaled to 8 bits), shrunk and re-encoded. Whatever goes wrong with one file — not a regular file,
unreadable, any exception from a decoder — skips that file with the reason; it never ends the run.
Runs in worker processes: everything here is a plain function of its arguments.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# Pillow's decompression-bomb threshold: above it an image counts as "very large" (repaired, shrunk).
LARGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# Above this we do not even try (a 1.4-gigapixel image is not a training sample).
MAX_PIXELS = 16 * LARGE_PIXELS
# Nor do we read a file larger than this into a worker's memory.
MAX_FILE_BYTES = 1 << 30
# Single-band modes wider than 8 bits and the value that maps to 255 (Pillow widens 16-bit PGM,
# TIFF and PNG samples to I;16* or I; float images are taken to span 0..1).
WIDE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}
FILE_KINDS = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket",
              stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}


@dataclass(frozen=True)
class Normalised:
    """The outcome for one sample: JPEG bytes and size, or None with the reason it was skipped."""

    jpeg: bytes | None
    width: int = 0
    height: int = 0
    outcome: str = "skipped"  # passed | encoded | resized | repaired | skipped
    note: str = ""  # what was repaired, or why it was skipped
    source_sha256: str = ""  # of the source's bytes as read ("" when unreadable): `prepare --rehash` compares it


class Unscalable(ValueError):
    """Pixel values with no known mapping to 8 bits."""


def _skipped(reason: str) -> Normalised:
    return Normalised(None, note=reason)


@contextlib.contextmanager
def _decoding() -> Iterator[None]:
    """Large images allowed up to MAX_PIXELS; decoder warnings (e.g. corrupt EXIF) kept off the terminal."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = size
    scale = max_side / max(w, h)
    return (max(1, round(w * scale)), max(1, round(h * scale))) if scale < 1 else (w, h)


def _defects(img: Image.Image, name: str) -> list[str]:
    """What keeps this image from passing through: each entry says what will be done."""
    found = []
    if img.format != "JPEG":
        suffix = Path(name).suffix
        named_right = Image.registered_extensions().get(suffix.lower()) == img.format
        found.append(f"{img.format} -> JPEG" if named_right else
                     f"{img.format or 'unknown'} data in {suffix or 'a file without extension'} -> JPEG")
    if img.mode in WIDE_MODES:
        found.append(f"{img.mode} -> RGB (values 0..{WIDE_MODES[img.mode]} scaled to 0..255)")
    elif img.mode != "RGB":
        found.append(f"{img.mode} -> RGB")
    if img.format == "JPEG" and (img.info.get("progressive") or img.info.get("progression")):
        found.append("progressive -> baseline")
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation not in (0, 1):
        found.append(f"EXIF orientation {orientation} applied")
    if img.width * img.height > LARGE_PIXELS:
        found.append(f"very large {img.width}x{img.height}")
    if getattr(img, "is_animated", False):
        found.append(f"first of {img.n_frames} frames kept")
    return found


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with every value scaled, never clipped: Pillow's own conversion of I;16, I and F clips at 255."""
    top = WIDE_MODES.get(img.mode)
    if top is not None:
        values = np.asarray(img)
        lo, hi = (values.min(), values.max()) if values.size else (0, 0)
        if not (np.isfinite(lo) and np.isfinite(hi) and 0 <= lo and hi <= top):
            raise Unscalable(f"{img.mode} values {lo}..{hi} are outside 0..{top}, no known scale to 8 bits")
        img = Image.fromarray(np.rint(values.astype(np.float64) * (255 / top)).astype(np.uint8), "L")
    elif "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _normalise(data: bytes, name: str, max_side: int, quality: int) -> Normalised:
    img = Image.open(io.BytesIO(data))
    defects = _defects(img, name)
    target = _fit(img.size, max_side)
    if not defects and target == img.size:
        img.draft(None, (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
        return Normalised(data, *target, outcome="passed")
    if img.format == "JPEG":
        img.draft(None, target)
    img.load()
    img = _to_rgb(ImageOps.exif_transpose(img))
    target = _fit(img.size, max_side)
    if img.size != target:
        img = img.resize(target, Image.Resampling.BOX)  # area average, as ffcv (cv2.INTER_AREA)
    outcome = "repaired" if defects else "resized"
    return Normalised(_encode(img, quality), *img.size, outcome=outcome, note="; ".join(defects))


def normalise_bytes(data: bytes, name: str, max_side: int, quality: int) -> Normalised:
    """Normalise the encoded image `data` (from the file `name`, used in messages only).

    Any exception while decoding, converting or encoding skips this one image, with the reason.
    """
    if not data:
        return _skipped("zero-byte file")
    with _decoding():
        try:
            return _normalise(data, name, max_side, quality)
        except UnidentifiedImageError:
            return _skipped("not an image file")
        except Image.DecompressionBombError:
            return _skipped(f"image larger than {MAX_PIXELS} pixels")
        except Unscalable as e:
            return _skipped(str(e))
        except Exception as e:  # a decoder may raise anything on hostile input
            return _skipped(f"truncated or corrupt image data ({type(e).__name__}: {e})")


def _read(path: str) -> bytes | str:
    """The bytes of a regular file, or why they were not read. Nothing else is opened (a FIFO would block)."""
    try:
        info = os.stat(path)
        kind = next((k for test, k in FILE_KINDS.items() if test(info.st_mode)), None)
        if kind is None and info.st_size > MAX_FILE_BYTES:
            return f"file of {info.st_size} bytes, more than the {MAX_FILE_BYTES} read for one image"
        if kind is None:
            with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
                now = os.fstat(f.fileno())
                if stat.S_ISREG(now.st_mode):  # still the file seen by stat
                    # sized by the file: a read of MAX_FILE_BYTES + 1 allocates (maps and unmaps) a 1 GiB buffer
                    # for each file, 35 µs of the 60 a small file takes to hash
                    return f.read(min(now.st_size, MAX_FILE_BYTES) + 1)
        return f"not a regular file ({kind or 'replaced while being read'})"
    except OSError as e:
        return f"cannot read file ({e.strerror})"


def source_sha256(item: str | np.ndarray) -> str:
    """The sha256 of a source item's bytes as `normalise_item` reads them ("" for a file that cannot be read)."""
    data = item.tobytes() if isinstance(item, np.ndarray) else _read(item)
    return "" if isinstance(data, str) else hashlib.sha256(data).hexdigest()


def normalise_file(path: str, max_side: int, quality: int) -> Normalised:
    """Read and normalise one image file; unreadable files are skipped with the reason."""
    data = _read(path)
    if isinstance(data, str):
        return _skipped(data)
    return replace(normalise_bytes(data, path, max_side, quality), source_sha256=hashlib.sha256(data).hexdigest())


def normalise_pixels(pixels: np.ndarray, max_side: int, quality: int) -> Normalised:
    """Encode a uint8 greyscale (HxW) or RGB (HxWx3) array as an RGB JPEG within `max_side`."""
    img = Image.fromarray(pixels).convert("RGB")
    target = _fit(img.size, max_side)
    if img.size != target:
        img = img.resize(target, Image.Resampling.BOX)
    return Normalised(_encode(img, quality), *img.size, outcome="encoded")


def normalise_item(item: str | np.ndarray, max_side: int, quality: int) -> Normalised:
    """Worker entry point: a file path or a pixel array."""
    if isinstance(item, np.ndarray):
        return replace(normalise_pixels(item, max_side, quality), source_sha256=source_sha256(item))
    return normalise_file(item, max_side, quality)
