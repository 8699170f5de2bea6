"""A worker's setup before its first step: seeds, threads, data, model, optimizer; and the two
things the training loop carries, ``Run`` (what the run holds) and ``TrainingProgress`` (where it
stands).

    ctx = init_context(under_ray, requested_gpu(cfg.cluster), cfg.cluster.collective_timeout_s)
    run = setup_run(cfg, ctx)          # data -> derived values -> model (DDP, compile) -> SGD (-> EMA)

The loop (``pipeline.train.loop``) takes the ``Run`` from here and only steps through epochs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import Config
from pipeline.data.loaders import Data, Loader
from pipeline.data.shard_feed import ShardedSource
from pipeline.data.source import check_num_classes, open_dataset
from pipeline.host import usable_cpus
from pipeline.store.rundir import run_location
from pipeline.train.derived import Derived, derive
from pipeline.train.distributed import DistContext, wrap_model
from pipeline.train.ema import WeightAverage
from pipeline.train.schedule import ScheduleState


@dataclass
class Run:
    """The live objects of one worker's run; the config stays frozen, state lives here."""

    cfg: Config
    ctx: DistContext
    derived: Derived
    data: Data
    location: str  # where the run's files and checkpoints live (pipeline.store.rundir.run_location)
    network: nn.Module  # the bare network, unwrapped (checkpoints, evaluation)
    model: nn.Module  # what trains: DDP-wrapped, channels_last, compiled as configured
    optimizer: torch.optim.SGD
    scaler: torch.amp.GradScaler
    # The evaluation loaders by (set, eval mode), each built at its first use and kept for the run:
    # a DALI pipeline takes seconds to build, and the sharded layout's starts fetching shards.
    eval_loaders: dict[tuple[str, str], Loader] = field(default_factory=dict)
    # The EMA of the network's weights (optim.ema_decay), None when off.
    ema: WeightAverage | None = None

    def eval_loader(self, split: str, mode: str) -> Loader:
        """This rank's loader over ``split`` (``val``, ``test``, or ``train``: the training images
        unaugmented) in eval ``mode``; the same loader at every call (its passes restart from the
        set's first image)."""
        key = (split, mode)
        if key not in self.eval_loaders:
            builders = {
                "val": lambda: self.data.make_val(mode),
                "test": self.data.make_test,
                "train": self.data.make_train_eval,
            }
            build = builders[split]
            if build is None:
                raise ValueError(f"this dataset has no {split!r} set to score in eval mode")
            self.eval_loaders[key] = build()
        return self.eval_loaders[key]


@dataclass(frozen=True)
class TrainingProgress:
    """Where the run stands: what the loop carries from step to step, restored from and written
    into every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    best_val_top1_err: float = float("inf")
    schedule: ScheduleState = ScheduleState()
    wandb_run_id: str | None = None
    # Mid-epoch only: (loss x n, top-1 hits, top-5 hits, n) of the epoch so far, summed over ranks,
    # so a resumed epoch reports the same training metrics as an uninterrupted one.
    epoch_sums: tuple[float, ...] = ()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_threads(cfg: Config, ctx: DistContext) -> int:
    """DALI threads per worker: the configured number, else under Ray the CPUs Ray reserves for the
    worker, else (torchrun, one process) this process's CPUs shared among the node's ranks."""
    if cfg.data.num_threads > 0:
        return cfg.data.num_threads
    if ctx.under_ray:
        return max(1, min(int(cfg.cluster.cpus_per_worker), usable_cpus()))
    return max(1, usable_cpus() // max(1, ctx.local_world_size))


def build_data(cfg: Config, ctx: DistContext) -> tuple[Data, Derived]:
    """This rank's loaders and the values derived from the dataset's size and the world size."""
    source = open_dataset(cfg.data)
    check_num_classes(cfg.model.num_classes, source)
    derived = derive(cfg, source.num_train, ctx.world_size)
    # The sharded layout's cache is the node's: it prefetches in the order the node's ranks read.
    node = {"node_ranks": ctx.node_ranks} if isinstance(source, ShardedSource) else {}
    data = source.loaders(
        cfg,
        rank=ctx.rank,
        world_size=ctx.world_size,
        device=ctx.device,
        num_threads=worker_threads(cfg, ctx),
        eval_batch=derived.per_worker_eval_batch,
        **node,
    )
    return data, derived


def param_groups(model: nn.Module, weight_decay: float, no_wd_bn_bias: bool) -> list[dict[str, Any]]:
    """SGD groups: weight decay on everything (the paper), or not on BN and bias parameters.

    BN parameters are found by module type, biases as the ``bias`` of their module, so a
    layer called ``bn_like_conv`` is never mistaken for a norm layer.
    """
    if not no_wd_bn_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
        elif getattr(module, "bias", None) is not None and isinstance(module.bias, nn.Parameter):
            no_decay.add(id(module.bias))
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]


def build_model_for(cfg: Config, ctx: DistContext) -> tuple[nn.Module, nn.Module]:
    """(the bare network, the module to train: DDP-wrapped, channels_last, compiled as configured)."""
    from pipeline.models import build_model

    model = build_model(cfg.model)
    if cfg.precision.sync_bn and ctx.world_size > 1:
        if ctx.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif ctx.is_main:  # PyTorch's SyncBatchNorm runs on GPUs only
            print(
                "warning: precision.sync_bn is ignored on CPU workers; BN statistics stay per worker",
                flush=True,
            )
    model = model.to(ctx.device)
    if cfg.precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trained = wrap_model(model, ctx, cfg.precision.grad_compression)
    if cfg.precision.compile:
        trained = torch.compile(trained)
    return model, trained


def setup_run(cfg: Config, ctx: DistContext) -> Run:
    """Everything a worker needs before its first step, in order: data, model, optimizer."""
    seed_everything(cfg.seed + ctx.rank)
    torch.backends.cudnn.benchmark = cfg.precision.cudnn_benchmark
    data, derived = build_data(cfg, ctx)
    network, trained = build_model_for(cfg, ctx)
    optimizer = torch.optim.SGD(
        param_groups(network, cfg.optim.weight_decay, cfg.optim.no_wd_bn_bias),
        lr=derived.lr,
        momentum=cfg.optim.momentum,
        nesterov=cfg.optim.nesterov,
    )
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.precision.amp == "fp16")
    location = run_location(cfg.checkpoint.storage_path, cfg.name)
    ema = WeightAverage.for_config(network, cfg.optim)
    return Run(cfg, ctx, derived, data, location, network, trained, optimizer, scaler, ema=ema)
