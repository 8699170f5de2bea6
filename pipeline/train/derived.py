"""Values that follow from the config, the dataset's size and the world size: computed once,
printed at start, saved in the run's ``config.yaml`` and W&B config under ``derived``.

    derived = derive(cfg, num_train_images=1_281_167, world_size=8)

The training step reads ``micro_batch``, ``world_size`` and ``global_batch`` (each micro-batch's
loss is weighted by its share of the global batch), the loop ``iters_per_epoch``,
``total_iters``, ``epochs`` and ``lr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import Config, ConfigError, check_batches


@dataclass(frozen=True)
class Derived:
    """Values computed once from the config and the world size; printed and saved."""

    world_size: int
    global_batch: int
    per_worker_batch: int
    micro_batch: int  # what one forward/backward sees: per_worker_batch / accum_steps
    accum_steps: int  # micro-batches whose gradients add up to one optimizer step
    per_worker_eval_batch: int
    lr: float  # after the linear scaling rule
    iters_per_epoch: int
    total_iters: int
    epochs: int

    @property
    def worker_share(self) -> str:
        """Each worker's part of the global batch: "32", or "85-86" when the split is uneven
        (ranks differ by one image at most; each rank's loss is weighted by its share)."""
        smallest = self.global_batch // self.world_size
        return f"{smallest}-{self.per_worker_batch}" if smallest != self.per_worker_batch else f"{smallest}"


def accumulation(per_worker_batch: int, max_worker_batch: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps): the fewest micro-batches of at most ``max_worker_batch``
    (0: no limit) that make up ``per_worker_batch``, as equal as they go. Each micro-batch's loss
    is weighted by its size, so the summed gradient is the whole batch's whatever the split."""
    if max_worker_batch <= 0 or per_worker_batch <= max_worker_batch:
        return per_worker_batch, 1
    steps = math.ceil(per_worker_batch / max_worker_batch)
    return math.ceil(per_worker_batch / steps), steps


def derive(cfg: Config, num_train_images: int, world_size: int | None = None) -> Derived:
    """The derived values for a run on ``world_size`` workers (default: the most ``cluster.num_workers``
    allows). ``per_worker_batch`` is the largest rank's share: an uneven split differs by one."""
    world = world_size or cfg.cluster.max_workers
    global_batch = cfg.optim.batch_size
    check_batches(cfg, world)
    eval_batch = cfg.global_eval_batch
    per_worker = math.ceil(global_batch / world)
    # Every epoch is a fresh global permutation cut into whole global batches, so all ranks
    # take the same number of steps (DDP needs it) and a resumed epoch replays exactly.
    iters_per_epoch = num_train_images // global_batch
    if iters_per_epoch == 0:
        raise ConfigError(
            f"optim.batch_size ({global_batch}) is larger than the training set ({num_train_images} images); "
            "lower optim.batch_size"
        )
    total = iters_per_epoch * cfg.schedule.epochs
    if cfg.schedule.max_iters is not None:
        total = min(total, cfg.schedule.max_iters)
    epochs = math.ceil(total / iters_per_epoch)
    lr = cfg.optim.lr * global_batch / 256 if cfg.optim.scale_lr else cfg.optim.lr
    micro, accum = accumulation(per_worker, cfg.optim.max_worker_batch)
    return Derived(
        world_size=world,
        global_batch=global_batch,
        per_worker_batch=per_worker,
        micro_batch=micro,
        accum_steps=accum,
        per_worker_eval_batch=max(1, eval_batch // world),
        lr=lr,
        iters_per_epoch=iters_per_epoch,
        total_iters=total,
        epochs=epochs,
    )
