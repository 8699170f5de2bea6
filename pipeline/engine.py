"""The training loop every worker runs: setup -> resume -> epochs -> final evaluation.

    from pipeline.engine import train_worker
    train_worker(to_dict(load_config("configs/demo.yaml")))      # one process, no Ray

``pipeline.launch`` runs the same function on every Ray Train worker (``under_ray=True``);
under ``torchrun`` it forms its own process group. Setup (data, model, optimizer) is
``pipeline.worker``'s; this module only steps. ``train_one_epoch`` and ``evaluate`` return
metric dicts; ``train_worker`` decides where they go (stdout, ``metrics.jsonl``, W&B,
``ray.train.report``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
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
from pipeline.config import Config, Derived, config_changes, config_from_dict, requested_gpu, to_dict
from pipeline.distributed import all_reduce_sum, barrier, init_context
from pipeline.evaluate import evaluate, topk_correct
from pipeline.precision import autocast
from pipeline.rundir import RunDir
from pipeline.schedule import learning_rate, plateau_update, warmup_update
from pipeline.storage import checkpoint_candidates, report_epoch, run_location
from pipeline.worker import Run, setup_run

WARMUP_CHECK_EVERY = 10  # iterations between checks of the ResNet-110 warm-up rule


@dataclass(frozen=True)
class LogDue:
    """What a step's metrics go to: the console line, the tracker, or both."""

    console: bool
    tracker: bool


def log_due(cfg: Config, step: int, last_of_epoch: bool) -> LogDue | None:
    """Whether step ``step`` (just completed) is logged, and where; None when it is not."""
    due = LogDue(
        console=step % cfg.log_every_n_steps == 0 or last_of_epoch,
        tracker=step % cfg.tracking.log_every_n_steps == 0,
    )
    return due if due.console or due.tracker else None


def _reduce_counts(values: list[torch.Tensor | float], device: torch.device) -> list[float]:
    return all_reduce_sum(
        torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    ).tolist()


StepCallback = Callable[[dict[str, float], int, LogDue], None]


def train_one_epoch(
    run: Run, epoch: int, progress: ckpt.TrainingProgress, on_steps: StepCallback
) -> tuple[dict[str, float], ckpt.TrainingProgress]:
    """One pass over this rank's shard; returns epoch metrics (reduced over ranks) and the new progress.

    Args:
        run: the live objects.
        epoch: 0-based epoch index.
        progress: step counter and schedule state at the start of the epoch.
        on_steps: called on every rank with step metrics, the step and where they go (``log_due``).
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
        due = log_due(cfg, step, last_of_epoch=i == steps_this_epoch - 1)
        if due is not None:
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
                due,
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
        progress = ckpt.restore(state, model=run.plain, optimizer=run.optimizer, scaler=run.scaler)
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
    ctx = init_context(under_ray, use_gpu=requested_gpu(cfg.cluster))
    run = setup_run(cfg, ctx)
    derived, data = run.derived, run.data
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
        run_dir=rundir.local_dir if rundir else Path("."),
        config={**resolved, "derived": dataclasses.asdict(derived)},
        run_id=progress.wandb_run_id,
        is_main=ctx.is_main,
    )
    progress = dataclasses.replace(progress, wandb_run_id=tracker.run_id)
    printer = _Printer(run)

    def on_steps(metrics: dict[str, float], step: int, due: LogDue) -> None:
        if due.console:
            printer.steps(metrics, step)
        if due.tracker:
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
            val = validate(run, run.plain, val_loader.epoch(epoch), cfg.eval.mode)
            metrics.update({k: v for k, v in val.items() if k != "val/images"})
            new_schedule = plateau_update(
                cfg.schedule,
                progress.schedule,
                val["val/top1_err"],
                base_lr=derived.lr,
                # Patience counts epochs, not evaluations: the epochs since the previous one.
                epochs=(epoch + 1) % cfg.eval.every_n_epochs or cfg.eval.every_n_epochs,
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
                ckpt.save,
                model=run.plain,
                optimizer=run.optimizer,
                scaler=run.scaler,
                progress=progress,
                config=resolved,
            ),
            num_to_keep=cfg.checkpoint.num_to_keep,
        )

    final_mode = cfg.eval.final_mode or cfg.eval.mode
    final = validate(run, run.plain, data.make_val(final_mode).epoch(0), final_mode)
    # CIFAR-10 with a held-out split: the test set is scored too, once, at the end.
    test = validate(run, run.plain, data.make_test().epoch(0), final_mode) if data.make_test else None
    summary = {
        "name": cfg.name,
        "model": cfg.model.name,
        "eval_mode": final_mode,
        "val_top1_err": final["val/top1_err"],
        "val_top5_err": final["val/top5_err"],
        "val_images": final["val/images"],
        # test_top1_err, test_top5_err, test_images (only when a test set was scored)
        **{k.replace("val/", "test_"): v for k, v in (test or {}).items() if k != "val/loss"},
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
        if test:
            print(
                f"test set ({test['val/images']} images): top-1 err {test['val/top1_err']:.2f}% "
                f"top-5 err {test['val/top5_err']:.2f}%",
                flush=True,
            )
        rundir.write_summary(summary)
        tracker.summary(
            {
                f"final/{final_mode}/top1_err": summary["val_top1_err"],
                f"final/{final_mode}/top5_err": summary["val_top5_err"],
                **{
                    k.replace("val/", "final/test/"): v for k, v in (test or {}).items() if k.endswith("_err")
                },
            }
        )
        tracker.finish()
    barrier()
    return summary
