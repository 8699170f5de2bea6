"""Values that follow from the config and the world size: computed once, printed, saved.

derived = derive(cfg, num_train_images=1_281_167, world_size=8)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.config.schema import ClusterConfig, Config, ConfigError


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


def accumulation(per_worker_batch: int, max_worker_batch: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps): the fewest equal micro-batches of at most ``max_worker_batch``
    (0: no limit) that make up ``per_worker_batch`` exactly, so the global batch and lr stay exact."""
    if max_worker_batch <= 0 or per_worker_batch <= max_worker_batch:
        return per_worker_batch, 1
    steps = math.ceil(per_worker_batch / max_worker_batch)
    while per_worker_batch % steps:
        steps += 1
    return per_worker_batch // steps, steps


def derive(cfg: Config, num_train_images: int, world_size: int | None = None) -> Derived:
    """The derived values for a run on ``world_size`` workers (default ``cluster.num_workers``)."""
    world = world_size or cfg.cluster.num_workers
    global_batch = cfg.optim.batch_size
    if global_batch % world:
        raise ConfigError(f"optim.batch_size ({global_batch}) must divide evenly over {world} workers")
    eval_batch = cfg.global_eval_batch
    per_worker = global_batch // world
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


def requested_gpu(cluster: ClusterConfig) -> bool | None:
    """``cluster.use_gpu`` as a decision: True or False when the config says, None for ``auto``."""
    return None if cluster.use_gpu == "auto" else cluster.use_gpu == "true"


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two config dicts."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes
