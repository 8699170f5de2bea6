"""MixUp and CutMix: the mixed pixels and targets against hand computations, the loss against soft
targets, the draws as pure functions of (seed, epoch, step, position), and uneven DDP splits."""

from __future__ import annotations

import gc
import math
import os
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError, OptimConfig, load_config
from pipeline.data.rank_split import rank_slice
from pipeline.train.loop import train_step
from pipeline.train.mixing import MixDraws, MixedTargets, Mixer, draw, mix, mix_seed, mixed_cross_entropy

CPU = torch.device("cpu")
BOTH = OptimConfig(mixup_alpha=0.2, cutmix_alpha=1.0)


def _draws(**columns) -> MixDraws:
    return MixDraws(**{k: torch.tensor(v) for k, v in columns.items()})


def test_mix_against_a_hand_computation():
    # Four 1-channel 4x4 images of constant value 1, 2, 3, 4; partners (mirrored) are 4, 3, 2, 1.
    images = torch.arange(1.0, 5.0)[:, None, None, None].expand(4, 1, 4, 4).contiguous()
    labels = torch.tensor([0, 1, 2, 3])
    d = _draws(
        cut=[False, True, True, False],
        blend=[0.75, 0.0, 0.0, 0.25],
        y0=[0, 1, 0, 0], y1=[0, 3, 4, 0], x0=[0, 0, 2, 0], x1=[0, 2, 3, 0],
    )  # fmt: skip
    mixed, targets = mix(images, labels, d)
    assert mixed[0].eq(0.75 * 1 + 0.25 * 4).all()  # 1.75 everywhere
    assert mixed[3].eq(0.25 * 4 + 0.75 * 1).all()  # 1.75 too: 0.25 of its own 4
    box = torch.zeros(4, 4, dtype=torch.bool)
    box[1:3, 0:2] = True  # image 1: rows 1-2, columns 0-1 pasted from image 2 (value 3)
    assert torch.equal(mixed[1, 0], torch.where(box, 3.0, 2.0))
    box = torch.zeros(4, 4, dtype=torch.bool)
    box[0:4, 2:3] = True  # image 2: column 2 pasted from image 1 (value 2)
    assert torch.equal(mixed[2, 0], torch.where(box, 2.0, 3.0))
    assert targets.partner.tolist() == [3, 2, 1, 0]
    assert targets.weight.tolist() == [0.75, 1 - 4 / 16, 1 - 4 / 16, 0.25]  # a cut's own pixel share
    assert targets.dominant().tolist() == [0, 1, 2, 0]  # image 3 is mostly image 0


def test_mixed_loss_is_the_cross_entropy_against_the_mixed_soft_target():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    targets = MixedTargets(torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([4, 3, 2, 1, 0, 0]),
                           torch.tensor([0.7, 0.5, 1.0, 0.0, 0.3, 0.9]))  # fmt: skip
    for smoothing in (0.0, 0.1):
        soft = targets.weight[:, None] * F.one_hot(targets.labels, 5) + (
            1 - targets.weight[:, None]
        ) * F.one_hot(targets.partner, 5)
        soft = soft * (1 - smoothing) + smoothing / 5  # timm: smooth each one-hot, then mix
        expected = -(soft * logits.log_softmax(dim=1)).sum(dim=1).mean()
        torch.testing.assert_close(mixed_cross_entropy(logits, targets, smoothing), expected)
    hard = torch.tensor([0, 1, 2, 3, 4, 0])
    torch.testing.assert_close(mixed_cross_entropy(logits, hard), F.cross_entropy(logits, hard))


def _draw_batch(
    optim: OptimConfig, seed: int, epoch: int, step: int, n: int = 64, size: int = 32
) -> MixDraws:
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, step))
    return draw(optim, n, size, size, g, CPU)


def _same(a: MixDraws, b: MixDraws) -> bool:
    return all(torch.equal(x, y) for x, y in zip(vars(a).values(), vars(b).values(), strict=True))


def test_draws_are_pure_functions_of_seed_epoch_step_and_position():
    a = _draw_batch(BOTH, 0, 3, 7)
    assert _same(a, _draw_batch(BOTH, 0, 3, 7))
    assert not _same(a, _draw_batch(BOTH, 0, 3, 8)) and not _same(a, _draw_batch(BOTH, 1, 3, 7))
    # Each worker takes its part of the global batch's draws: the same per position for any world.
    for world in (1, 3, 5):
        parts = [a[rank_slice(64, r, world)] for r in range(world)]
        joined = MixDraws(*(torch.cat([vars(p)[k] for p in parts]) for k in vars(a)))
        assert _same(joined, a)
    # The box is timm's rand_bbox: half-sides int(32 * sqrt(1 - lam)) // 2 around the centre, clipped.
    assert ((a.y0 >= 0) & (a.y1 <= 32) & (a.y0 <= a.y1) & (a.x0 <= a.x1)).all()
    assert 0.3 < a.cut.float().mean() < 0.7  # mix_switch_prob 0.5
    assert ((a.blend >= 0) & (a.blend <= 1)).all()


