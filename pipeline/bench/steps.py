"""The steps ``bench model`` times: one training step, one 10-crop evaluation step, on fixed batches.

The batch is random and already on the device, so the figure is the network's speed with no
data loading; the optimizer is the training loop's (SGD, momentum 0.9, weight decay 1e-4).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.constants import NUM_TEN_CROPS as NUM_CROPS
from pipeline.train.evaluate import autocast


def make_train_step(
    model: nn.Module,
    device: torch.device,
    channels_last: bool,
    amp: str,
    batch_size: int,
    input_size: int,
    num_classes: int,
) -> Callable[[], None]:
    """A closure that runs one training step on a fixed random batch.

    Args:
        model: the module to train (already on ``device``, in the variant's layout, maybe compiled).
        device: where the batch lives.
        channels_last: NHWC memory layout.
        amp: ``precision.amp`` ("none" or "bf16").
        batch_size: images per step.
        input_size: side of the square input.
        num_classes: range of the random labels.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = (
        torch.randn(batch_size, 3, input_size, input_size, generator=gen)
        .to(device)
        .contiguous(memory_format=fmt)
    )
    y = torch.randint(num_classes, (batch_size,), generator=gen).to(device)
    # A small lr keeps weights finite on random labels (the arithmetic is the same for any lr);
    # momentum and weight decay as the paper, so the optimizer does the training loop's work.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        with autocast(device, amp):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def make_eval_step(
    model: nn.Module, device: torch.device, channels_last: bool, amp: str, images: int, input_size: int
) -> Callable[[], None]:
    """A closure that scores ``images`` images by the 10-crop protocol (10 x images crops forward).

    Args:
        model: the module in eval mode.
        device: where the crops live.
        channels_last: NHWC memory layout.
        amp: ``precision.amp`` ("none" or "bf16").
        images: images per step (each contributes 10 crops).
        input_size: side of each crop.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(images * NUM_CROPS, 3, input_size, input_size, generator=gen).to(device)
    x = x.contiguous(memory_format=fmt)

    def step() -> None:
        with torch.no_grad(), autocast(device, amp):
            probs = model(x).float().softmax(dim=1)
            probs.view(images, NUM_CROPS, -1).mean(dim=1)

    return step
