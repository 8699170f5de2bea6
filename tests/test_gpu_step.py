"""What the GPU step relies on, checked where it can be on the CPU: DDP's gradient options,
cuDNN autotuning off for multi-scale evaluation, DALI's threads outside Ray."""

from __future__ import annotations

import gc
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.config import load_config
from pipeline.train.distributed import DistContext, finish, wrap_model
from pipeline.train.evaluate import evaluate
from pipeline.train.setup import worker_threads


def _ddp_grads(rank: int, store: str, compression: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    ctx = DistContext(rank, 2, rank, torch.device("cpu"), False, owns_group=True)
    model = wrap_model(nn.Linear(16, 4), ctx, grad_compression=compression)
    assert model.gradient_as_bucket_view  # gradients live in the all-reduce buckets: no copy
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(rank))
    model(x).square().sum().backward()
    if rank == 0:
        torch.save(model.module.weight.grad, out)
    # How a torchrun run ends (pipeline.driver.train_cmd): the group ended, then the DDP model's
    # reference cycles collected while the interpreter is whole. Without the barrier, and once in a
    # fresh-clone CI run without the collection, the process aborted at exit.
    finish(ctx)
    assert not dist.is_initialized()
    del model
    gc.collect()


def _grads(compression: str) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "grad.pt")
        mp.spawn(_ddp_grads, args=(os.path.join(tmp, "store"), compression, out), nprocs=2, join=True)
        return torch.load(out)


@pytest.mark.slow
def test_bf16_gradient_compression_sends_bf16():
    exact, compressed = _grads("none"), _grads("bf16")
    assert not torch.equal(exact, compressed)  # the hook is on: the averaged gradient went through bf16
    torch.testing.assert_close(compressed, exact, rtol=1e-2, atol=1e-2)  # bf16 keeps 3 significant digits
    torch.testing.assert_close(compressed, exact.bfloat16().float(), rtol=2e-2, atol=2e-2)


class _Recorder(nn.Module):
    """Records cuDNN's autotuning flag at every forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.backends.cudnn.benchmark)
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("mode", ["center", "multiscale"])
def test_cudnn_autotuning_is_off_for_multiscale_only_and_restored(mode):
    model = _Recorder()
    labels = torch.tensor([0, 1])
    if mode == "center":
        batches = [(torch.randn(2, 3, 8, 8), labels)]
    else:  # whole images of two sizes, one list of scales per sample
        batches = [([[torch.randn(1, 3, 8, 8), torch.randn(1, 3, 12, 10)] for _ in range(2)], labels)]
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        evaluate(model, batches, mode=mode, device=torch.device("cpu"))
        assert model.seen and all(flag is (mode != "multiscale") for flag in model.seen)
        assert torch.backends.cudnn.benchmark is True  # restored for training
    finally:
        torch.backends.cudnn.benchmark = before


def test_dali_threads_outside_ray_share_the_cpus_among_local_ranks(monkeypatch):
    monkeypatch.setattr("pipeline.train.setup.usable_cpus", lambda: 16)
    cfg = load_config(None, ["cluster.cpus_per_worker=2"])
    cpu = torch.device("cpu")
    assert (
        worker_threads(cfg, DistContext(0, 8, 0, cpu, False, local_world_size=8)) == 2
    )  # torchrun, 8 per node
    assert worker_threads(cfg, DistContext(0, 1, 0, cpu, False)) == 16  # one process has them all
    assert (
        worker_threads(cfg, DistContext(0, 8, 0, cpu, True, local_world_size=8)) == 2
    )  # Ray: what it reserves
    fixed = load_config(None, ["data.num_threads=3"])
    assert worker_threads(fixed, DistContext(0, 1, 0, cpu, False)) == 3
