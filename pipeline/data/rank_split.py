"""Each rank's split of the data: the per-epoch training order, the validation slice, the
augmentation seeds. (A rank's split is not a shard: shards are the tar files of ``data shard``.)

Pure functions of (number of files, seed, epoch, rank, world size), shared by the ImageNet
(DALI) and CIFAR-10 loaders. The split is made here rather than by a reader: each epoch's order
is a function of (seed, epoch), so a resumed epoch replays exactly, and every rank takes the
same number of steps (DDP needs it). Validation slices are disjoint and contiguous, so
summing counts over ranks scores each image exactly once.
"""

from __future__ import annotations

import numpy as np


def rank_slice(global_batch: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s part of a global batch: contiguous, sizes differing by at most one.

    The training step weights each rank's loss by its share, so an uneven split (a global batch of 256
    over 3 workers: 85, 85, 86) still gives exactly the global batch's gradient.
    """
    _check_rank(rank, world_size)
    if global_batch < world_size:
        raise ValueError(f"global batch {global_batch} is smaller than the {world_size} workers")
    return slice(global_batch * rank // world_size, global_batch * (rank + 1) // world_size)


def rank_train_order(
    num_files: int,
    *,
    global_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    perm: np.ndarray | None = None,
) -> np.ndarray:
    """Indices this rank reads in ``epoch``, in order: ``steps`` batches of its ``rank_slice``.

    A full permutation from ``default_rng([seed, epoch])`` is cut to whole global batches; rank r
    takes the r-th contiguous slice of every global batch, so the global batch at step k is the
    same whatever the world size, and every rank takes ``num_files // global_batch`` steps.
    ``perm``: the epoch's order when it is not a full permutation (the sharded layout's
    shuffle over windows of shards, ``pipeline.data.shard_reads.epoch_order``).
    """
    mine = rank_slice(global_batch, rank, world_size)
    steps = num_files // global_batch
    if steps == 0:
        raise ValueError(f"global batch {global_batch} is larger than the training set ({num_files} images)")
    if perm is None:
        perm = np.random.default_rng([seed, epoch]).permutation(num_files)
    perm = perm[: steps * global_batch]
    return perm.reshape(steps, global_batch)[:, mine].reshape(-1)


def rank_val_range(num_files: int, *, rank: int, world_size: int) -> range:
    """This rank's contiguous slice of the validation set (DALI's own shard formula)."""
    _check_rank(rank, world_size)
    return range(num_files * rank // world_size, num_files * (rank + 1) // world_size)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


def augmentation_seed(seed: int, epoch: int, rank: int) -> int:
    """DALI's pipeline seed: distinct per (seed, epoch, rank), reproducible on resume."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0] & 0x7FFFFFFF)


def batch_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of one global batch's augmentation: the same for every rank and world size."""
    return int(np.random.SeedSequence([seed, epoch, step, 1]).generate_state(1)[0] & 0x7FFFFFFF)
