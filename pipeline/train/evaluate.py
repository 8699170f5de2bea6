"""Validation as the paper scores it: centre crop, 10-crop, or fully-convolutional multi-scale.

``evaluate`` returns exact top-1/top-5 error over the whole validation set: each rank
counts only the real images of its shard (the loaders drop DALI's padding), and the counts
are summed across ranks, so any world size gives the same numbers.

- ``center``: one 224 crop of the image resized to shorter side 256.
- ``tencrop``: four corners and centre, and their flips; softmax scores averaged over the
  10 crops (the paper averages scores).
- ``multiscale``: the whole image at each shorter side in ``eval.scales``, run fully
  convolutionally (global average pooling takes any size); softmax scores averaged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.data.constants import NUM_TEN_CROPS
from pipeline.train.distributed import all_reduce_sum
from pipeline.train.precision import autocast


def topk_correct(
    scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> list[torch.Tensor]:
    """How many rows have their label within the top k scores, for each k (clamped to the class count)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top.eq(labels[:, None])
    return [hits[:, : min(k, scores.shape[1])].any(dim=1).sum() for k in ks]


def _scores(model: torch.nn.Module, inputs: Any, mode: str, channels_last: bool) -> torch.Tensor:
    """Class probabilities [B, K] for one batch in the given mode."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if mode == "center":
        return model(inputs.contiguous(memory_format=fmt)).float().softmax(dim=1)
    if mode == "tencrop":
        probs = model(inputs.contiguous(memory_format=fmt)).float().softmax(dim=1)
        return probs.view(-1, NUM_TEN_CROPS, probs.shape[1]).mean(dim=1)
    if mode == "multiscale":
        # inputs: per sample, a list over scales of [1, 3, h, w] views of the whole image.
        rows = []
        for views in inputs:
            probs = [model(v.contiguous(memory_format=fmt)).float().softmax(dim=1) for v in views]
            rows.append(torch.cat(probs).mean(dim=0))
        return torch.stack(rows)
    raise ValueError(f"eval mode {mode!r}: choose one of center, tencrop, multiscale")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    *,
    mode: str,
    device: torch.device,
    amp: str = "none",
    channels_last: bool = False,
) -> dict[str, float]:
    """Score every validation image once and return errors in percent, summed over ranks.

    Args:
        model: the unwrapped network (no DDP: ranks may see different batch counts).
        batches: this rank's validation batches, ``(inputs, labels)`` as the loaders yield.
        mode: ``center`` | ``tencrop`` | ``multiscale``.
        device: where the counts live (the model's device).
        amp: ``precision.amp``.
        channels_last: run convolutions in NHWC.

    Returns:
        ``{"val/top1_err", "val/top5_err", "val/loss", "val/images"}``; errors in percent.
    """
    was_training = model.training
    model.eval()
    # Whole images at five scales are thousands of new shapes: cuDNN would autotune every one.
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = benchmark and mode != "multiscale"
    # [top-1 correct, top-5 correct, summed NLL] accumulate on the device (float64 keeps counts
    # exact) and the image count on the host (a shape): nothing waits for the GPU until the end.
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    images = 0
    try:
        with autocast(device, amp):
            for inputs, labels in batches:
                labels = labels.to(device, non_blocking=True)
                probs = _scores(model, inputs, mode, channels_last)
                top1, top5 = topk_correct(probs, labels)
                nll = F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
                sums += torch.stack([top1, top5, nll]).double()
                images += labels.shape[0]
    finally:
        torch.backends.cudnn.benchmark = benchmark
        model.train(was_training)
    totals = torch.cat([sums, torch.tensor([float(images)], dtype=torch.float64, device=device)])
    top1, top5, nll, n = all_reduce_sum(totals).tolist()
    if n == 0:
        raise RuntimeError("evaluation saw no images: the validation set or this world's shards are empty")
    return {
        "val/top1_err": 100.0 * (1 - top1 / n),
        "val/top5_err": 100.0 * (1 - top5 / n),
        "val/loss": nll / n,
        "val/images": int(n),
    }
