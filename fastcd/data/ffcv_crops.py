"""FFCV operations that execute fastcd's crops inside FFCV's compiled pipeline (the `ffcv` backend).

`PlannedCropDecoder` replaces FFCV's RandomResizedCrop/CenterCrop decoders. It decodes each JPEG as they
do (libffcv's turbojpeg `imdecode`), then reads the sample's box and flip from a crop table that the loader
rewrites in place before each epoch (`CropTable`: one int32 row x0, y0, w, h, flip per sample, from
`crops.CropPlan`), and resamples the box to res x res:

- **shrinking** on both axes: OpenCV's `INTER_AREA` through libffcv's `resize`, as FFCV does, which averages
  the source pixels each output pixel covers (exact area);
- **enlarging** on either axis: `resample_box` below, separable, area-averaged on an axis that shrinks and
  bilinear (pixel centres, clamped to the box) on an axis that enlarges. FFCV's `INTER_AREA` would enlarge
  nearest-like.

This is the "area" resampling definition (`base.RESAMPLING`), the one the torch backend's device path
executes with `roi_align`. The flip mirrors the resized crop. Everything runs in FFCV's numba threads: no
Python per sample. `PlannedOrder` hands FFCV the epoch's sample order (`sharding.epoch_indices`), so the
batches are those of every other replaying backend.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler
from ffcv.traversal_order.base import TraversalOrder
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

JIT = {"nogil": True, "fastmath": True, "error_model": "numpy"}  # as FFCV's Compiler compiles

COLUMNS = 5  # a crop table row: x0, y0, w, h, flip (crops.ROW's first five)


@intrinsic
def _pointer(typingctx, address):
    """The integer `address` as a void pointer (so compiled code can view memory the loader rewrites)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())
    return types.voidptr(address), codegen


class CropTable:
    """Each sample's crop box and flip for the current epoch, as int32 rows of `COLUMNS`, at a fixed address:
    compiled FFCV code reads it by that address, and the loader rewrites the rows before each epoch."""

    def __init__(self, num_samples: int) -> None:
        self.rows = np.zeros((num_samples, COLUMNS), dtype=np.int32)

    @property
    def address(self) -> int:
        return self.rows.ctypes.data

    def write(self, indices: np.ndarray, boxes: np.ndarray) -> None:
        """Set the rows of samples `indices` from (B, >= 5) float boxes (x0, y0, w, h, flip) in whole pixels."""
        self.rows[indices] = np.rint(boxes[:, :COLUMNS]).astype(np.int32)


@njit(**JIT)
def axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The taps resampling `n_in` pixels to `n_out` on one axis: (n_out,) first source pixel and
    (n_out, K) weights of the K pixels from it (zero-padded). Area-averaged when shrinking (the source
    interval each output pixel covers), bilinear between pixel centres when enlarging (clamped to the box)."""
    scale = n_in / n_out
    taps = int(np.ceil(scale)) + 1 if n_in >= n_out else 2
    first = np.zeros(n_out, dtype=np.int32)
    weights = np.zeros((n_out, taps), dtype=np.float32)
    for i in range(n_out):
        if n_in >= n_out:
            lo, hi = i * scale, (i + 1) * scale
            j0 = int(np.floor(lo))
            for k in range(taps):
                j = j0 + k
                if j < n_in:
                    weights[i, k] = max(0.0, min(hi, j + 1) - max(lo, j)) / scale
        else:
            c = min(max((i + 0.5) * scale - 0.5, 0.0), n_in - 1.0)
            j0 = min(int(np.floor(c)), n_in - 2) if n_in > 1 else 0
            weights[i, 0] = 1.0 - (c - j0) if n_in > 1 else 1.0
            weights[i, 1] = c - j0 if n_in > 1 else 0.0
        first[i] = j0
    return first, weights


@njit(**JIT)
def resample_box(image: np.ndarray, y0: int, x0: int, h: int, w: int, out: np.ndarray, flip: bool) -> None:
    """Resample image[y0:y0+h, x0:x0+w] (uint8 HWC) into `out` (uint8 (R_h, R_w, 3)), separably:
    rows first (`axis_weights` of w -> R_w, mirrored where `flip`), then columns, rounded to uint8."""
    r_h, r_w = out.shape[0], out.shape[1]
    cols, col_w = axis_weights(w, r_w)
    rows, row_w = axis_weights(h, r_h)
    tmp = np.zeros((h, r_w * 3), dtype=np.float32)
    for y in range(h):
        for i in range(r_w):
            t = 3 * (r_w - 1 - i if flip else i)
            for k in range(col_w.shape[1]):
                wt = col_w[i, k]
                x = x0 + cols[i] + k
                if wt != 0.0:
                    for c in range(3):
                        tmp[y, t + c] += wt * np.float32(image[y0 + y, x, c])
    acc = np.empty(r_w * 3, dtype=np.float32)
    for i in range(r_h):
        acc[:] = 0.0
        for k in range(row_w.shape[1]):
            wt = row_w[i, k]
            if wt != 0.0:
                src = tmp[rows[i] + k]
                for j in range(r_w * 3):
                    acc[j] += wt * src[j]
        for j in range(r_w):
            for c in range(3):
                out[i, j, c] = np.uint8(min(max(acc[3 * j + c] + 0.5, 0.0), 255.0))


@njit(**JIT)
def mirror(out: np.ndarray) -> None:
    """Mirror a (R_h, R_w, 3) image left-right in place."""
    r_w = out.shape[1]
    for i in range(out.shape[0]):
        for j in range(r_w // 2):
            for c in range(3):
                out[i, j, c], out[i, r_w - 1 - j, c] = out[i, r_w - 1 - j, c], out[i, j, c]


class PlannedCropDecoder(ResizedCropRGBImageDecoder):
    """FFCV's image decoder executing the boxes and flips of a `CropTable` (see the module docstring)."""

    get_crop_generator = None  # FFCV's crop draw: the boxes come from the table instead

    def __init__(self, output_size: tuple[int, int], table: CropTable) -> None:
        super().__init__(output_size)
        self.table = table

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        area_c = Compiler.compile(resize_crop)
        address, n = self.table.address, len(self.table.rows)
        res_h, res_w = self.output_size

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            table = carray(_pointer(address), (n, COLUMNS), np.int32)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                x0, y0, w, h, flip = table[source_ix]
                out = destination[dst_ix]
                if w >= res_w and h >= res_h:
                    area_c(temp_buffer, y0, y0 + h, x0, x0 + w, out)
                    if flip:
                        mirror(out)
                else:
                    resample_box(temp_buffer, y0, x0, h, w, out, flip != 0)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class PlannedOrder(TraversalOrder):
    """FFCV's traversal order set by the fastcd loader: `indices` is this rank's order of the coming epoch.
    FFCV's `Loader` accepts an order instance and calls it with itself, so `__call__` returns the order."""

    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)

    def __call__(self, loader) -> PlannedOrder:
        return self

    def sample_order(self, epoch: int) -> Sequence[int]:
        return self.indices
