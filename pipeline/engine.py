"""The training loop every worker runs: setup -> resume -> epochs -> final evaluation.

    from pipeline.engine import train_worker
    train_worker(to_dict(load_config("configs/demo.yaml")))      # one process, no Ray

``pipeline.launch`` runs the same function on every Ray Train worker (``under_ray=True``);
under ``torchrun`` it forms its own process group. Setup (data, model, optimizer) is
``pipeline.worker``'s, the metrics' destinations ``pipeline.outputs``'; this module only
steps. ``train_one_epoch`` and ``evaluate`` return metric dicts.

Nothing in a step waits for the device: the loss and the counts stay on it and are read
every ``log_every_n_steps`` (and at the end of an epoch); a non-finite loss is noted on the
device and raised at the next such read, naming the step where it first appeared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import checkpoint as ckpt
from pipeline.config import Config, config_changes, config_from_dict, requested_gpu, to_dict
from pipeline.distributed import all_reduce_sum, broadcast_buffers, broadcast_object, finish, init_context
from pipeline.evaluate import evaluate, topk_correct
from pipeline.init_from import load_initial_weights
from pipeline.outputs import RunOutputs
from pipeline.precision import autocast
from pipeline.schedule import learning_rate, plateau_update, warmup_update
from pipeline.storage import checkpoint_candidates, checkpoint_name, fetched, report_checkpoint, run_location
from pipeline.train_error import train_set_metrics
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


StepCallback = Callable[[dict[str, float], int, LogDue], None]
SaveCallback = Callable[[ckpt.TrainingProgress], None]


def _lr_at(run: Run, step: int, state: Any) -> float:
    d = run.derived
    return learning_rate(
        run.cfg.schedule, base_lr=d.lr, it=step, iters_per_epoch=d.iters_per_epoch, state=state
    )


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One optimizer step over this worker's batch, in micro-batches of at most ``micro_batch``.

    Each micro-batch's mean loss is weighted by its share of the global batch (``size x world /
    global``; DDP then averages over the world), so the gradient is exactly the global batch's
    mean, whatever the split over workers and micro-batches. DDP all-reduces only after the last
    micro-batch (``no_sync`` before). Returns the batch's mean loss and its top-1 / top-5 hit
    counts, all still on the device.
    """
    cfg, d = run.cfg, run.derived
    fmt = torch.channels_last if cfg.precision.channels_last else torch.contiguous_format
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=images.device)
    hits = torch.zeros(2, dtype=torch.int64, device=images.device)
    parts = list(zip(images.split(d.micro_batch), labels.split(d.micro_batch), strict=True))
    no_sync = getattr(run.model, "no_sync", None)
    for i, (x, y) in enumerate(parts):
        with no_sync() if no_sync is not None and i < len(parts) - 1 else contextlib.nullcontext():
            with autocast(images.device, cfg.precision.amp):
                logits = run.model(x.contiguous(memory_format=fmt))
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.optim.label_smoothing)
            run.scaler.scale(loss * (y.shape[0] * d.world_size / d.global_batch)).backward()
        with torch.no_grad():
            loss_sum += loss.detach() * y.shape[0]
            hits += torch.stack(topk_correct(logits.detach().float(), y))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss_sum / labels.shape[0], hits[0], hits[1]


