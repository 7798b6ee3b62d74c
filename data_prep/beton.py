"""Write a split's `.beton` through ffcv's DatasetWriter, from the split's finished shards.

ffcv's `RGBImageField.encode` only takes pixel arrays and re-encodes them. Our images are already
RGB baseline JPEGs within the size bound, so in `jpg` write mode the field stores those bytes as
they are (the on-disk record is exactly RGBImageField's `jpg` record, read back by ffcv's stock
decoders). The other write modes (raw, smart, proportion) decode the JPEG and use ffcv's encoder.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fastcd.data_prep.sample_table import HEIGHT, LABEL, LENGTH, OFFSET, SHARD, WIDTH

WRITE_MODES = ("jpg", "raw", "smart", "proportion")


@dataclass(frozen=True)
class EncodedJPEG:
    """JPEG bytes with their pixel size, handed to the image field as they are."""

    data: np.ndarray  # uint8
    width: int
    height: int


def _encode(field, destination, image, malloc) -> None:
    from ffcv.fields.rgb_image import IMAGE_MODES, RGBImageField

    if not isinstance(image, EncodedJPEG):
        RGBImageField.encode(field, destination, image, malloc)
        return
    destination["mode"] = IMAGE_MODES["jpg"]
    destination["height"], destination["width"] = image.height, image.width
    destination["data_ptr"], storage = malloc(image.data.nbytes)
    storage[:] = image.data


def image_field(write_mode: str, max_side: int, jpeg_quality: int, compress_probability: float):
    """An ffcv RGBImageField that also accepts `EncodedJPEG` samples (stored without re-encoding).

    The override sits on the instance, so ffcv records the field as a plain RGBImageField.
    """
    from ffcv.fields import RGBImageField

    field = RGBImageField(write_mode=write_mode, max_resolution=max_side, jpeg_quality=jpeg_quality,
                          compress_probability=compress_probability)
    field.encode = functools.partial(_encode, field)
    return field


class ShardSamples:
    """The samples of a split's shards as an indexable dataset of (image, label) for ffcv's writer, located and
    labelled by the split's sample table (`sample_table.COLUMNS`: no index, label or JPEG header is parsed per
    sample, and nothing is held per sample but the table's row).

    JPEGs are read with `os.pread` on descriptors opened lazily in each process (ffcv's writer may fork or
    spawn its workers).
    """

    def __init__(self, tars: list[Path], table: np.ndarray, pass_through: bool):
        self.pass_through = pass_through
        self.tars = [str(tar) for tar in tars]
        self.rows = table
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.rows)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked copy: the parent's descriptors are not ours to keep
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            self._fds[shard] = os.open(self.tars[shard], os.O_RDONLY)
        return self._fds[shard]

    def __getitem__(self, i: int):
        shard, offset, length, label, height, width = (int(self.rows[i, c]) for c in (SHARD, OFFSET, LENGTH, LABEL,
                                                                                     HEIGHT, WIDTH))
        data = os.pread(self._fd(shard), length, offset)
        if self.pass_through:
            return EncodedJPEG(np.frombuffer(data, np.uint8), width, height), label
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), label

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}

    def close(self) -> None:
        """Close this process's descriptors."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


@contextlib.contextmanager
def _ffcv_progress(desc: str, shown: bool) -> Iterator[None]:
    """ffcv's DatasetWriter draws a tqdm bar (`ffcv.writer.tqdm`) and has no option to hide it: while
    the block runs, that name is a tqdm with our description, disabled unless `shown`."""
    import ffcv.writer

    real = ffcv.writer.tqdm
    ffcv.writer.tqdm = functools.partial(real, desc=desc, unit="img", disable=not shown)
    try:
        yield
    finally:
        ffcv.writer.tqdm = real


def write_beton(path: Path, tars: list[Path], table: np.ndarray, *, write_mode: str, max_side: int,
                jpeg_quality: int, compress_probability: float, workers: int, progress: bool = True,
                desc: str = "beton") -> int:
    """Write `path` (a temporary name; the caller renames it) from the shards `tars` and their sample `table`;
    return the sample count. `progress` shows ffcv's progress bar, labelled `desc`."""
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    dataset = ShardSamples(tars, table, pass_through=write_mode == "jpg")
    try:
        fields = {"image": image_field(write_mode, max_side, jpeg_quality, compress_probability),
                  "label": IntField()}
        with _ffcv_progress(desc, progress):
            DatasetWriter(str(path), fields, num_workers=workers).from_indexed_dataset(dataset, chunksize=256)
    finally:
        dataset.close()
    return len(dataset)
