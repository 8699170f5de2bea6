"""The training error as the paper means it: the training images scored in eval mode.

``train/top1_err`` is the running error over an epoch's augmented batches with BN in training
mode (the dashed curves of the paper's figures, as most code logs them). The constructed
solution's claim, "a deeper model should produce no higher training error than its shallower
counterpart", is about the function the network computes: the training images as they are (no
augmentation), BN in eval mode. ``train_set_metrics`` scores exactly that, every image once over
the ranks, as ``train_eval/top1_err``, ``train_eval/top5_err`` and ``train_eval/loss``.

``eval.train_eval`` switches it (None: on for CIFAR-10, where it costs about a validation pass
of 5x the images; off for ImageNet, a pass over 1.28M images per epoch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.train.distributed import broadcast_buffers
from pipeline.train.evaluate import evaluate

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.train.setup import Run

PREFIX = "train_eval/"


def train_eval_on(cfg: Config) -> bool:
    """Whether runs of this config score the training set in eval mode (``eval.train_eval``)."""
    return cfg.eval.train_eval if cfg.eval.train_eval is not None else cfg.data.dataset == "cifar10"


def train_set_metrics(run: Run) -> dict[str, float]:
    """``{"train_eval/top1_err", "train_eval/top5_err", "train_eval/loss"}`` of the training images in
    eval mode (centre view, no augmentation, rank 0's BN statistics); ``{}`` when switched off."""
    if not train_eval_on(run.cfg) or run.data.make_train_eval is None:
        return {}
    broadcast_buffers(run.network)
    result = evaluate(
        run.network,
        run.data.make_train_eval().epoch(0),
        mode="center",
        device=run.ctx.device,
        amp=run.cfg.precision.amp,
        channels_last=run.cfg.precision.channels_last,
    )
    return {PREFIX + k.removeprefix("val/"): v for k, v in result.items() if k != "val/images"}
