"""The training loop every worker runs: data -> model -> optimizer and schedule -> resume -> epochs.

    from pipeline.engine import train_worker
    train_worker(to_dict(load_config("configs/demo.yaml")))      # one process, no Ray

``pipeline.launch`` runs the same function on every Ray Train worker (``under_ray=True``);
under ``torchrun`` it forms its own process group. ``train_one_epoch`` and ``evaluate``
return metric dicts; ``train_worker`` decides where they go (stdout, ``metrics.jsonl``,
W&B, ``ray.train.report``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import checkpoint as ckpt
from pipeline.config import Config, ConfigError, Derived, config_from_dict, derive, to_dict
from pipeline.distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    checkpoint_candidates,
    init_context,
    report_epoch,
    unwrap,
    wrap_model,
)
from pipeline.evaluate import autocast, evaluate, topk_correct
from pipeline.rundir import RunDir, run_location
from pipeline.schedule import learning_rate, plateau_update, warmup_update

WARMUP_CHECK_EVERY = 10  # iterations between checks of the ResNet-110 warm-up rule


@dataclass
class Data:
    """This rank's loaders and what the run needs to know about the dataset."""

    train: Any  # a Loader: len() batches per epoch, .epoch(e) yields (images, labels)
    num_train: int
    num_classes: int
    make_val: Callable[[str], Any]  # eval mode -> a Loader over this rank's validation shard


@dataclass
class Run:
    """The live objects of one worker's run; the config stays frozen, state lives here."""

    cfg: Config
    ctx: DistContext
    derived: Derived
    data: Data
    model: nn.Module  # wrapped (DDP / compiled) for training
    optimizer: torch.optim.SGD
    scaler: torch.amp.GradScaler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_threads(cfg: Config) -> int:
    """DALI threads per worker: the configured number, else the CPUs Ray reserves for the worker."""
    if cfg.data.num_threads > 0:
        return cfg.data.num_threads
    return max(1, min(int(cfg.cluster.cpus_per_worker), os.cpu_count() or 1))


def build_data(cfg: Config, ctx: DistContext, eval_batch: int) -> Data:
    """The train loader and a factory of val loaders, sharded by world rank."""
    if cfg.data.dataset == "cifar10":
        from pipeline.data.cifar import build_cifar_loaders

        train, val, num_train = build_cifar_loaders(
            cfg.data.root,
            cfg.data,
            global_batch=cfg.optim.batch_size,
            shard_id=ctx.rank,
            num_shards=ctx.world_size,
            device=ctx.device,
            seed=cfg.seed,
            eval_batch_size=eval_batch,
        )
        return Data(train=train, num_train=num_train, num_classes=10, make_val=lambda mode: val)

    from pipeline.data.imagenet import build_train_loader, build_val_loader
    from pipeline.data.layout import scan_imagenet

    index = scan_imagenet(cfg.data.root)
    common = dict(
        shard_id=ctx.rank,
        num_shards=ctx.world_size,
        device_id=ctx.device_id,
        num_threads=worker_threads(cfg),
        channels_last=cfg.precision.channels_last,
        half=cfg.precision.amp == "fp16",
    )
    train = build_train_loader(index, cfg.data, global_batch=cfg.optim.batch_size, seed=cfg.seed, **common)

    def make_val(mode: str) -> Any:
        return build_val_loader(
            index, cfg.data, mode=mode, scales=cfg.eval.scales, batch_size=eval_batch, **common
        )

    return Data(
        train=train, num_train=len(index.train_files), num_classes=index.num_classes, make_val=make_val
    )


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


