"""torchvision's training extras in the DALI pipelines (CPU): random erasing (data.random_erase), its
rectangles against torchvision's rule and replayed on resume, and TrivialAugment Wide
(data.auto_augment) on the crops of both random augmentations."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data.erasing import erase_boxes, erasing_draws, erasing_inputs
from pipeline.data.imagenet import build_train_loader
from pipeline.data.layout import ImageFolderIndex
from pipeline.data.prep.synth import render_image

# Small sizes keep DALI fast on two CPU cores (tests/test_data_imagenet.py's).
CFG = DataConfig(crop_size=56, val_resize=64, scale_min=64, scale_max=96, normalize="meanstd")
SEED, BATCH = 3, 8


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> ImageFolderIndex:
    """24 varied JPEGs, each its own label: 3 steps of 8 per epoch."""
    d = tmp_path_factory.mktemp("train")
    files = []
    for i in range(24):
        rng = np.random.default_rng(100 + i)
        path = d / f"t{i:02d}.JPEG"
        render_image(i % 10, (int(rng.integers(70, 130)), int(rng.integers(70, 130))), rng).save(
            path, quality=90
        )
        files.append(str(path))
    labels = tuple(range(len(files)))
    return ImageFolderIndex(("c",), tuple(files), labels, tuple(files), labels)


def _loader(index, cfg, rank=0, world_size=1, **options):
    return build_train_loader(
        index, cfg, global_batch=BATCH, rank=rank, world_size=world_size, device_id=None, seed=SEED,
        num_threads=1, **options,
    )  # fmt: skip


def _torchvision_box(draws, i: int, side: int) -> tuple[int, int, int, int]:
    """torchvision's RandomErasing.get_params for sample ``i``, as it is written (scalar Python),
    with its torch draws replaced by the feed's: (top, left, height, width), zeros for no erasing."""
    if not draws.erase[i]:
        return 0, 0, 0, 0
    for attempt in range(10):
        erase_area = side * side * float(draws.area[i, attempt])
        aspect_ratio = math.exp(float(draws.log_ratio[i, attempt]))
        h = int(round(math.sqrt(erase_area * aspect_ratio)))
        w = int(round(math.sqrt(erase_area / aspect_ratio)))
        if not (h < side and w < side):
            continue
        # torch.randint(0, side - h + 1) with the feed's uniform number in [0, 1)
        return int(draws.corner[i, 0] * (side - h + 1)), int(draws.corner[i, 1] * (side - w + 1)), h, w
    return 0, 0, 0, 0


@pytest.mark.parametrize("side", [4, 56, 176])
def test_erase_boxes_follow_torchvisions_rule(side):
    draws = erasing_draws(np.random.default_rng(side), 4000, 0.5)
    top, left, height, width = erase_boxes(draws, side)
    expected = [_torchvision_box(draws, i, side) for i in range(4000)]
    assert list(zip(top.tolist(), left.tolist(), height.tolist(), width.tolist(), strict=True)) == expected
    erased = height > 0
    assert 0.45 < erased.mean() < 0.55  # p = 0.5, less the rare ten misfits
    assert (top + height <= side).all() and (left + width <= side).all() and (top >= 0).all()
    if side == 4:  # a side this small makes every path happen: later attempts, and ten misfits
        assert (draws.erase & ~erased).any()
    area = height[erased] * width[erased] / side**2
    if side == 176:  # the area's range, within rounding
        assert 0.015 < area.min() < 0.03 and 0.3 < area.max() < 0.35


def test_erasing_draws_are_the_global_batchs_and_change_with_the_step():
    """Any split of the global batch gets its part of the same rectangles; another step, others."""
    kw = dict(seed=SEED, epoch=2, step=5, global_batch=12)
    whole = erasing_inputs(0.5, 56, mine=slice(0, 12), **kw)
    halves = [erasing_inputs(0.5, 56, mine=slice(a, b), **kw) for a, b in ((0, 6), (6, 12))]
    for out in range(2):
        assert np.array_equal(np.stack(whole[out]), np.stack(halves[0][out] + halves[1][out]))
    later = erasing_inputs(0.5, 56, mine=slice(0, 12), **{**kw, "step": 6})
    assert not np.array_equal(np.stack(whole[0]), np.stack(later[0]))
    assert np.stack(whole[1]).dtype == np.float32 and (np.stack(whole[1])[:, 0] > 0).any()


