"""An ImageNet-shaped source tree of tiny JPEGs, for the full-size rehearsal (`bench/scale.py`).

`SRC/train/<synset>/<synset>_<k>.JPEG` in 1,000 class folders of 732 to 1,300 images (1,281,167 in all at
full size, as ImageNet's train set), a flat `SRC/val/` of `ILSVRC2012_val_<k>.JPEG` (50,000) and
`SRC/LOC_val_solution.csv` labelling it, as the Kaggle download has them. A fraction scales every class (at
least one image each) and the val set. Images are 32-64 px, a few hundred bytes to 2 KB, each distinct; ImageNet's
odd files are there too: about 1% greyscale, CMYK files (22 at full size, as in ImageNet's train set), one PNG
named .JPEG and one truncated JPEG. Generated in chunks by every core, deterministic in (fraction, seed), and
reused when complete.
"""
from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from fastcd.utils.lifeline import end_with_parent

TRAIN_IMAGES = 1_281_167
VAL_IMAGES = 50_000
CLASSES = 1000
FEWEST, MOST = 732, 1300  # images per class in ImageNet's train set
CMYK_FILES = 22
GREY_SHARE = 0.01
CHUNK = 2000  # images per generation task


@dataclass(frozen=True)
class Layout:
    """Where each image of a generated source goes: class names, per-class counts and val labels."""

    synsets: list[str]
    counts: np.ndarray  # train images per class
    val_labels: np.ndarray  # class index of each val image

    @property
    def train_images(self) -> int:
        return int(self.counts.sum())


def layout(fraction: float, seed: int = 0) -> Layout:
    """The classes and counts of a source at `fraction` of ImageNet's size (1.0: 1,281,167 + 50,000)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction}: must be in (0, 1]")
    rng = np.random.default_rng([seed, 1])
    numbers = rng.choice(10**7, CLASSES, replace=False) + 10**6
    synsets = [f"n{n:08d}" for n in sorted(numbers)]
    full = np.full(CLASSES, MOST)  # ImageNet: most classes have 1,300, about a tenth fewer, down to 732
    short = rng.choice(CLASSES, 104, replace=False)
    missing = CLASSES * MOST - TRAIN_IMAGES
    deficit = rng.uniform(1, MOST - FEWEST, len(short) - 1)
    deficit = np.floor(deficit / deficit.sum() * (missing - (MOST - FEWEST))).astype(int)
    deficit[0] += missing - (MOST - FEWEST) - deficit.sum()  # exact total
    full[short] -= np.concatenate([[MOST - FEWEST], deficit])
    counts = np.maximum(1, np.round(full * fraction)).astype(int)
    val = max(1, round(VAL_IMAGES * fraction))
    return Layout(synsets, counts, rng.integers(0, CLASSES, val))


def _image(rng: np.random.Generator, mode: str) -> bytes:
    """One distinct 32-64 px image: a smooth colour field with noise, as a JPEG (or a PNG) in `mode`."""
    h, w = (int(v) for v in rng.integers(32, 65, 2))
    coarse = rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR), np.int16)
    img = Image.fromarray(np.clip(img + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8))
    out = io.BytesIO()
    if mode == "PNG":
        img.save(out, format="PNG")
    else:
        img.convert(mode).save(out, format="JPEG", quality=int(rng.integers(70, 91)))
    return out.getvalue()


def _write_chunk(task: tuple[str, int, list[tuple[str, str]]]) -> int:
    """Write one chunk of (path, mode) images; `mode` RGB, L, CMYK, PNG or TRUNCATED."""
    root, task_id, items = task
    rng = np.random.default_rng([task_id, 7])
    for rel, mode in items:
        data = _image(rng, "RGB" if mode == "TRUNCATED" else mode)
        if mode == "TRUNCATED":
            data = data[: len(data) // 2]
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    return len(items)


def _modes(n: int, cmyk: int, rng: np.random.Generator, odd: bool) -> list[str]:
    modes = np.where(rng.random(n) < GREY_SHARE, "L", "RGB").astype(object)
    special = rng.choice(n, min(n, cmyk + 2 * odd), replace=False)
    modes[special[:cmyk]] = "CMYK"
    if odd and len(special) > cmyk + 1:
        modes[special[cmyk]], modes[special[cmyk + 1]] = "PNG", "TRUNCATED"
    return list(modes)


def generate(root: Path, fraction: float, workers: int, seed: int = 0, progress: bool = True) -> Layout:
    """Write the source at `fraction` into `root` (reused when a complete one with the same arguments is there)."""
    lay = layout(fraction, seed)
    stamp = root / f".complete-{fraction}-{seed}"
    if stamp.is_file():
        return lay
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng([seed, 2])
    items: list[tuple[str, str]] = []
    modes = iter(_modes(lay.train_images, max(1, round(CMYK_FILES * fraction)), rng, odd=True))
    for synset, count in zip(lay.synsets, lay.counts):
        (root / "train" / synset).mkdir(parents=True)
        numbers = rng.choice(max(2 * int(count), 20_000), int(count), replace=False) + 1
        items += [(f"train/{synset}/{synset}_{k}.JPEG", next(modes)) for k in numbers]
    (root / "val").mkdir()
    val_names = [f"ILSVRC2012_val_{k:08d}" for k in range(1, len(lay.val_labels) + 1)]
    items += [(f"val/{name}.JPEG", m) for name, m in zip(val_names, _modes(len(val_names), 0, rng, odd=False))]
    rows = [f"{name},{lay.synsets[c]} 1 1 31 31" for name, c in zip(val_names, lay.val_labels)]
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    tasks = [(str(root), seed * 100_003 + i, items[i * CHUNK:(i + 1) * CHUNK]) for i in range(-(-len(items) // CHUNK))]
    from tqdm import tqdm

    with (get_context("fork").Pool(workers, initializer=end_with_parent) as pool,
          tqdm(total=len(items), unit="img", desc="generate", disable=not progress) as bar):
        for n in pool.imap_unordered(_write_chunk, tasks):
            bar.update(n)
        pool.close()  # the workers exit by themselves: the pool's exit would terminate them (SIGTERM)
        pool.join()
    stamp.touch()
    return lay
