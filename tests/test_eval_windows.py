"""The test protocols' geometry, exact to torchvision: resized sizes and crop windows to the pixel.

torchvision's Resize truncates the longer side and its CenterCrop/TenCrop round a half-pixel
margin to even; the DALI graphs must land on the same integers (500x375 -> 341x256, window at
58, not 59), so that torchvision's published weights score here as torchvision says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data.dali_eval import center_offset, resized_size, ten_crop_windows
from pipeline.data.imagenet import build_val_loader
from pipeline.data.layout import ImageFolderIndex
from pipeline.data.prep.synth import render_image

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
CFG = DataConfig(crop_size=56, val_resize=64, normalize="meanstd")


def _index(files: list[str]) -> ImageFolderIndex:
    labels = tuple(range(len(files)))
    return ImageFolderIndex(("c",), tuple(files), labels, tuple(files), labels)


def _load(files: list[str], mode: str, cfg: DataConfig = CFG, scales: tuple[int, ...] = ()) -> list:
    loader = build_val_loader(
        _index(files), cfg, mode=mode, scales=scales, batch_size=3, rank=0, world_size=1,
        device_id=None, num_threads=1,
    )  # fmt: skip
    return list(loader.epoch(0))


def test_reference_arithmetic_is_torchvisions():
    """The integer rules, checked against torchvision's own transforms on index-tagged tensors."""
    from torchvision import transforms as T

    assert resized_size(375, 500, 256) == (256, 341) and center_offset(117) == 58  # a 500 x 375 image
    assert resized_size(427, 640, 256) == (256, 383)  # 383.6: truncated, where rounding gives 384
    for h, w in [(375, 500), (500, 375), (427, 640), (333, 500), (256, 256), (300, 301), (299, 257)]:
        resized = T.Resize(256)(torch.zeros(1, h, w))
        assert tuple(resized.shape[1:]) == resized_size(h, w, 256), (h, w)
        rh, rw = resized.shape[1:]
        tag = torch.arange(rh * rw, dtype=torch.float64).view(1, rh, rw)
        windows = ten_crop_windows(rh, rw, 224)
        for (top, left, mirrored), crop in zip(windows, T.TenCrop(224)(tag), strict=True):
            ref = tag[:, top : top + 224, left : left + 224]
            assert torch.equal(ref.flip(-1) if mirrored else ref, crop), (h, w, top, left, mirrored)
        top, left, _ = windows[4]
        assert torch.equal(T.CenterCrop(224)(tag), tag[:, top : top + 224, left : left + 224])
    with pytest.raises(ValueError, match="larger than"):
        ten_crop_windows(50, 60, 56)


def _coordinate_png(path: Path, height: int, width: int) -> None:
    """R = column, G = row, B = 7: a lossless image whose pixels say where they came from."""
    ys, xs = np.mgrid[0:height, 0:width]
    Image.fromarray(np.stack([xs, ys, np.full_like(xs, 7)], -1).astype(np.uint8)).save(path)


@pytest.mark.parametrize("mode", ["center", "tencrop"])
def test_dali_windows_are_torchvisions_to_the_pixel(tmp_path, mode):
    """With the shorter side already at val_resize the resize is the identity, so each output
    pixel's (R, G) is its source coordinate: every window must be torchvision's exactly.
    Margins: 29 (14.5 -> 14: DALI's relative position would give 15), 31 (15.5 -> 16), 8."""
    from torchvision import transforms as T

    sizes = [(64, 85), (85, 64), (64, 87), (64, 64)]  # (height, width)
    files = []
    for i, (h, w) in enumerate(sizes):
        _coordinate_png(tmp_path / f"coords{i}.png", h, w)
        files.append(str(tmp_path / f"coords{i}.png"))
    images = torch.cat([x for x, _ in _load(files, mode)])
    pixels = (images * STD + MEAN).round()
    per_image = 1 if mode == "center" else 10
    assert pixels.shape == (len(files) * per_image, 3, 56, 56)
    for i, path in enumerate(files):
        with Image.open(path) as im:
            ref = T.CenterCrop(56)(im) if mode == "center" else T.TenCrop(56)(im)
        for j, crop in enumerate([ref] if mode == "center" else ref):
            expected = torch.from_numpy(np.asarray(crop, np.float32)).permute(2, 0, 1)
            assert torch.equal(pixels[i * per_image + j], expected), (sizes[i], j)


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> list[str]:
    """Textured JPEGs whose resized sizes leave odd margins around the 56 crop, one greyscale
    JPEG and one progressive JPEG. (width, height) before resizing to shorter side 64."""
    d = tmp_path_factory.mktemp("odd")
    files = []
    specs = [
        ((100, 75), "rgb"),
        ((75, 100), "rgb"),
        ((160, 96), "rgb"),
        ((131, 80), "grey"),
        ((90, 70), "progressive"),
    ]
    for i, (size, kind) in enumerate(specs):
        img = render_image(i, size, np.random.default_rng(10 + i))
        path = d / f"odd{i}.jpg"
        if kind == "grey":
            img.convert("L").save(path, quality=95)
        else:  # 4:4:4 chroma, so decoders cannot differ in chroma upsampling
            img.save(path, quality=95, subsampling=0, progressive=kind == "progressive")
        files.append(str(path))
    with Image.open(files[3]) as im:
        assert im.mode == "L"
    with Image.open(files[4]) as im:
        assert im.info.get("progressive") or im.info.get("progression")
    return files