def train_one_epoch(
    run: Run,
    epoch: int,
    progress: ckpt.TrainingProgress,
    on_steps: StepCallback,
    save_mid_epoch: SaveCallback | None = None,
) -> tuple[dict[str, float], ckpt.TrainingProgress]:
    """One pass over this rank's shard (the rest of it, when resuming mid-epoch).

    Args:
        run: the live objects.
        epoch: 0-based epoch index.
        progress: step counter and schedule state; ``progress.step`` may lie inside ``epoch``.
        on_steps: called on every rank with step metrics, the step and where they go (``log_due``).
        save_mid_epoch: called on every rank every ``checkpoint.every_n_steps`` steps with the
            progress so far (``epoch_sums`` summed over ranks).

    Returns:
        The epoch's metrics (reduced over ranks) and the progress at its end.
    """
    cfg, ctx, d = run.cfg, run.ctx, run.derived
    run.model.train()
    device = ctx.device
    first = progress.step - epoch * d.iters_per_epoch  # > 0: resumed mid-epoch
    end = min(d.iters_per_epoch, d.total_iters - epoch * d.iters_per_epoch)
    # loss x n, top-1 hits, top-5 hits of this epoch on this rank, on the device; the image count
    # on the host (a shape). Rank 0 carries the part of a resumed epoch done before the restart.
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    seen = 0.0
    if first > 0 and ctx.is_main and progress.epoch_sums:
        sums += torch.tensor(progress.epoch_sums[:3], dtype=torch.float64).to(device)
        seen = progress.epoch_sums[3]
    window_hits = torch.zeros((), dtype=torch.float64, device=device)  # the ResNet-110 rule
    window_seen = 0
    bad_step = torch.full((), -1, dtype=torch.int64, device=device)  # first step with a non-finite loss
    bad_loss = torch.zeros((), device=device)
    step, state = progress.step, progress.schedule
    data_wait, lr = 0.0, 0.0
    start = time.perf_counter()
    batches = iter(run.data.train.epoch(epoch, start=first))
    for i in range(first, end):
        t0 = time.perf_counter()
        images, labels = next(batches)
        data_wait += time.perf_counter() - t0
        lr = _lr_at(run, step, state)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        loss, top1, top5 = train_step(run, images, labels)
        n = labels.shape[0]
        with torch.no_grad():
            newly = (bad_step < 0) & ~torch.isfinite(loss)
            bad_step = torch.where(newly, step, bad_step)
            bad_loss = torch.where(newly, loss, bad_loss)
            sums += torch.stack([loss.double() * n, top1.double(), top5.double()])
            window_hits += top1
        seen += n
        window_seen += n
        step += 1
        if (
            cfg.schedule.warmup_until_train_err is not None
            and not state.warmup_done
            and step % WARMUP_CHECK_EVERY == 0
        ):
            # The rule decides on the host: a sync every 10 steps, only during the warm-up.
            hits, total = _reduce(window_hits.view(1), window_seen)
            state = warmup_update(cfg.schedule, state, 100.0 * (1 - hits / total))
            window_hits.zero_()
            window_seen = 0
        due = log_due(cfg, step, last_of_epoch=i == end - 1)
        if due is not None:
            _raise_if_non_finite(run, epoch, bad_step, bad_loss, state)
            done = i + 1 - first
            on_steps(
                {
                    "train/step_loss": loss.item(),
                    "lr": lr,
                    "img_per_s": done * d.global_batch / max(time.perf_counter() - start, 1e-9),
                    "epoch": epoch + (i + 1) / end,
                },
                step,
                due,
            )
        every = cfg.checkpoint.every_n_steps
        if save_mid_epoch is not None and every and step % every == 0 and i + 1 < end:
            _raise_if_non_finite(run, epoch, bad_step, bad_loss, state)
            total = _reduce(sums, seen)
            save_mid_epoch(dataclasses.replace(progress, step=step, schedule=state, epoch_sums=total))
    wall = time.perf_counter() - start
    loss_sum, top1, top5, n = _reduce(sums, seen)
    metrics = {
        "train/loss": loss_sum / max(n, 1),
        "train/top1_err": 100.0 * (1 - top1 / max(n, 1)),
        "train/top5_err": 100.0 * (1 - top5 / max(n, 1)),
        "lr": lr,
        "img_per_s": (end - first) * d.global_batch / max(wall, 1e-9),
        "epoch_time_s": wall,
        "data_wait_frac": data_wait / max(wall, 1e-9),
        "world_size": ctx.world_size,
        "global_batch": d.global_batch,
    }
    if device.type == "cuda":
        metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return metrics, dataclasses.replace(progress, step=step, schedule=state, epoch_sums=())


