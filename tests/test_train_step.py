"""The recipe at any scale: micro-batches and uneven splits give exactly the global batch's gradient."""

from __future__ import annotations

import gc
import os
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.config import load_config
from pipeline.data.rank_split import rank_slice
from pipeline.train.derived import accumulation, derive
from pipeline.train.loop import train_step

GLOBAL = 8


def _model() -> nn.Module:
    """BN-free, so micro-batches see the same function as the whole batch."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL, 3, 8, 8, generator=g), torch.randint(0, 3, (GLOBAL,), generator=g)


def _run(model: nn.Module, micro: int, world: int = 1) -> SimpleNamespace:
    """What ``train_step`` reads of a Run; lr 0 keeps the weights, so the gradients can be compared."""
    cfg = load_config(None, [f"optim.batch_size={GLOBAL}"])
    derived = SimpleNamespace(micro_batch=micro, world_size=world, global_batch=GLOBAL)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return SimpleNamespace(cfg=cfg, derived=derived, model=model, optimizer=optimizer, scaler=scaler)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_accumulation_splits():
    assert accumulation(256, 0) == (256, 1)  # no limit
    assert accumulation(256, 256) == (256, 1)
    assert accumulation(256, 64) == (64, 4)
    assert accumulation(256, 100) == (86, 3)  # 86 + 86 + 84: each weighted by its size
    cfg = load_config(None, ["optim.batch_size=256", "optim.max_worker_batch=64", "cluster.num_workers=2"])
    d = derive(cfg, 10_000, 2)
    assert (d.per_worker_batch, d.micro_batch, d.accum_steps) == (128, 64, 2)


def test_micro_batches_give_the_whole_batch_gradient():
    images, labels = _batch()
    whole = _model()
    loss, top1, _ = train_step(_run(whole, micro=GLOBAL), images, labels)
    for micro in (4, 3):  # 4 + 4, and the uneven 3 + 3 + 2
        parts = _model()
        loss_parts, top1_parts, _ = train_step(_run(parts, micro=micro), images, labels)
        for a, b in zip(_grads(parts), _grads(whole), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(loss_parts, loss)  # the batch's mean loss either way
        assert int(top1_parts) == int(top1)


def _uneven_rank(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    images, labels = _batch()
    mine = rank_slice(GLOBAL, rank, world)  # 8 over 3 workers: 2, 3, 3 images
    model = nn.parallel.DistributedDataParallel(_model())
    train_step(_run(model, micro=2, world=world), images[mine], labels[mine])  # and micro-batches of 2
    if rank == 0:
        torch.save(_grads(model.module), out)
    # DDP's reducer (its threads) gone before the group it uses, then a barrier and the end of the
    # group: left to the interpreter's exit, a gloo rank sometimes aborted ("terminate called
    # without an active exception", 1 run in 15 here).
    del model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def test_uneven_split_over_ranks_gives_the_global_batch_gradient():
    """8 images over 3 DDP ranks (2, 3, 3), each in micro-batches: the all-reduced gradient is the
    one of the 8 images in one process."""
    images, labels = _batch()
    whole = _model()
    train_step(_run(whole, micro=GLOBAL), images, labels)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "grads.pt")
        mp.spawn(_uneven_rank, args=(3, os.path.join(tmp, "store"), out), nprocs=3, join=True)
        grads = torch.load(out)
    for a, b in zip(grads, _grads(whole), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_rank_slices_cover_the_batch():
    for world in (1, 2, 3, 5, 8):
        slices = [rank_slice(GLOBAL, r, world) for r in range(world)]
        assert slices[0].start == 0 and slices[-1].stop == GLOBAL
        assert all(a.stop == b.start for a, b in zip(slices, slices[1:], strict=False))
        assert max(s.stop - s.start for s in slices) - min(s.stop - s.start for s in slices) <= 1
    with pytest.raises(ValueError, match="smaller than the 9 workers"):
        rank_slice(GLOBAL, 0, 9)
