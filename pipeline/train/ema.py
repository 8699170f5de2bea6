"""An exponential moving average of the weights (``optim.ema_decay``), kept on the device.

    ema = WeightAverage.for_config(network, cfg.optim)     # None when optim.ema_decay is 0
    ema.update(network, updates=step)                      # after every optimizer step
    score(run, "val", "center", weights="ema")              # val/ema_top1_err, ...

After each optimizer step every floating-point tensor of the network's state, parameters and BN
running statistics alike, moves towards the live one: ``ema = decay * ema + (1 - decay) * live``
(one ``torch._foreach_lerp_`` over all of them). Averaging the running statistics too is what timm's
``ModelEmaV3`` and torchvision's reference ``ExponentialMovingAverage`` (``use_buffers=True``) do:
the statistics then describe an average over the same window as the weights, where copying the
live ones (``AveragedModel``'s default) pairs them with weights they were not measured for. The
integer BN counters (``num_batches_tracked``) are copied.

Nothing here waits for the device: the decay is a Python number of the step count, which the
loop knows (no counter tensor to read). The average is in float32 whatever ``precision.amp`` says.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from pipeline.config import OptimConfig

WARMUP_OFFSET = 10  # (1 + t) / (10 + t): 0.1 at the first update, 0.5 at the 9th, 0.9 at the 81st


def ema_decay(decay: float, warmup: bool, updates: int) -> float:
    """The decay of the update after ``updates`` earlier ones: ``decay``, or with ``warmup``
    ``min(decay, (1 + updates) / (10 + updates))``."""
    if not warmup:
        return decay
    return min(decay, (1 + updates) / (WARMUP_OFFSET + updates))


class WeightAverage:
    """The EMA of a network: a copy of it (``module``, in eval mode, no gradients) updated in place."""

    def __init__(self, network: nn.Module, decay: float, warmup: bool = False) -> None:
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(network).eval().requires_grad_(False)
        # The tensors to update, looked up once per live network: both sides are updated in place
        # (SGD, BN, load_state_dict), so the same tensor objects serve every step.
        self._pairs_of: tuple[nn.Module, tuple[list, list, list, list]] | None = None

    @classmethod
    def for_config(cls, network: nn.Module, optim: OptimConfig) -> WeightAverage | None:
        """The run's EMA of ``network`` (already on its device), None when ``optim.ema_decay`` is 0."""
        if optim.ema_decay == 0.0:
            return None
        return cls(network, optim.ema_decay, optim.ema_warmup)

    @staticmethod
    def _pairs(average: nn.Module, live: nn.Module) -> tuple[list, list, list, list]:
        """(average's float tensors, live's, average's other tensors, live's), matched by name."""
        mine = average.state_dict(keep_vars=True)
        theirs = live.state_dict(keep_vars=True)
        floats = [k for k, v in mine.items() if v.is_floating_point()]
        others = [k for k, v in mine.items() if not v.is_floating_point()]
        return (
            [mine[k].detach() for k in floats],
            [theirs[k].detach() for k in floats],
            [mine[k].detach() for k in others],
            [theirs[k].detach() for k in others],
        )

    @torch.no_grad()
    def update(self, network: nn.Module, updates: int) -> None:
        """Move the average towards ``network`` (the bare network, not DDP's wrapper) after its
        ``updates + 1``-th optimizer step; ``updates``: the steps before this one (the warm-up's t)."""
        if self._pairs_of is None or self._pairs_of[0] is not network:
            self._pairs_of = (network, self._pairs(self.module, network))
        ema_f, live_f, ema_i, live_i = self._pairs_of[1]
        torch._foreach_lerp_(ema_f, live_f, 1.0 - ema_decay(self.decay, self.warmup, updates))
        if ema_i:
            torch._foreach_copy_(ema_i, live_i)

    @torch.no_grad()
    def copy_from(self, network: nn.Module) -> None:
        """Start the average at ``network``'s weights (a fresh run, or one from ``model.init_from``)."""
        self.module.load_state_dict(network.state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
