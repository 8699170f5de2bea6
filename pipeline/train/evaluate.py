"""The network scored in eval mode: the validation set as the paper scores it, and the training
images the same way.

    metrics = score(run, "val", "tencrop")    # every rank: val/top1_err, val/top5_err, val/loss, val/images
    metrics = score(run, "train", "center")   # the training images: train_eval/top1_err, ...
    metrics = evaluate(model, batches, mode="center", device=device)   # any batches (the eval command)

``score`` is the one way the training loop evaluates: validation every few epochs, the training
images in eval mode beside it, the final evaluation and CIFAR-10's held-out test set. It takes
the set's loader from the run, where it is built once per set and mode and reused.

``evaluate`` returns exact top-1/top-5 error over the whole set: each rank counts only the real
images of its shard (the loaders drop DALI's padding), and the counts are summed across ranks, so
any world size gives the same numbers.

- ``center``: one 224 crop of the image resized to shorter side 256 (``data.val_crop`` and
  ``data.val_resize`` set both); with ``eval.flip`` its mirror too, softmax scores averaged.
- ``tencrop``: four corners and centre, and their flips; softmax scores averaged over the
  10 crops (the paper averages scores).
- ``multiscale``: the whole image at each shorter side in ``eval.scales``, run fully
  convolutionally (global average pooling takes any size); softmax scores averaged.

The training error as the paper means it: ``train/top1_err`` is the running error over an epoch's
augmented batches with BN in training mode (the dashed curves of the paper's figures, as most
code logs them). The constructed solution's claim, "a deeper model should produce no higher
training error than its shallower counterpart", is about the function the network computes: the
training images as they are (no augmentation, centre view), BN in eval mode. ``score(run,
"train", "center")`` measures exactly that, every image once over the ranks, as
``train_eval/*``. ``eval.train_eval`` switches it (None: on for CIFAR-10, where it costs about a
validation pass of 5x the images; off for ImageNet, a pass over 1.28M images per epoch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from pipeline.config import is_cifar
from pipeline.data.constants import NUM_TEN_CROPS
from pipeline.train.distributed import all_reduce_sum, broadcast_buffers

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.train.setup import Run

# The metrics' prefix for each set ``score`` takes: the training images are "train_eval/", since
# "train/" is the running error of the augmented batches.
PREFIXES = {"val": "val/", "test": "test/", "train": "train_eval/"}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision as ``precision.amp`` says (``none`` | ``bf16`` | ``fp16``), for the training
    step and evaluation alike."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def topk_correct(
    scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> list[torch.Tensor]:
    """How many rows have their label within the top k scores, for each k (clamped to the class count)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top.eq(labels[:, None])
    return [hits[:, : min(k, scores.shape[1])].any(dim=1).sum() for k in ks]


def _scores(
    model: torch.nn.Module, inputs: Any, mode: str, channels_last: bool, flip: bool = False
) -> torch.Tensor:
    """Class probabilities [B, K] for one batch in the given mode (``flip``: centre crops and
    their mirrors, scores averaged)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if mode == "center":
        probs = model(inputs.contiguous(memory_format=fmt)).float().softmax(dim=1)
        if not flip:
            return probs
        mirrored = model(inputs.flip(dims=[3]).contiguous(memory_format=fmt)).float().softmax(dim=1)
        return (probs + mirrored) / 2
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
    prefix: str = "val/",
    flip: bool = False,
) -> dict[str, float]:
    """Score every validation image once and return errors in percent, summed over ranks.

    Args:
        model: the unwrapped network (no DDP: ranks may see different batch counts).
        batches: this rank's validation batches, ``(inputs, labels)`` as the loaders yield.
        mode: ``center`` | ``tencrop`` | ``multiscale``.
        device: where the counts live (the model's device).
        amp: ``precision.amp``.
        channels_last: run convolutions in NHWC.
        prefix: the metrics' prefix (``score`` names the set: ``val/``, ``test/``, ``train_eval/``).
        flip: centre mode also scores each crop's mirror (``eval.flip``).

    Returns:
        ``{"val/top1_err", "val/top5_err", "val/loss", "val/images"}`` (with ``prefix``); errors in percent.
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
                probs = _scores(model, inputs, mode, channels_last, flip)
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
        f"{prefix}top1_err": 100.0 * (1 - top1 / n),
        f"{prefix}top5_err": 100.0 * (1 - top5 / n),
        f"{prefix}loss": nll / n,
        f"{prefix}images": int(n),
    }


def train_eval_on(cfg: Config) -> bool:
    """Whether runs of this config score the training set in eval mode (``eval.train_eval``)."""
    return cfg.eval.train_eval if cfg.eval.train_eval is not None else is_cifar(cfg.data.dataset)


def score(run: Run, split: str, mode: str, weights: str = "live") -> dict[str, float]:
    """One set scored by the run's network (or the EMA of its weights) in eval mode, every image
    once over the ranks.

    Every rank uses rank 0's BN statistics (they drift apart when BN is per worker), so every rank
    scores the same function.

    Args:
        run: the worker's run; its loader for (``split``, ``mode``) is built at the first call.
        split: ``val``, ``test`` (CIFAR-10's held-out test set) or ``train`` (the training images,
            no augmentation).
        mode: ``center`` | ``tencrop`` | ``multiscale``.
        weights: ``live`` (the network as trained) or ``ema`` (``run.ema``, ``optim.ema_decay``),
            whose metrics carry ``ema_`` after the set's prefix (``val/ema_top1_err``).

    Returns:
        ``top1_err``, ``top5_err`` (percent), ``loss`` and ``images``, prefixed ``val/``,
        ``test/`` or ``train_eval/``.
    """
    if weights not in ("live", "ema") or (weights == "ema" and run.ema is None):
        raise ValueError(f"weights={weights!r}: choose 'live', or 'ema' in a run with optim.ema_decay set")
    network = run.network if weights == "live" else run.ema.module
    broadcast_buffers(network)
    return evaluate(
        network,
        run.eval_loader(split, mode).epoch(0),
        mode=mode,
        device=run.ctx.device,
        amp=run.cfg.precision.amp,
        channels_last=run.cfg.precision.channels_last,
        prefix=PREFIXES[split] + ("ema_" if weights == "ema" else ""),
        flip=run.cfg.eval.flip,
    )