def _reduce(device_sums: torch.Tensor, host_count: float) -> tuple[float, ...]:
    """(device sums..., count) summed over ranks: one transfer each way."""
    count = torch.tensor([host_count], dtype=torch.float64).to(device_sums.device)
    return tuple(all_reduce_sum(torch.cat([device_sums.double(), count])).tolist())


def _raise_if_non_finite(
    run: Run, epoch: int, bad_step: torch.Tensor, bad_loss: torch.Tensor, state: Any
) -> None:
    bad = int(bad_step.item())
    if bad >= 0:
        raise FloatingPointError(
            f"non-finite loss ({bad_loss.item()}) at epoch {epoch} step {bad} with lr {_lr_at(run, bad, state):.6g}; "
            "lower optim.lr, enable warm-up (schedule.warmup_epochs) or check the data"
        )


def validate(run: Run, batches: Any, mode: str) -> dict[str, float]:
    """``evaluate`` with the run's device and precision settings, every rank using rank 0's BN statistics."""
    broadcast_buffers(run.plain)
    return evaluate(
        run.plain,
        batches,
        mode=mode,
        device=run.ctx.device,
        amp=run.cfg.precision.amp,
        channels_last=run.cfg.precision.channels_last,
    )


def _pick_checkpoint(candidates: list[str]) -> tuple[str | None, dict[str, Any] | None, list[str], list[str]]:
    """(the newest readable checkpoint, its state, warnings, the candidates that hold a state file).

    A folder without ``state.pt`` is a checkpoint that never finished (its node died during the
    upload): it is passed over. One whose file cannot be read (truncated, corrupt) is skipped
    with a warning in favour of the one before it.
    """
    warnings, real = [], []
    for source in candidates:
        try:
            with fetched(source) as folder:
                if not (folder / ckpt.STATE_FILE).is_file():
                    warnings.append(
                        f"warning: passing over {source}: no {ckpt.STATE_FILE} (an unfinished upload?)"
                    )
                    continue
                real.append(source)
                return source, ckpt.read(folder), warnings, real
        except (ckpt.CheckpointError, OSError) as e:
            warnings.append(f"warning: skipping unusable checkpoint: {e}")
    return None, None, warnings, real


def restore(run: Run, location: str) -> ckpt.TrainingProgress:
    """The progress to start from: rank 0 picks the newest readable checkpoint (Ray's latest, else
    the one before it, else ``resume_from``); every rank then loads that one. Copies fetched from
    object storage are removed once loaded."""
    ctx = run.ctx
    decision: tuple[str, str | None] = ("none", None)
    state = None
    if ctx.is_main:
        candidates = checkpoint_candidates(ctx, location, run.cfg.resume_from)
        chosen, state, warnings, real = _pick_checkpoint(candidates)
        for line in warnings:
            print(line, flush=True)
        if chosen is not None:
            decision = ("load", chosen)
        elif real:
            decision = (
                "error",
                f"none of the checkpoints of run {run.cfg.name!r} can be read ({', '.join(real)}); "
                "remove them or start under a new name",
            )
    kind, value = broadcast_object(decision)
    if kind == "error":
        raise ckpt.CheckpointError(value)
    if kind == "none":  # a fresh run: model.init_from's weights, if set, and step 0
        load_initial_weights(run.plain, run.cfg, is_main=ctx.is_main)
        return ckpt.TrainingProgress()
    if state is None:
        with fetched(value) as folder:
            state = ckpt.read(folder)
    progress = ckpt.restore(state, model=run.plain, optimizer=run.optimizer, scaler=run.scaler)
    if ctx.is_main:
        print(f"restored from checkpoint {value}: epoch {progress.epoch}, step {progress.step}", flush=True)
        changed = config_changes(state["config"], to_dict(run.cfg))
        if changed:
            print(f"warning: the config differs from the checkpoint's: {'; '.join(changed)}", flush=True)
    return progress