def _boxes(epoch: int, step: int, side: int, p: float) -> list[tuple[int, ...]]:
    anchors, shapes = erasing_inputs(p, side, seed=SEED, epoch=epoch, step=step, global_batch=BATCH,
                                     mine=slice(0, BATCH))  # fmt: skip
    return [(int(a[0]), int(a[1]), int(s[0]), int(s[1])) for a, s in zip(anchors, shapes, strict=True)]


@pytest.mark.parametrize("memory", [{}, dict(channels_last=True, half=True)], ids=["nchw-float", "nhwc-half"])
def test_random_erase_zeroes_the_feeds_rectangles_and_nothing_else(index, memory):
    """The paper's augmentation is drawn by the feed, so the same run without erasing gives the very
    pixels: every image equals it outside its rectangle and is exactly 0 inside (torchvision's
    value=0 on the normalised crop); a run resumed at step 1 of epoch 1 erases the same."""
    plain = [b for e in (0, 1) for b in _loader(index, replace(CFG, augment="paper"), **memory).epoch(e)]
    cfg = replace(CFG, augment="paper", random_erase=0.5)
    erased = [b for e in (0, 1) for b in _loader(index, cfg, **memory).epoch(e)]
    counts = [0, 0]
    for i, ((x, y), (xe, ye)) in enumerate(zip(plain, erased, strict=True)):
        assert torch.equal(y, ye)
        for n, (top, left, h, w) in enumerate(_boxes(i // 3, i % 3, 56, 0.5)):
            inside = torch.zeros(56, 56, dtype=torch.bool)
            inside[top : top + h, left : left + w] = True
            assert (xe[n][:, inside] == 0).all() and torch.equal(xe[n][:, ~inside], x[n][:, ~inside])
            counts[h > 0] += 1
    assert min(counts) >= 10  # both kinds among the 48 crops
    resumed = list(_loader(index, cfg, **memory).epoch(1, start=1))
    for (x, y), (xr, yr) in zip(erased[4:], resumed, strict=True):
        assert torch.equal(x, xr) and torch.equal(y, yr)


def test_random_erase_on_the_inception_crop_and_a_split_batch(index):
    """With DALI's own crop the pixels differ, but the rectangles are the feed's: each rank's images
    are 0 over its part of the global batch's rectangles."""
    cfg = replace(CFG, augment="inception", random_erase=1.0)
    for rank in range(2):
        (x, _), *_ = _loader(index, cfg, rank=rank, world_size=2).epoch(0)
        for n, (top, left, h, w) in enumerate(_boxes(0, 0, 56, 1.0)[rank * 4 : rank * 4 + 4]):
            assert h > 0 and (x[n][:, top : top + h, left : left + w] == 0).all()
            assert x[n].abs().sum() > (x[n][:, top : top + h, left : left + w]).abs().sum()  # the rest is not


@pytest.mark.parametrize("augment", ["paper", "inception"])
def test_trivial_augment_wide_changes_crops_and_replays_from_the_same_start(index, augment):
    """DALI's TrivialAugment Wide on the uint8 crop: each image gets one of 14 operations (identity
    among them) at a random magnitude, so some crops change and the normalised values still come
    from whole 0-255 pixels; a loader started afresh at the same step draws the same."""
    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    cfg = replace(CFG, augment=augment, auto_augment="ta_wide", pca_std=0.0)  # no lighting: whole pixels
    first = list(_loader(index, cfg).epoch(0))
    again = list(_loader(index, cfg).epoch(0))
    for (x, y), (xa, ya) in zip(first, again, strict=True):
        assert x.shape == (8, 3, 56, 56) and torch.equal(x, xa) and torch.equal(y, ya)
        pixels = x * std + mean
        assert (pixels - pixels.round()).abs().max() < 1e-3 and pixels.min() > -0.5 and pixels.max() < 255.5
    if augment == "paper":  # the same crops and flips without TrivialAugment: some images differ
        plain = list(_loader(index, replace(cfg, auto_augment="none")).epoch(0))
        same = [
            torch.equal(a[n], b[n]) for (a, _), (b, _) in zip(first, plain, strict=True) for n in range(8)
        ]
        assert not all(same)