@pytest.mark.parametrize("mode", ["center", "tencrop"])
def test_odd_margins_grey_and_progressive_match_torchvision(odd_images, mode):
    """Pixel values against torchvision's Resize + CenterCrop/TenCrop: resampling differs a
    little (output rounding, IDCT), a window one pixel off differs by several levels on average."""
    from torchvision import transforms as T

    images = torch.cat([x for x, _ in _load(odd_images, mode)])
    crop = T.CenterCrop(56) if mode == "center" else T.TenCrop(56)
    refs = []
    for path in odd_images:
        with Image.open(path) as im:
            out = crop(T.Resize(64)(im.convert("RGB")))
        refs += [out] if mode == "center" else list(out)
    ref = torch.stack(
        [(torch.from_numpy(np.asarray(c, np.float32)).permute(2, 0, 1) - MEAN) / STD for c in refs]
    )
    assert images.shape == ref.shape
    diff = ((images - ref) * STD).abs()
    per_crop = diff.mean(dim=(1, 2, 3))
    assert per_crop.max() < 0.6, per_crop
    assert torch.quantile(diff.flatten(), 0.999) <= 2.0


def test_multiscale_sizes_are_torchvisions(odd_images):
    scales = (48, 64, 80)
    batches = _load(odd_images, "multiscale", scales=scales)
    samples = [s for batch, _ in batches for s in batch]
    assert len(samples) == len(odd_images)
    for path, views in zip(odd_images, samples, strict=True):
        with Image.open(path) as im:
            w, h = im.size
        for s, view in zip(scales, views, strict=True):
            assert tuple(view.shape[2:]) == resized_size(h, w, s), (path, s)


@pytest.mark.parametrize("mode", ["center", "tencrop"])
def test_a_test_crop_larger_than_trainings_is_torchvisions_to_the_pixel(tmp_path, mode):
    """``data.val_crop`` (FFCV tests at a larger crop than it trains at): the windows of that
    side, exact to torchvision's CenterCrop / TenCrop, whatever ``crop_size`` the training uses."""
    from torchvision import transforms as T

    cfg = DataConfig(crop_size=48, val_crop=60, val_resize=64, normalize="meanstd")
    sizes = [(64, 85), (85, 64), (64, 64)]
    files = []
    for i, (h, w) in enumerate(sizes):
        _coordinate_png(tmp_path / f"coords{i}.png", h, w)
        files.append(str(tmp_path / f"coords{i}.png"))
    pixels = (torch.cat([x for x, _ in _load(files, mode, cfg)]) * STD + MEAN).round()
    per_image = 1 if mode == "center" else 10
    assert pixels.shape == (len(files) * per_image, 3, 60, 60)
    for i, path in enumerate(files):
        with Image.open(path) as im:
            ref = [T.CenterCrop(60)(im)] if mode == "center" else T.TenCrop(60)(im)
        for j, crop in enumerate(ref):
            expected = torch.from_numpy(np.asarray(crop, np.float32)).permute(2, 0, 1)
            assert torch.equal(pixels[i * per_image + j], expected), (sizes[i], j)