def train_worker(config: dict[str, Any], under_ray: bool = False) -> dict[str, Any]:
    """Train and evaluate as the config says; returns the summary (on every rank).

    Args:
        config: the resolved config as a plain dict (``pipeline.config.to_dict``).
        under_ray: True when called by ``TorchTrainer`` (reporting goes through Ray Train).
    """
    cfg = config_from_dict(config)
    wall_start = time.perf_counter()
    ctx = init_context(under_ray, use_gpu=requested_gpu(cfg.cluster))
    run = setup_run(cfg, ctx)
    d, data = run.derived, run.data
    location = run_location(cfg.checkpoint.storage_path, cfg.name)
    progress = restore(run, location)
    resolved = to_dict(cfg)
    out = RunOutputs.open(
        cfg, d, location, progress, config=resolved, is_main=ctx.is_main,
        num_train=data.num_train, num_classes=data.num_classes,
    )  # fmt: skip
    progress = dataclasses.replace(progress, wandb_run_id=out.tracker.run_id)
    last_val: dict[str, float] = {"val/top1_err": float("inf")}
    last_ckpt = None

    def save(name: str, progress: ckpt.TrainingProgress, metrics: dict[str, Any]) -> str:
        write = functools.partial(
            ckpt.save,
            model=run.plain,
            optimizer=run.optimizer,
            scaler=run.scaler,
            progress=progress,
            config=resolved,
        )
        # Ray keeps the best checkpoints by val/top1_err, so reports without validation carry the last one.
        return report_checkpoint(
            ctx, {**last_val, **metrics}, name, location, write, num_to_keep=cfg.checkpoint.num_to_keep
        )

    def save_mid_epoch(p: ckpt.TrainingProgress) -> None:
        save(checkpoint_name(p.epoch, p.step), p, {"epoch": p.epoch, "step": p.step})

    def on_steps(metrics: dict[str, float], step: int, due: LogDue) -> None:
        out.steps(metrics, step, console=due.console, track=due.tracker)

    img_per_s = []
    for epoch in range(progress.epoch, d.epochs):
        train_metrics, progress = train_one_epoch(run, epoch, progress, on_steps, save_mid_epoch)
        img_per_s.append(train_metrics["img_per_s"])
        metrics = {"epoch": epoch + 1, "step": progress.step, **train_metrics}
        if (epoch + 1) % cfg.eval.every_n_epochs == 0 or epoch + 1 == d.epochs:
            val = validate(run, data.make_val(cfg.eval.mode).epoch(epoch), cfg.eval.mode)
            metrics.update({k: v for k, v in val.items() if k != "val/images"})
            metrics.update(train_set_metrics(run))  # train_eval/*: the training images in eval mode
            progress = dataclasses.replace(
                progress,
                schedule=plateau_update(
                    cfg.schedule,
                    progress.schedule,
                    val["val/top1_err"],
                    base_lr=d.lr,
                    # Patience counts epochs, not evaluations: the epochs since the previous one.
                    epochs=(epoch + 1) % cfg.eval.every_n_epochs or cfg.eval.every_n_epochs,
                ),
                best_val_top1_err=min(progress.best_val_top1_err, val["val/top1_err"]),
            )
            last_val = {k: v for k, v in metrics.items() if k.startswith("val/")}
        progress = dataclasses.replace(progress, epoch=epoch + 1)
        out.epoch(metrics, progress.step)
        last_ckpt = save(checkpoint_name(epoch + 1), progress, metrics)

    final_mode = cfg.eval.final_mode or cfg.eval.mode
    final = validate(run, data.make_val(final_mode).epoch(0), final_mode)
    # CIFAR-10 with a held-out split: the test set is scored too, once, at the end.
    test = validate(run, data.make_test().epoch(0), final_mode) if data.make_test else None
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
        "world_size": ctx.world_size,
        "global_batch": d.global_batch,
        "wall_s": time.perf_counter() - wall_start,
        "img_per_s": float(np.mean(img_per_s)) if img_per_s else None,
        "checkpoint": last_ckpt,
        "wandb_dir": out.tracker.wandb_dir,
        "wandb_mode": out.tracker.mode,
        "run_dir": location,
    }
    out.close(summary, final_mode, test)
    finish(ctx)
    return summary
