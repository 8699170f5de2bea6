"""MixUp (Zhang et al. 2018) and CutMix (Yun et al. 2019) on the device, drawn like the augmentation.

    mixer = Mixer.for_run(run)                       # None when optim.mixup_alpha = cutmix_alpha = 0
    images, targets = mixer.mix(images, labels, epoch, step)
    loss = mixed_cross_entropy(logits, targets, label_smoothing)

The draws: every image of the global batch gets its own (MixUp or CutMix, lam, box), from a
generator seeded by (seed, epoch, step), drawn for the whole global batch on the device; each
worker takes the draws of its part (``rank_slice``). So the draw at a position is a pure function
of (seed, epoch, step, position), the same for every world size, and a resumed epoch redraws it.

The pairs: each image is mixed with the one at the mirrored position of its worker's part
(``images.flip(0)``, timm's per-image mode): the other workers' images are not on this device.
Who pairs with whom therefore follows the split of the global batch over workers; a resume on
another world size draws the same lam and boxes but pairs differently.

The loss: each image's cross-entropy against its own label weighted ``lam`` plus its partner's
weighted ``1 - lam`` (the same as against the mixed one-hot target, label smoothing applied to
each), averaged over the batch. ``lam`` of a CutMix image is the share of its own pixels left
after the paste (timm's ``correct_lam``). Each worker's mean is weighted by its share of the
global batch in the step, so uneven worker batches still give the global batch's mean.

The training error: a hit when the top class is the label of larger weight (the image's own when
``lam >= 0.5``, else its partner's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.rank_split import rank_slice

if TYPE_CHECKING:
    from pipeline.config import OptimConfig
    from pipeline.train.setup import Run

MIX_STREAM = 0x313  # tells the mixing draws apart from the data's (seed, epoch, step) streams


def mix_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of the mixing draws of one global batch (``step`` counts within the epoch)."""
    return int(np.random.SeedSequence([seed, epoch, step, MIX_STREAM]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass(frozen=True)
class MixDraws:
    """Per image: cut (CutMix) or blended (MixUp), the blend's weight, the box [y0, y1) x [x0, x1)."""

    cut: torch.Tensor  # bool [B]
    blend: torch.Tensor  # float [B]: the image's own weight when blended
    y0: torch.Tensor  # long [B] each
    y1: torch.Tensor
    x0: torch.Tensor
    x1: torch.Tensor

    def __getitem__(self, part: slice) -> MixDraws:
        return MixDraws(*(t[part] for t in (self.cut, self.blend, self.y0, self.y1, self.x0, self.x1)))


@dataclass(frozen=True)
class MixedTargets:
    """What the loss needs of a mixed batch: each image's label, its partner's, and its own weight."""

    labels: torch.Tensor
    partner: torch.Tensor
    weight: torch.Tensor  # float32 [B], lam

    def split(self, size: int) -> list[MixedTargets]:
        """Micro-batches of ``size``, as ``Tensor.split`` cuts the images."""
        parts = zip(self.labels.split(size), self.partner.split(size), self.weight.split(size), strict=True)
        return [MixedTargets(*p) for p in parts]

    def dominant(self) -> torch.Tensor:
        """The label of larger weight (the training error's reference)."""
        return torch.where(self.weight >= 0.5, self.labels, self.partner)


def _beta(alpha: float, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` draws of Beta(alpha, alpha), as the first coordinate of a Dirichlet(alpha, alpha)
    (torch's own Beta sampler takes no generator; this one does, on the CPU and CUDA)."""
    concentration = torch.full((n, 2), alpha, device=device)
    return torch._sample_dirichlet(concentration, generator=generator)[:, 0]


def draw(
    optim: OptimConfig, n: int, height: int, width: int, generator: torch.Generator, device: torch.device
) -> MixDraws:
    """The draws of a global batch of ``n`` images of ``height x width``, always in one order (MixUp's
    lam, CutMix's lam, the switch, the box centres), so each depends only on the generator's seed.

    The CutMix box is timm's ``rand_bbox``: sides ``int(H * sqrt(1 - lam))`` and ``int(W * sqrt(1 -
    lam))``, centred on a uniform pixel, clipped to the image.
    """
    zeros = torch.zeros(n, device=device)
    blend = _beta(optim.mixup_alpha, n, generator, device) if optim.mixup_alpha > 0 else zeros
    cut_lam = _beta(optim.cutmix_alpha, n, generator, device) if optim.cutmix_alpha > 0 else zeros
    if optim.mixup_alpha > 0 and optim.cutmix_alpha > 0:
        cut = torch.rand(n, device=device, generator=generator) < optim.mix_switch_prob
    else:
        cut = torch.full((n,), optim.cutmix_alpha > 0, device=device)
    cy = torch.randint(0, height, (n,), device=device, generator=generator)
    cx = torch.randint(0, width, (n,), device=device, generator=generator)
    side = (1.0 - cut_lam).clamp_min(0.0).sqrt()
    half_h = (height * side).long() // 2
    half_w = (width * side).long() // 2
    return MixDraws(
        cut=cut,
        blend=blend,
        y0=(cy - half_h).clamp(0, height),
        y1=(cy + half_h).clamp(0, height),
        x0=(cx - half_w).clamp(0, width),
        x1=(cx + half_w).clamp(0, width),
    )


def mix(images: torch.Tensor, labels: torch.Tensor, d: MixDraws) -> tuple[torch.Tensor, MixedTargets]:
    """This worker's batch [B, C, H, W] mixed as ``d`` (its part of the draws) says, each image with
    the one at the mirrored position: ``w * x + (1 - w) * partner`` per pixel, where w is the blend
    weight (MixUp) or 0 inside the box and 1 outside (CutMix)."""
    h, w = images.shape[-2:]
    rows = torch.arange(h, device=images.device)[None, :, None]
    cols = torch.arange(w, device=images.device)[None, None, :]
    inside = (
        (rows >= d.y0[:, None, None]) & (rows < d.y1[:, None, None])
        & (cols >= d.x0[:, None, None]) & (cols < d.x1[:, None, None])
    )  # fmt: skip
    own = torch.where(d.cut[:, None, None], (~inside).to(d.blend.dtype), d.blend[:, None, None])
    own = own[:, None].to(images.dtype)  # [B, 1, H, W]
    mixed = images * own + images.flip(0) * (1 - own)
    area = ((d.y1 - d.y0) * (d.x1 - d.x0)).float()
    weight = torch.where(d.cut, 1.0 - area / (h * w), d.blend).float()
    return mixed, MixedTargets(labels, labels.flip(0), weight)


def mixed_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor | MixedTargets, label_smoothing: float = 0.0
) -> torch.Tensor:
    """The batch's mean cross-entropy against hard labels, or against mixed ones (``MixedTargets``)."""
    if isinstance(targets, torch.Tensor):
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    own = F.cross_entropy(logits, targets.labels, reduction="none", label_smoothing=label_smoothing)
    other = F.cross_entropy(logits, targets.partner, reduction="none", label_smoothing=label_smoothing)
    return (targets.weight * own + (1 - targets.weight) * other).mean()


class Mixer:
    """A run's MixUp / CutMix: the draws of each global batch and this worker's part of them."""

    def __init__(self, optim: OptimConfig, seed: int, global_batch: int, rank: int, world: int,
                 device: torch.device) -> None:  # fmt: skip
        self.optim, self.seed, self.global_batch, self.device = optim, seed, global_batch, device
        self.part = rank_slice(global_batch, rank, world)
        self.generator = torch.Generator(device=device)

    @classmethod
    def for_run(cls, run: Run) -> Mixer | None:
        optim = run.cfg.optim
        if optim.mixup_alpha == 0 and optim.cutmix_alpha == 0:
            return None
        d, ctx = run.derived, run.ctx
        return cls(optim, run.cfg.seed, d.global_batch, ctx.rank, ctx.world_size, ctx.device)

    def mix(
        self, images: torch.Tensor, labels: torch.Tensor, epoch: int, step: int
    ) -> tuple[torch.Tensor, MixedTargets]:
        """This worker's batch of ``step`` (within ``epoch``) mixed; nothing waits for the device
        (seeding a generator sets its state from a host number)."""
        self.generator.manual_seed(mix_seed(self.seed, epoch, step))
        h, w = images.shape[-2:]
        draws = draw(self.optim, self.global_batch, h, w, self.generator, self.device)
        return mix(images, labels, draws[self.part])