def build_model_for(cfg: Config, ctx: DistContext, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """(the plain module, the module to train: DDP-wrapped, channels_last, compiled as configured)."""
    from pipeline.models import build_model

    if num_classes > cfg.model.num_classes:
        raise ConfigError(
            f"model.num_classes ({cfg.model.num_classes}) is smaller than the dataset's {num_classes} classes; "
            f"set model.num_classes={num_classes}"
        )
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
    trained = wrap_model(model, ctx)
    if cfg.precision.compile:
        trained = torch.compile(trained)
    return model, trained


def _reduce_counts(values: list[torch.Tensor | float], device: torch.device) -> list[float]:
    return all_reduce_sum(
        torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    ).tolist()


def train_one_epoch(
    run: Run, epoch: int, progress: ckpt.TrainingProgress, on_steps: Callable[[dict[str, float], int], None]
) -> tuple[dict[str, float], ckpt.TrainingProgress]:
    """One pass over this rank's shard; returns epoch metrics (reduced over ranks) and the new progress.

    Args:
        run: the live objects.
        epoch: 0-based epoch index.
        progress: step counter and schedule state at the start of the epoch.
        on_steps: called on every rank with step metrics and the step, every ``log_every_n_steps``,
            every ``tracking.log_every_n_steps`` and at the epoch's last step.
    """
    cfg, ctx, derived = run.cfg, run.ctx, run.derived
    run.model.train()
    fmt = torch.channels_last if cfg.precision.channels_last else torch.contiguous_format
    device = ctx.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, top1, top5, n
    window = torch.zeros(2, dtype=torch.float64, device=device)  # for the ResNet-110 rule: top1 hits, n
    step, state = progress.step, progress.schedule
    data_wait = 0.0
    start = tick = time.perf_counter()
    steps_this_epoch = min(len(run.data.train), derived.total_iters - step)
    batches = iter(run.data.train.epoch(epoch))
    lr = 0.0
    for i in range(steps_this_epoch):
        t0 = time.perf_counter()
        images, labels = next(batches)
        data_wait += time.perf_counter() - t0
        lr = learning_rate(
            cfg.schedule, base_lr=derived.lr, it=step, iters_per_epoch=derived.iters_per_epoch, state=state
        )
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, cfg.precision.amp):
            logits = run.model(images.contiguous(memory_format=fmt))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.optim.label_smoothing)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"non-finite loss ({loss_value}) at epoch {epoch} step {step} with lr {lr:.6g}; "
                "lower optim.lr, enable warm-up (schedule.warmup_epochs) or check the data"
            )
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        step += 1
        with torch.no_grad():
            top1, top5 = topk_correct(logits.detach().float(), labels)
            n = labels.numel()
            sums += torch.stack(
                [
                    loss.detach().double() * n,
                    top1.double(),
                    top5.double(),
                    torch.tensor(n, device=device, dtype=torch.float64),
                ]
            )
            window += torch.stack([top1.double(), torch.tensor(n, device=device, dtype=torch.float64)])
        if (
            cfg.schedule.warmup_until_train_err is not None
            and not state.warmup_done
            and step % WARMUP_CHECK_EVERY == 0
        ):
            hits, seen = _reduce_counts(list(window), device)
            state = warmup_update(cfg.schedule, state, 100.0 * (1 - hits / seen))
            window.zero_()
        if (
            step % cfg.log_every_n_steps == 0
            or step % cfg.tracking.log_every_n_steps == 0
            or i == steps_this_epoch - 1
        ):
            elapsed = time.perf_counter() - tick
            done = i + 1
            img_per_s = done * cfg.optim.batch_size / max(time.perf_counter() - start, 1e-9)
            on_steps(
                {
                    "train/step_loss": loss_value,
                    "lr": lr,
                    "img_per_s": img_per_s,
                    "epoch": epoch + done / steps_this_epoch,
                },
                step,
            )
            tick += elapsed
    wall = time.perf_counter() - start
    loss_sum, top1, top5, n = _reduce_counts(list(sums), device)
    metrics = {
        "train/loss": loss_sum / max(n, 1),
        "train/top1_err": 100.0 * (1 - top1 / max(n, 1)),
        "train/top5_err": 100.0 * (1 - top5 / max(n, 1)),
        "lr": lr,
        "img_per_s": n / max(wall, 1e-9),
        "epoch_time_s": wall,
        "data_wait_frac": data_wait / max(wall, 1e-9),
    }
    if device.type == "cuda":
        metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return metrics, dataclasses.replace(progress, step=step, schedule=state)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _Printer:
    """Rank 0's progress lines: every N steps and one per epoch."""

    def __init__(self, run: Run):
        self.run, self.start, self.start_step = run, time.perf_counter(), None

    def steps(self, metrics: dict[str, float], step: int) -> None:
        if not self.run.ctx.is_main:
            return
        if self.start_step is None:
            self.start_step, self.start = step, time.perf_counter()
        d = self.run.derived
        rate = (step - self.start_step) / max(time.perf_counter() - self.start, 1e-9)
        eta = (d.total_iters - step) / rate if rate > 0 else float("nan")
        print(
            f"epoch {metrics['epoch']:.2f}/{d.epochs} step {step}/{d.total_iters} "
            f"loss {metrics['train/step_loss']:.4f} lr {metrics['lr']:.5g} "
            f"img/s {metrics['img_per_s']:.1f} eta {_format_eta(eta) if math.isfinite(eta) else '?'}",
            flush=True,
        )

    def epoch(self, metrics: dict[str, float]) -> None:
        nan = float("nan")
        print(
            f"epoch {metrics['epoch']}/{self.run.derived.epochs} done: train loss {metrics['train/loss']:.4f} "
            f"top1 err {metrics['train/top1_err']:.2f}% | val top1 err {metrics.get('val/top1_err', nan):.2f}% "
            f"top5 err {metrics.get('val/top5_err', nan):.2f}% | lr {metrics['lr']:.5g} "
            f"| {metrics['img_per_s']:.1f} img/s | {metrics['epoch_time_s']:.1f}s",
            flush=True,
        )


