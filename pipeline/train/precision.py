"""Mixed precision as ``precision.amp`` says, for training, evaluation and the benchmarks alike."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision context for ``precision.amp`` (``none`` | ``bf16`` | ``fp16``)."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