def test_draws_follow_beta_and_the_switch():
    mixup = _draw_batch(OptimConfig(mixup_alpha=1.0), 0, 0, 0, n=20_000)
    assert not mixup.cut.any()
    assert abs(mixup.blend.mean() - 0.5) < 0.01 and abs(mixup.blend.var() - 1 / 12) < 0.005  # Beta(1, 1)
    cutmix = _draw_batch(OptimConfig(cutmix_alpha=1.0), 0, 0, 0, n=20_000, size=224)
    assert cutmix.cut.all()
    own = 1 - ((cutmix.y1 - cutmix.y0) * (cutmix.x1 - cutmix.x0)).double() / 224**2
    # Clipping at the border pastes less than drawn: the own share's mean is above Beta(1, 1)'s 0.5.
    assert 0.5 < own.mean() < 0.75
    rare = _draw_batch(OptimConfig(mixup_alpha=0.2, cutmix_alpha=0.2, mix_switch_prob=0.1), 0, 0, 0, n=20_000)
    assert abs(rare.cut.float().mean() - 0.1) < 0.01
    assert math.isfinite(rare.blend.sum()) and (rare.blend.lt(0.1) | rare.blend.gt(0.9)).float().mean() > 0.5


def test_mixer_mixes_a_workers_part_with_its_part_of_the_draws():
    images = torch.randn(5, 3, 8, 8)
    labels = torch.arange(5)
    mixer = Mixer(BOTH, seed=4, global_batch=13, rank=2, world=3, device=CPU)  # rank 2 of 13 over 3: 8..13
    mixed, targets = mixer.mix(images, labels, epoch=1, step=2)
    expected_mixed, expected = mix(images, labels, _draw_batch(BOTH, 4, 1, 2, n=13, size=8)[slice(8, 13)])
    assert torch.equal(mixed, expected_mixed) and torch.equal(targets.weight, expected.weight)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.mixup_alpha=-1", "optim.mixup_alpha: must be 0"),
        ("optim.cutmix_alpha=-0.5", "optim.cutmix_alpha: must be 0"),
        ("optim.mix_switch_prob=1.5", "optim.mix_switch_prob: must be a probability"),
        ("optim.mix_switch_prob=0.3", "needs both optim.mixup_alpha"),
    ],
)
def test_bad_mixing_values_are_rejected_by_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


GLOBAL = 8


def _model() -> nn.Module:
    torch.manual_seed(0)  # BN-free: micro-batches and ranks see the same function
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )


def _mixed_parts(world: int) -> list[tuple[torch.Tensor, MixedTargets]]:
    """Each rank's part of one global batch, mixed as its Mixer mixes it."""
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(GLOBAL, 3, 8, 8, generator=g), torch.randint(0, 3, (GLOBAL,), generator=g)
    parts = []
    for rank in range(world):
        mine = rank_slice(GLOBAL, rank, world)
        mixer = Mixer(BOTH, seed=0, global_batch=GLOBAL, rank=rank, world=world, device=CPU)
        parts.append(mixer.mix(images[mine], labels[mine], epoch=0, step=5))
    return parts


def _run(model: nn.Module, micro: int, world: int = 1) -> SimpleNamespace:
    cfg = load_config(None, [f"optim.batch_size={GLOBAL}", "optim.mixup_alpha=0.2", "optim.cutmix_alpha=1.0"])
    derived = SimpleNamespace(micro_batch=micro, world_size=world, global_batch=GLOBAL)
    return SimpleNamespace(cfg=cfg, derived=derived, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                           scaler=torch.amp.GradScaler("cpu", enabled=False))  # fmt: skip


def _uneven_rank(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    images, targets = _mixed_parts(world)[rank]
    model = nn.parallel.DistributedDataParallel(_model())
    train_step(_run(model, micro=2, world=world), images, targets.labels, targets)
    if rank == 0:
        torch.save([p.grad.clone() for p in model.module.parameters()], out)
    del model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # a whole command or several processes: the full suite's tier
def test_mixed_uneven_split_over_ranks_gives_the_global_batch_gradient():
    """8 mixed images over 3 DDP ranks (2, 3, 3) in micro-batches of 2: the all-reduced gradient is
    that of the 3 ranks' mixed images and targets as one batch of 8 in one process."""
    parts = _mixed_parts(3)
    images = torch.cat([p[0] for p in parts])
    targets = MixedTargets(
        *(torch.cat([vars(p[1])[k] for p in parts]) for k in ("labels", "partner", "weight"))
    )
    whole = _model()
    loss, top1, _ = train_step(_run(whole, micro=GLOBAL), images, targets.labels, targets)
    torch.testing.assert_close(loss, mixed_cross_entropy(whole(images), targets))
    assert int(top1) == int(whole(images).argmax(1).eq(targets.dominant()).sum())
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "grads.pt")
        mp.spawn(_uneven_rank, args=(3, os.path.join(tmp, "store"), out), nprocs=3, join=True)
        grads = torch.load(out)
    for a, b in zip(grads, [p.grad for p in whole.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
