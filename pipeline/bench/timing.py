"""Timing that holds up on a shared machine: interleaved blocks, medians, paired ratios.

Standard library and torch only (``bench model`` runs where Ray and DALI are not installed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from pipeline.bench.common import median


def sync(device: torch.device) -> None:
    # CUDA runs asynchronously: without this the clock would stop when the kernels are queued.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    steps: dict[str, Callable[[], None]], *, warmup: int, timed: int, block: int, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Warm every step function up, then alternate timed blocks of ``block`` calls between them.

    Interleaving is what makes a ratio trustworthy on a shared machine: a burst of someone
    else's load lands on both sides instead of on whichever ran second.

    Args:
        steps: name -> a function that runs one step.
        warmup: untimed calls each (the first one also pays for torch.compile and cuDNN autotuning).
        timed: timed calls each.
        block: calls per timed block; the device is synchronised only at block boundaries.
        device: synchronised around every timed block.

    Returns:
        name -> ``{"first_step_s", "block_steps", "block_s"}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, step in steps.items():
        first = None
        for i in range(warmup):
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            if i == 0:
                first = time.perf_counter() - t0
        out[name] = {"first_step_s": first, "block_steps": [], "block_s": []}
    sizes = [min(block, timed - i) for i in range(0, timed, block)]
    names = list(steps)
    for i, size in enumerate(sizes):
        # The order flips every round, so going first (or right after the other model) is no bias.
        for name in names if i % 2 == 0 else names[::-1]:
            step = steps[name]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(size):
                step()
            sync(device)
            out[name]["block_steps"].append(size)
            out[name]["block_s"].append(time.perf_counter() - t0)
    return out


def rate(timing: dict[str, Any], images_per_step: int) -> float:
    """Images/s from the median block: one descheduled block moves it less than it moves the mean.

    Args:
        timing: one entry of ``time_interleaved``'s result.
        images_per_step: images one call processes.
    """
    return median(
        [n * images_per_step / s for n, s in zip(timing["block_steps"], timing["block_s"], strict=True)]
    )


def paired_ratio(ours: dict[str, Any], reference: dict[str, Any]) -> float:
    """Median over rounds of (reference block time / our block time): ours / reference as a rate.

    A cross-check of ``ratio``: neighbouring blocks share the machine's load of the moment,
    so a slow drift in load cancels here; when the two disagree by more than a few percent,
    the run was noisy and more ``--steps`` are needed.

    Args:
        ours, reference: entries of ``time_interleaved``'s result (the same block sizes).
    """
    return median([r / o for o, r in zip(ours["block_s"], reference["block_s"], strict=True)])