def validate(run: Run, model: nn.Module, batches: Any, mode: str) -> dict[str, float]:
    """``evaluate`` with the run's device and precision settings."""
    return evaluate(
        model,
        batches,
        mode=mode,
        device=run.ctx.device,
        amp=run.cfg.precision.amp,
        channels_last=run.cfg.precision.channels_last,
    )


def describe(cfg: Config, derived: Derived, num_train: int, num_classes: int) -> str:
    """The derived values printed at start (and saved in config.yaml under ``derived``)."""
    return (
        f"run {cfg.name}: {cfg.model.name} on {cfg.data.dataset} ({num_train} train images, {num_classes} classes)\n"
        f"  world size {derived.world_size}, global batch {cfg.optim.batch_size}, per-worker batch {derived.per_worker_batch}\n"
        f"  lr {derived.lr:g} (base {cfg.optim.lr:g}{', linear scaling' if cfg.optim.scale_lr else ''}), "
        f"schedule {cfg.schedule.kind}\n"
        f"  {derived.iters_per_epoch} iterations/epoch, {derived.total_iters} iterations, {derived.epochs} epochs"
    )


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two config dicts."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def _restore(run: Run, location: str) -> ckpt.TrainingProgress:
    """The progress to start from: this run's newest readable checkpoint, else ``resume_from``, else nothing.

    A checkpoint that cannot be read (a truncated file after a crash mid-write on some
    filesystems) is skipped with a warning in favour of the one before it.
    """
    candidates = checkpoint_candidates(run.ctx, location)
    if not candidates and run.cfg.resume_from:
        candidates = [Path(run.cfg.resume_from)]
    for source in candidates:
        try:
            state = ckpt.read(source)
        except ckpt.CheckpointError as e:
            if run.ctx.is_main:
                print(f"warning: skipping unusable checkpoint: {e}", flush=True)
            continue
        progress = ckpt.restore(state, model=unwrap(run.model), optimizer=run.optimizer, scaler=run.scaler)
        if run.ctx.is_main:
            print(
                f"restored from checkpoint {source}: epoch {progress.epoch}, step {progress.step}", flush=True
            )
            changed = config_changes(state["config"], to_dict(run.cfg))
            if changed:
                print(f"warning: the config differs from the checkpoint's: {'; '.join(changed)}", flush=True)
        return progress
    if candidates:
        raise ckpt.CheckpointError(
            f"none of the checkpoints of run {run.cfg.name!r} can be read ({', '.join(map(str, candidates))}); "
            "remove them or start under a new name"
        )
    return ckpt.TrainingProgress()


