"""Turn one source image into an RGB baseline JPEG within `max_side`, decoding it at most once.

A baseline RGB JPEG that already fits (no EXIF rotation) passes through byte for byte; it is
still decoded once (at 1/8 scale, which reads every coefficient) so truncated files are caught.
Anything else that Pillow can read is decoded, rotated, converted to RGB, shrunk and re-encoded.
Runs in worker processes: everything here is a plain function of its arguments.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# Pillow's decompression-bomb threshold: above it an image counts as "very large" (repaired, shrunk).
LARGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# Above this we do not even try (a 1.4-gigapixel image is not a training sample).
MAX_PIXELS = 16 * LARGE_PIXELS


@dataclass(frozen=True)
class Normalised:
    """The outcome for one sample: JPEG bytes and size, or None with the reason it was skipped."""

    jpeg: bytes | None
    width: int = 0
    height: int = 0
    outcome: str = "skipped"  # passed | encoded | resized | repaired | skipped
    note: str = ""  # what was repaired, or why it was skipped


def _skipped(reason: str) -> Normalised:
    return Normalised(None, note=reason)


@contextlib.contextmanager
def _large_images_allowed() -> Iterator[None]:
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
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
        found.append(f"{img.format or 'unknown'} data in {Path(name).suffix or 'a file'} -> JPEG")
    if img.mode != "RGB":
        found.append(f"{img.mode} -> RGB")
    if img.format == "JPEG" and (img.info.get("progressive") or img.info.get("progression")):
        found.append("progressive -> baseline")
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation not in (0, 1):
        found.append(f"EXIF orientation {orientation} applied")
    if img.width * img.height > LARGE_PIXELS:
        found.append(f"very large {img.width}x{img.height}")
    return found


def normalise_bytes(data: bytes, name: str, max_side: int, quality: int) -> Normalised:
    """Normalise the encoded image `data` (from the file `name`, used in messages only)."""
    if not data:
        return _skipped("zero-byte file")
    with _large_images_allowed():
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            return _skipped("not an image file")
        except Image.DecompressionBombError:
            return _skipped(f"image larger than {MAX_PIXELS} pixels")
        defects = _defects(img, name)
        target = _fit(img.size, max_side)
        try:
            if not defects and target == img.size:
                img.draft(None, (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
                return Normalised(data, *target, outcome="passed")
            if img.format == "JPEG":
                img.draft(None, target)
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode != "RGB":
                img = img.convert("RGBA" if "transparency" in img.info else img.mode).convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:
            return _skipped(f"truncated or corrupt image data ({e})")
    target = _fit(img.size, max_side)
    if img.size != target:
        img = img.resize(target, Image.Resampling.BOX)  # area average, as ffcv (cv2.INTER_AREA)
    outcome = "repaired" if defects else "resized"
    return Normalised(_encode(img, quality), *img.size, outcome=outcome, note="; ".join(defects))


def normalise_file(path: str, max_side: int, quality: int) -> Normalised:
    """Read and normalise one image file; unreadable files are skipped with the reason."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return _skipped(f"cannot read file ({e.strerror})")
    return normalise_bytes(data, path, max_side, quality)


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
        return normalise_pixels(item, max_side, quality)
    return normalise_file(item, max_side, quality)
