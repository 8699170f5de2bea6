"""CIFAR-10 held whole on the training device, augmented there per batch with torch ops.

    loaders = build_cifar_loaders("data/cifar", cfg.data, global_batch=128, rank=rank,
                                  world_size=world, device=device, seed=cfg.seed, eval_batch_size=500)
    for images, labels in loaders.train.epoch(epoch): ...

With ``data.val_split: 5000`` (the paper's 45k/5k split) ``loaders.val`` scores the held-out
training images and ``loaders.test`` the 10,000-image test set; without a split the test set
is the validation set and ``loaders.test`` is None.

The archive is the standard python one (``root/cifar-10-batches-py/data_batch_1..5, test_batch``),
read with torchvision. 50k 32x32 images are 150 MB as uint8, so a decode-per-sample loader
would only add latency: the paper's augmentation (4-pixel zero pad, random 32 crop, random
flip) is a few tensor ops on the whole batch. The training order follows the same rule as the
ImageNet loader (a permutation per (seed, epoch), whole global batches, equal steps per rank).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import DataConfig
from pipeline.data.constants import CIFAR_DIRNAME, CIFAR_IMAGE_SIZE, CIFAR_PAD, CIFAR_SPLIT_SEED
from pipeline.data.layout import DataLayoutError
from pipeline.data.loaders import Loader
from pipeline.data.rank_split import batch_seed, rank_slice, rank_train_order, rank_val_range


def _read_split(root: Path, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 32, 32, 3], labels int64 [N]) via torchvision's reader."""
    from torchvision.datasets import CIFAR10

    class _CIFAR10(CIFAR10):
        # torchvision checks each file's md5 against the official archive; a synthetic archive in
        # the same format must load too, so only presence is checked (download still verifies
        # the tarball's md5).
        train_list = [[f"data_batch_{i}", None] for i in range(1, 6)]
        test_list = [["test_batch", None]]
        meta = {"filename": "batches.meta", "key": "label_names", "md5": None}

    try:
        ds = _CIFAR10(str(root), train=train, download=download)
    except RuntimeError:
        raise DataLayoutError(
            f"{root / CIFAR_DIRNAME}: CIFAR-10 not found (expected data_batch_1..5, test_batch, batches.meta). "
            f"Extract https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into {root}, pass download=True "
            f"where there is a network, or write a synthetic archive with "
            f"`python -m pipeline data synth-cifar --out {root}`"
        ) from None
    return np.ascontiguousarray(ds.data), np.asarray(ds.targets, dtype=np.int64)


def split_train_val(num_train: int, val_split: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out val indices), the same on every rank and run (fixed seed)."""
    if not 0 < val_split < num_train:
        raise ValueError(
            f"data.val_split ({val_split}) must be between 1 and the training set size - 1 ({num_train - 1})"
        )
    perm = np.random.default_rng(CIFAR_SPLIT_SEED).permutation(num_train)
    return np.sort(perm[val_split:]), np.sort(perm[:val_split])


class _Normalizer:
    """x (uint8 NCHW) -> float: minus the training set's mean image ("mean", the paper's
    per-pixel mean) or minus the per-channel mean over the per-channel std ("meanstd")."""

    def __init__(self, train_images: torch.Tensor, kind: str):
        x = train_images.double()
        if kind == "mean":
            self.mean = x.mean(0).float()  # [3, 32, 32]
            self.std = torch.ones(1, device=x.device)
        elif kind == "meanstd":
            self.mean = x.mean((0, 2, 3)).float().view(3, 1, 1)
            self.std = x.std((0, 2, 3)).float().view(3, 1, 1)
        else:
            raise ValueError(f"data.normalize={kind!r}; choose 'mean' or 'meanstd'")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class CifarLoaders(NamedTuple):
    """This rank's CIFAR-10 loaders."""

    train: Loader
    val: Loader  # the held-out training images with data.val_split > 0, else the test set
    num_train: int
    test: Loader | None  # the test set when it is not already ``val`` (data.val_split > 0)


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, global_batch: int | None = None, part: slice = slice(None)
) -> torch.Tensor:
    """The paper's CIFAR augmentation on a normalised batch [B, 3, 32, 32], on x's device.

    Padding is applied after normalisation, so the 4 padded pixels are zeros of the
    mean-subtracted input (neutral), not black. With ``global_batch``, the offsets and flips are
    drawn for the whole global batch and ``part`` picks this rank's: a sample's augmentation
    then depends on its place in the global batch only, whatever the world size.
    """
    b, size = x.shape[0], x.shape[-1]
    n = global_batch or b
    padded = F.pad(x, (CIFAR_PAD,) * 4)
    span = 2 * CIFAR_PAD + 1
    oy = torch.randint(0, span, (n,), device=x.device, generator=generator)[part]
    ox = torch.randint(0, span, (n,), device=x.device, generator=generator)[part]
    flip = (torch.rand(n, device=x.device, generator=generator) < 0.5)[part]
    ar = torch.arange(size, device=x.device)
    rows = (oy[:, None] + ar)[:, :, None]  # [B, 32, 1]
    cols = (ox[:, None] + ar)[:, None, :]  # [B, 1, 32]
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)  # a flip is the crop read right to left
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


