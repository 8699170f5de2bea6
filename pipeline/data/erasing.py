"""torchvision's RandomErasing (``data.random_erase``), its draws made by the training feed.

    top, left, height, width = erase_boxes(erasing_draws(rng, n, p), side)

torchvision's ``RandomErasing(p, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)`` erases, with
chance p, one rectangle of the normalised image: up to 10 tries of an area (a fraction of the
image) and a log-uniform aspect ratio, the first whose rounded sides fit inside the image wins,
and its corner is uniform over the places it fits; after 10 misfits nothing is erased. Here the
same rule is computed for the whole global batch from one generator seeded by (seed, epoch,
step), so a resumed epoch, on any world size, erases the very same rectangles; DALI's
``fn.erase`` then sets them to 0 after normalisation (torchvision's value=0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SCALE = (0.02, 0.33)  # the erased area as a fraction of the image
RATIO = (0.3, 3.3)  # the rectangle's height / width
ATTEMPTS = 10
# Mixed into the feed's seed so the erasing stream is apart from the paper augmentation's:
# turning erasing on changes no other draw.
STREAM = 0xE2A5E


@dataclass(frozen=True)
class ErasingDraws:
    """The random numbers behind one global batch's erasing, one row per sample."""

    erase: np.ndarray  # bool [N]: this sample is erased (chance p)
    area: np.ndarray  # [N, ATTEMPTS]: the area's fraction of the image, uniform in SCALE
    log_ratio: np.ndarray  # [N, ATTEMPTS]: log(height / width), uniform in log(RATIO)
    corner: np.ndarray  # [N, 2]: where the rectangle sits among the places it fits, uniform in [0, 1)


def erasing_draws(rng: np.random.Generator, n: int, p: float) -> ErasingDraws:
    """Every draw for ``n`` samples; as many numbers whatever ``p``, so the stream never shifts."""
    erase = rng.random(n) < p
    area = rng.uniform(SCALE[0], SCALE[1], (n, ATTEMPTS))
    log_ratio = rng.uniform(math.log(RATIO[0]), math.log(RATIO[1]), (n, ATTEMPTS))
    corner = rng.random((n, 2))
    return ErasingDraws(erase, area, log_ratio, corner)


def erase_boxes(draws: ErasingDraws, side: int) -> tuple[np.ndarray, ...]:
    """(top, left, height, width), int64 [N] each, of the rectangle erased from each ``side`` x ``side``
    image; height = width = 0 where nothing is erased. torchvision's get_params, vectorised: its
    ``torch.randint(0, side - h + 1)`` is ``floor(corner * (side - h + 1))`` here."""
    target = side * side * draws.area
    ratio = np.exp(draws.log_ratio)
    # np.round halves to even, as Python's round() in torchvision.
    height = np.round(np.sqrt(target * ratio)).astype(np.int64)
    width = np.round(np.sqrt(target / ratio)).astype(np.int64)
    fits = (height < side) & (width < side)
    first = np.argmax(fits, axis=1)  # the first attempt that fits
    rows = np.arange(len(first))
    erased = draws.erase & fits.any(axis=1)
    height = np.where(erased, height[rows, first], 0)
    width = np.where(erased, width[rows, first], 0)
    top = np.floor(draws.corner[:, 0] * (side - height + 1)).astype(np.int64)
    left = np.floor(draws.corner[:, 1] * (side - width + 1)).astype(np.int64)
    return np.where(erased, top, 0), np.where(erased, left, 0), height, width


def erasing_inputs(
    p: float, side: int, *, seed: int, epoch: int, step: int, global_batch: int, mine: slice
) -> list[list[np.ndarray]]:
    """What the feed hands ``fn.erase`` for this rank's ``mine`` of the global batch at (epoch, step):
    per sample the rectangle's anchor [top, left] and shape [height, width], float32 in pixels."""
    rng = np.random.default_rng([seed, epoch, step, STREAM])
    top, left, height, width = erase_boxes(erasing_draws(rng, global_batch, p), side)
    return [
        [np.array([t, x], np.float32) for t, x in zip(top[mine], left[mine], strict=True)],
        [np.array([h, w], np.float32) for h, w in zip(height[mine], width[mine], strict=True)],
    ]