def train_worker(config: dict[str, Any], under_ray: bool = False) -> dict[str, Any]:
    """Train and evaluate as the config says; returns the summary (on every rank).

    Args:
        config: the resolved config as a plain dict (``pipeline.config.to_dict``).
        under_ray: True when called by ``TorchTrainer`` (reporting goes through Ray Train).
    """
    from pipeline.tracking import Tracker

    cfg = config_from_dict(config)
    wall_start = time.perf_counter()
    ctx = init_context(
        under_ray, use_gpu=None if cfg.cluster.use_gpu == "auto" else cfg.cluster.use_gpu == "true"
    )
    seed_everything(cfg.seed + ctx.rank)
    torch.backends.cudnn.benchmark = cfg.precision.cudnn_benchmark

    eval_batch = (cfg.eval.batch_size or cfg.optim.batch_size) // ctx.world_size
    data = build_data(cfg, ctx, eval_batch)
    derived = derive(cfg, data.num_train, ctx.world_size)
    plain, trained = build_model_for(cfg, ctx, data.num_classes)
    optimizer = torch.optim.SGD(
        param_groups(plain, cfg.optim.weight_decay, cfg.optim.no_wd_bn_bias),
        lr=derived.lr,
        momentum=cfg.optim.momentum,
        nesterov=cfg.optim.nesterov,
    )
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.precision.amp == "fp16")
    run = Run(cfg, ctx, derived, data, trained, optimizer, scaler)
    location = run_location(cfg.checkpoint.storage_path, cfg.name)
    progress = _restore(run, location)
    rundir = RunDir(location) if ctx.is_main else None
    resolved = to_dict(cfg)
    if rundir is not None:
        print(describe(cfg, derived, data.num_train, data.num_classes), flush=True)
        rundir.write_config({**resolved, "derived": dataclasses.asdict(derived)})
        rundir.keep_epochs_upto(progress.epoch)
    tracker = Tracker.create(
        cfg.tracking,
        run_name=cfg.name,
        run_dir=rundir.local if rundir else Path("."),
        config={**resolved, "derived": dataclasses.asdict(derived)},
        run_id=progress.wandb_run_id,
        is_main=ctx.is_main,
    )
    progress = dataclasses.replace(progress, wandb_run_id=tracker.run_id)
    printer = _Printer(run)

    def on_steps(metrics: dict[str, float], step: int) -> None:
        if step % cfg.log_every_n_steps == 0 or metrics["epoch"] % 1 == 0:
            printer.steps(metrics, step)
        if step % cfg.tracking.log_every_n_steps == 0:
            tracker.log(metrics, step=step)

    val_loader = data.make_val(cfg.eval.mode)
    last_ckpt = None
    last_val: dict[str, float] = {"val/top1_err": float("inf")}
    img_per_s = []
    for epoch in range(progress.epoch, derived.epochs):
        train_metrics, progress = train_one_epoch(run, epoch, progress, on_steps)
        img_per_s.append(train_metrics["img_per_s"])
        metrics = {"epoch": epoch + 1, "step": progress.step, **train_metrics}
        if (epoch + 1) % cfg.eval.every_n_epochs == 0 or epoch + 1 == derived.epochs:
            val = validate(run, unwrap(run.model), val_loader.epoch(epoch), cfg.eval.mode)
            metrics.update({k: v for k, v in val.items() if k != "val/images"})
            new_schedule = plateau_update(
                cfg.schedule, progress.schedule, val["val/top1_err"], base_lr=derived.lr
            )
            progress = dataclasses.replace(
                progress,
                schedule=new_schedule,
                best_val_top1_err=min(progress.best_val_top1_err, val["val/top1_err"]),
            )
        progress = dataclasses.replace(progress, epoch=epoch + 1)
        if ctx.is_main:
            printer.epoch(metrics)
            rundir.append_metrics(metrics)
            tracker.log(metrics, step=progress.step)
        last_val = {k: v for k, v in metrics.items() if k.startswith("val/")} or last_val
        last_ckpt = report_epoch(
            ctx,
            # Ray keeps the best checkpoints by val/top1_err, so epochs without validation carry the last one.
            {**last_val, **metrics},
            f"checkpoint_epoch{epoch + 1:04d}",
            location,
            functools.partial(
                ckpt.save, model=plain, optimizer=optimizer, scaler=scaler, progress=progress, config=resolved
            ),
            num_to_keep=cfg.checkpoint.num_to_keep,
        )

    final_mode = cfg.eval.final_mode or cfg.eval.mode
    final = validate(run, plain, data.make_val(final_mode).epoch(0), final_mode)
    summary = {
        "name": cfg.name,
        "model": cfg.model.name,
        "eval_mode": final_mode,
        "val_top1_err": final["val/top1_err"],
        "val_top5_err": final["val/top5_err"],
        "val_images": final["val/images"],
        "best_val_top1_err": progress.best_val_top1_err,
        "epochs": progress.epoch,
        "steps": progress.step,
        "wall_s": time.perf_counter() - wall_start,
        "img_per_s": float(np.mean(img_per_s)) if img_per_s else None,
        "checkpoint": last_ckpt,
        "wandb_dir": tracker.wandb_dir,
        "wandb_mode": tracker.mode,
        "run_dir": location,
    }
    if ctx.is_main:
        print(
            f"final ({final_mode}, {final['val/images']} images): val top-1 err {summary['val_top1_err']:.2f}% "
            f"top-5 err {summary['val_top5_err']:.2f}% | checkpoint {last_ckpt} | run dir {location}",
            flush=True,
        )
        rundir.write_summary(summary)
        tracker.summary(
            {
                f"final/{final_mode}/top1_err": summary["val_top1_err"],
                f"final/{final_mode}/top5_err": summary["val_top5_err"],
            }
        )
        tracker.finish()
    barrier()
    return summary
