"""The paper's learning-rate rules as pure functions of the iteration (and a little state).

    lr = learning_rate(cfg.schedule, base_lr=0.1, it=32_000, iters_per_epoch=391, total_iters=64_000,
                       state=ScheduleState())

- ``step``: multiply by ``gamma`` at each milestone (epochs or iterations). CIFAR-10:
  0.1, 0.01 from iteration 32,000, 0.001 from 48,000, stop at 64,000.
- ``plateau``: multiply by ``gamma`` when the validation error has not improved by
  ``plateau_threshold`` for ``plateau_patience`` epochs (the paper's ImageNet rule), counted
  in epochs even when validation runs every few epochs. The decision is ``plateau_update``,
  fed the globally reduced error so every rank agrees.
- ``linear`` / ``cosine``: no steps (the time-to-accuracy recipes: FFCV's triangular shape,
  torchvision's cosine): from the base lr at the end of warm-up down to 0 at ``total_iters``,
  along a line or half a cosine, one value per iteration.
- ``constant``: the base lr throughout.
- warm-up: linear from ``warmup_lr`` over ``warmup_epochs``; or the paper's ResNet-110
  rule, ``warmup_lr`` until the training error is below ``warmup_until_train_err``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pipeline.config import ScheduleConfig


@dataclass(frozen=True)
class ScheduleState:
    """What the lr depends on besides the iteration; saved in checkpoints."""

    plateau_best: float = math.inf
    plateau_bad_epochs: int = 0
    plateau_reductions: int = 0
    warmup_done: bool = False  # the ResNet-110 rule has seen training error below its threshold


def decay_factor(
    cfg: ScheduleConfig, it: int, iters_per_epoch: int, state: ScheduleState, total_iters: int
) -> float:
    """The multiplier on the base lr from milestones, plateau reductions or the decay to 0 of
    ``linear``/``cosine`` (which starts where warm-up ends), before warm-up."""
    if cfg.kind in ("linear", "cosine"):
        start = round(cfg.warmup_epochs * iters_per_epoch)
        done = min(max((it - start) / max(total_iters - start, 1), 0.0), 1.0)
        return 1.0 - done if cfg.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
    if cfg.kind == "step":
        position = it if cfg.milestone_unit == "iter" else it // iters_per_epoch
        passed = sum(1 for m in cfg.milestones if position >= m)
        return cfg.gamma**passed
    if cfg.kind == "plateau":
        return cfg.gamma**state.plateau_reductions
    return 1.0


def learning_rate(
    cfg: ScheduleConfig,
    *,
    base_lr: float,
    it: int,
    iters_per_epoch: int,
    total_iters: int,
    state: ScheduleState,
) -> float:
    """The lr for iteration ``it`` (0-based).

    Args:
        cfg: the schedule section.
        base_lr: the lr after linear scaling (``Derived.lr``).
        it: the global iteration about to run.
        iters_per_epoch: optimizer steps per epoch.
        total_iters: the run's iterations (``Derived.total_iters``), where ``linear`` and ``cosine`` reach 0.
        state: plateau counters and the ResNet-110 warm-up flag.
    """
    lr = base_lr * decay_factor(cfg, it, iters_per_epoch, state, total_iters)
    if cfg.warmup_until_train_err is not None and not state.warmup_done:
        return cfg.warmup_lr
    warmup_iters = round(cfg.warmup_epochs * iters_per_epoch)
    if it < warmup_iters:
        return cfg.warmup_lr + (lr - cfg.warmup_lr) * it / warmup_iters
    return lr


def plateau_update(
    cfg: ScheduleConfig, state: ScheduleState, val_err: float, *, base_lr: float, epochs: int = 1
) -> ScheduleState:
    """The state after an evaluation whose (globally reduced) validation error is ``val_err``.

    An evaluation counts as an improvement when the error beats the best by more than the
    threshold (the best only moves then, as in torch's ReduceLROnPlateau). Patience is counted
    in epochs, not evaluations: with ``eval.every_n_epochs = N`` each evaluation without an
    improvement adds N epochs, and the lr is divided (once per plateau) at the first
    evaluation that finds ``plateau_patience`` or more epochs without one, unless that would
    take it under ``min_lr``.

    Args:
        cfg: the schedule section.
        state: the counters before this evaluation.
        val_err: validation top-1 error (percent), the same on every rank.
        base_lr: the lr after linear scaling (``Derived.lr``).
        epochs: epochs trained since the previous evaluation (``eval.every_n_epochs``).
    """
    if cfg.kind != "plateau":
        return state
    if epochs < 1:
        raise ValueError(f"plateau_update: epochs since the last evaluation must be >= 1, got {epochs}")
    if val_err < state.plateau_best - cfg.plateau_threshold:
        return replace(state, plateau_best=val_err, plateau_bad_epochs=0)
    bad = state.plateau_bad_epochs + epochs
    if bad >= cfg.plateau_patience and base_lr * cfg.gamma ** (state.plateau_reductions + 1) >= cfg.min_lr:
        return replace(
            state,
            plateau_bad_epochs=0,
            plateau_reductions=state.plateau_reductions + 1,
        )
    return replace(state, plateau_bad_epochs=bad)


def warmup_update(cfg: ScheduleConfig, state: ScheduleState, train_err: float) -> ScheduleState:
    """The ResNet-110 rule: once the (globally reduced) training error is under the threshold, warm-up ends."""
    if cfg.warmup_until_train_err is None or state.warmup_done:
        return state
    return replace(state, warmup_done=train_err < cfg.warmup_until_train_err)
