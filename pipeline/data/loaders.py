"""What a worker gets from the data package: this rank's loaders (``Data``), each a ``Loader``.

    data = open_dataset(cfg.data).loaders(cfg, rank=0, world_size=1, device=device, num_threads=2,
                                          eval_batch=64)            # pipeline.data.source
    for images, labels in data.train.epoch(epoch, start=step): ...
    for inputs, labels in data.make_val("tencrop").epoch(0): ...

Each dataset's source builds a ``Data``: the ImageNet folder layout and CIFAR-10 in
``pipeline.data.source``, the sharded layout in ``pipeline.data.shard_feed``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class Loader(Protocol):
    """What the training loop and evaluation iterate: a fixed number of batches per epoch on this rank."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Any, torch.Tensor]]:
        """The batches of ``epoch`` from step ``start`` on (validation loaders ignore both)."""
        ...


@dataclass
class Data:
    """This rank's loaders and what the run needs to know about the dataset.

    The evaluation loaders come from builders, called when a set is first scored; whoever scores
    a set more than once keeps the loader (the training loop does, one per set and mode).
    """

    train: Loader
    num_train: int
    num_classes: int
    make_val: Callable[[str], Loader]  # eval mode -> a Loader over this rank's validation slice
    # A held-out test set scored once at the end, besides validation: CIFAR-10 with
    # data.val_split > 0 (validation is then held-out training images). None for ImageNet (its
    # test labels are not public) and for CIFAR-10 without a split (validation is the test set).
    make_test: Callable[[], Loader] | None = None
    # The training images as validation sees them (no augmentation, this rank's disjoint share):
    # the training error the paper's argument is about, measured in eval mode.
    make_train_eval: Callable[[], Loader] | None = None
    # The sharded layout read from a bucket: this process's fetch and cache counters since its cache
    # opened (``pipeline.data.shard_feed.fetch_counts``); None for layouts that fetch nothing.
    fetch_counts: Callable[[], dict[str, float]] | None = None
    # What fixes the training order besides the seed, recorded in every checkpoint so that a resume
    # in the middle of an epoch can refuse another order: the sharded layout's manifest SHA-256 and
    # data.shuffle_window. None for the folder layout and CIFAR-10.
    order_pin: dict[str, Any] | None = None
