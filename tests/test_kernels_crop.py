"""The batched crop kernel (Triton; the interpreter on a CPU) against a float64 `roi_align` reference:
odd image sizes, flips, whole and tiny boxes, three output dtypes; and the eager path against
torchvision's per-image antialiased `resized_crop`, the filter the CPU workers use."""
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from fastcd.data.crops import CropPlan
from fastcd.data.transforms import normalize, resized_crops, resized_crops_eager
from fastcd.kernels.crop_triton import crop_resize_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}  # normalised units (~0.02 level fp32)


def batch(sizes, res, train=True, seed=None):
    """Random uint8 images and their meta rows (box, flip, size) from a CropPlan."""
    seed = int(torch.randint(0, 2**31, ())) if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g).to(DEVICE) for h, w in sizes]
    plan = CropPlan(train, res, 0.08, 0.875, seed, 3)
    heights, widths = torch.tensor(sizes).unbind(1)
    return images, plan.rows(range(len(sizes)), heights, widths).to(DEVICE)


def reference(images, meta, res):
    return normalize(resized_crops_eager([im.cpu() for im in images], meta.cpu(), res, torch.float64),
                     MEAN, STD, torch.float64, False)


@pytest.mark.parametrize("dtype", list(ATOL))
@pytest.mark.parametrize("res,train", [(13, True), (32, True), (24, False)])
def test_crop_kernel_matches_float64_roi_align(dtype, res, train):
    sizes = [(37, 53), (20, 11), (64, 40), (9, 9), (1, 5), (130, 70)]
    images, meta = batch(sizes, res, train)
    meta[1, 4], meta[2, 4] = 1.0, 0.0  # a flipped and an unflipped image whatever the draw
    got = crop_resize_triton(images, meta, res, MEAN, STD, dtype)
    assert got.shape == (len(sizes), 3, res, res) and got.dtype == dtype
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double().cpu(), reference(images, meta, res), rtol=0, atol=ATOL[dtype])


def test_crop_kernel_whole_image_flip_and_identity():
    """A whole-image box at the image's own size copies (and mirrors) the pixels exactly."""
    images, _ = batch([(16, 16), (16, 16)], 16)
    meta = torch.tensor([[0, 0, 16, 16, 0, 16, 16], [0, 0, 16, 16, 1, 16, 16]], dtype=torch.float32, device=DEVICE)
    got = crop_resize_triton(images, meta, 16, [0, 0, 0], [1 / 255] * 3, torch.float32)
    torch.testing.assert_close(got[0], images[0].float(), rtol=0, atol=1e-4)
    torch.testing.assert_close(got[1], images[1].float().flip(-1), rtol=0, atol=1e-4)


def test_resized_crops_dispatch_gives_the_layout_asked_for():
    images, meta = batch([(30, 40), (50, 20)], 8)
    for channels_last in (True, False):
        out = resized_crops(images, meta, 8, MEAN, STD, torch.bfloat16, channels_last)
        assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 8, 8)
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        torch.testing.assert_close(out.double().cpu(), reference(images, meta, 8), rtol=0, atol=ATOL[torch.bfloat16])


def smooth(h: int, w: int, rng: np.random.Generator) -> torch.Tensor:
    """A smooth photo-like image (bicubic upsampling of a few random cells)."""
    cells = torch.from_numpy(rng.uniform(30, 225, (1, 3, 4, 4))).float()
    return torch.nn.functional.interpolate(cells, size=(h, w), mode="bicubic").clamp(0, 255).round().to(torch.uint8)[0]


def test_area_filter_is_close_to_torchvision_antialiased_resize():
    """The device path's roi_align filter and the workers' antialiased bilinear resize agree on smooth
    images within about a grey level on average: the two paths execute the same crop."""
    rng = np.random.default_rng()
    plan = CropPlan(True, 24, 0.08, 0.875, int(rng.integers(1 << 30)), 0)
    for i in range(12):
        h, w = (int(v) for v in rng.integers(30, 140, 2))
        image = smooth(h, w, rng)
        row = plan.rows([i], torch.tensor([h]), torch.tensor([w]))
        x0, y0, bw, bh, flip = row[0, :5].tolist()
        want = TF.resized_crop(image, int(y0), int(x0), int(bh), int(bw), [24, 24], antialias=True).float()
        want = want.flip(-1) if flip else want
        got = resized_crops_eager([image], row, 24)[0]
        diff = (got - want).abs()
        assert diff.mean() < 1.5 and diff.max() < 12, (h, w, (x0, y0, bw, bh), diff.mean(), diff.max())


def test_crop_kernel_reads_images_in_place_wherever_they_lie():
    """Images that are views of one buffer, lying in the reverse of batch order (negative offsets from the
    first), are cropped as the same images copied apart."""
    sizes = [(21, 17), (9, 30), (40, 33)]
    images, meta = batch(sizes, 12)
    lengths = [im.numel() for im in images]
    pool = torch.zeros(sum(lengths) + 5, dtype=torch.uint8, device=DEVICE)
    views, end = [], len(pool)
    for im, n in zip(images, lengths):  # the first image last in the pool, and so on
        end -= n
        pool[end:end + n] = im.reshape(-1)
        views.append(pool[end:end + n].view(im.shape))
    got = crop_resize_triton(views, meta, 12, MEAN, STD, torch.float32)
    torch.testing.assert_close(got, crop_resize_triton(images, meta, 12, MEAN, STD, torch.float32), rtol=0, atol=0)
    with pytest.raises(ValueError, match="images\\[1\\] is not a contiguous uint8"):
        crop_resize_triton([images[0], images[1].transpose(1, 2)], meta[:2], 12, MEAN, STD, torch.float32)


def test_an_enlarged_box_reads_only_the_box():
    """Boxes of 5-12 px images enlarged to 32 px: the eager path and the kernel give torchvision's
    crop-then-resize (bilinear between pixel centres, clamped to the box's edge pixels), not values that
    mix in the pixels around the box."""
    rng = np.random.default_rng(1)
    images, rows, want = [], [], []
    for _ in range(8):
        h, w = (int(v) for v in rng.integers(5, 13, 2))
        image = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        bh, bw = int(rng.integers(2, h + 1)), int(rng.integers(2, w + 1))
        y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        images.append(image.to(DEVICE))
        rows.append([x0, y0, bw, bh, 0, h, w])
        want.append(TF.resized_crop(image.double(), y0, x0, bh, bw, [32, 32], antialias=True))
    meta = torch.tensor(rows, dtype=torch.float32, device=DEVICE)
    got = resized_crops_eager([im.cpu() for im in images], meta.cpu(), 32, torch.float64)
    torch.testing.assert_close(got, torch.stack(want), rtol=0, atol=1e-6)
    kernel = crop_resize_triton(images, meta, 32, [0, 0, 0], [1 / 255] * 3, torch.float32)
    torch.testing.assert_close(kernel.double().cpu(), torch.stack(want), rtol=0, atol=1e-3)