class _CifarTrain:
    def __init__(self, images, labels, normalize, *, augment, global_batch, rank, world_size, seed):
        self.images, self.labels, self.normalize, self.augment = images, labels, normalize, augment
        self.global_batch, self.rank, self.world_size, self.seed = (
            global_batch,
            rank,
            world_size,
            seed,
        )
        self.mine = rank_slice(global_batch, rank, world_size)  # validates the rank and world size
        self.per_rank = self.mine.stop - self.mine.start
        if len(labels) < global_batch:
            raise ValueError(
                f"global batch {global_batch} is larger than the training set ({len(labels)} images)"
            )

    def __len__(self) -> int:
        return len(self.labels) // self.global_batch

    def unaugmented(self, batch_size: int) -> _CifarEval:
        """The training images as they are, in order, this rank's disjoint share: the training error in eval mode."""
        return _CifarEval(
            self.images, self.labels, self.normalize,
            batch_size=batch_size, rank=self.rank, world_size=self.world_size,
        )  # fmt: skip

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` from step ``start`` on; the augmentation of step k is drawn
        from (seed, epoch, k), so a resumed epoch replays exactly."""
        order = rank_train_order(
            len(self.labels),
            global_batch=self.global_batch,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=epoch,
        )
        order_t = torch.as_tensor(order, device=self.images.device).view(-1, self.per_rank)
        g = torch.Generator(device=self.images.device)
        mine = self.mine
        for step in range(start, len(order_t)):
            idx = order_t[step]
            g.manual_seed(batch_seed(self.seed, epoch, step))  # sets the generator's state: no device sync
            batch = self.normalize(self.images[idx])
            yield (
                (augment_batch(batch, g, self.global_batch, mine) if self.augment else batch),
                self.labels[idx],
            )


class _CifarEval:
    def __init__(self, images, labels, normalize, *, batch_size, rank, world_size):
        mine = rank_val_range(len(labels), rank=rank, world_size=world_size)
        self.images, self.labels = images[mine.start : mine.stop], labels[mine.start : mine.stop]
        self.normalize, self.batch_size = normalize, batch_size

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for first in range(0, len(self.labels), self.batch_size):
            end = first + self.batch_size
            yield self.normalize(self.images[first:end]), self.labels[first:end]


def build_cifar_loaders(
    root: str | Path,
    cfg: DataConfig,
    *,
    global_batch: int,
    rank: int,
    world_size: int,
    device: torch.device,
    seed: int,
    eval_batch_size: int,
    download: bool = False,
) -> CifarLoaders:
    """CIFAR-10 train, validation and test loaders on ``device``.

    Args:
        root: folder holding ``cifar-10-batches-py/``.
        cfg: ``normalize`` ("mean": the paper's per-pixel mean image; "meanstd": per channel),
            ``augment`` ("paper": 4-pixel pad, random 32 crop, random flip; "none": the images as
            they are; ImageNet's modes are refused when the config loads) and ``val_split`` (> 0: hold out that many training images as validation,
            the paper's 5000, and score test_batch as a separate test set; 0: validate on test_batch).
        global_batch: training batch over all ranks (split as evenly as it goes: ``rank_slice``).
        rank, world_size: world rank and size.
        device: where the dataset lives and augmentation runs.
        seed: run seed: per-epoch order from (seed, epoch), augmentation from (seed, epoch, rank).
        eval_batch_size: validation batch per worker.
        download: fetch the official archive into ``root`` if it is missing.

    Returns:
        ``CifarLoaders(train, val, num_train, test)``. Train batches are ``global_batch //
        world_size`` float32 [B, 3, 32, 32] with int64 labels [B]; each rank's val and test loaders
        cover a disjoint slice, so the ranks together score each image once. ``test`` is None
        without a split (``val`` is the test set then).
    """
    root = Path(root).expanduser()
    train_np, train_y = _read_split(root, train=True, download=download)
    test_np, test_y = _read_split(root, train=False, download=False)
    if cfg.val_split > 0:
        keep, held = split_train_val(len(train_y), cfg.val_split)
        val_np, val_y = train_np[held], train_y[held]
        train_np, train_y = train_np[keep], train_y[keep]
    else:
        val_np, val_y = test_np, test_y
    if train_np.shape[1:] != (CIFAR_IMAGE_SIZE, CIFAR_IMAGE_SIZE, 3):
        raise DataLayoutError(
            f"{root / CIFAR_DIRNAME}: images have shape {train_np.shape[1:]}, expected 32x32x3"
        )

    def to_device(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device), torch.from_numpy(y).to(device)

    train_x, train_t = to_device(train_np, train_y)
    val_x, val_t = to_device(val_np, val_y)
    normalize = _Normalizer(train_x, cfg.normalize)  # training statistics only, also for validation
    train = _CifarTrain(
        train_x,
        train_t,
        normalize,
        augment=cfg.augment == "paper",
        global_batch=global_batch,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )
    split = dict(batch_size=eval_batch_size, rank=rank, world_size=world_size)
    val = _CifarEval(val_x, val_t, normalize, **split)
    test = None
    if cfg.val_split > 0:
        test = _CifarEval(*to_device(test_np, test_y), normalize, **split)
    return CifarLoaders(train, val, len(train_t), test)


def cifar_num_train(root: str | Path, val_split: int = 0) -> int:
    """Training images after the optional hold-out; checks the archive exists (``DataLayoutError``)."""
    _, labels = _read_split(Path(root), train=True, download=False)
    if val_split:
        split_train_val(len(labels), val_split)  # validates the size
    return len(labels) - val_split
