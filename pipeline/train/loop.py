"""The training loop every worker runs, top to bottom: setup -> resume -> epochs -> final evaluation.

    from pipeline.train.loop import train_worker
    train_worker(to_dict(load_config("configs/demo.yaml")))      # one process, no Ray

``pipeline.driver.train_cmd`` runs the same function on every Ray Train worker
(``under_ray=True``); under ``torchrun`` it forms its own process group.

One step reads top to bottom here (``train_one_epoch``, ``train_step``) with three other modules
of ``pipeline.train``: ``setup`` (``Run``, what the run holds, and ``TrainingProgress``, where it
stands), ``derived`` (``Derived``: the batch split, the lr, the iterations) and ``outputs``
(``RunOutputs``: where the metrics go), with ``step_time`` (``StepClock``: where a step's time
goes, the ``perf/*`` metrics), ``fetch_figures`` (``FetchFigures``: the sharded layout's
``data/*`` metrics, what object storage cost) and ``stall`` (``StallNote``: a data stall named once
per run).
What else it calls says what it does by its name:
``checkpoint.restore`` and ``save_checkpoint``, ``evaluate.score`` (every evaluation), the
``schedule``'s pure functions of the step, ``mixing.Mixer`` (MixUp / CutMix) and ``ema.WeightAverage``
(the EMA of the weights). ``train_one_epoch`` and ``validate_epoch`` return
metric dicts.

Nothing in a step waits for the device: the loss and the counts stay on it (``EpochSums``) and
are read every ``log_every_n_steps`` (and at the end of an epoch); a non-finite loss is noted
on the device and raised at the next such read, naming the step where it first appeared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import numpy as np
import torch

from pipeline.config import config_from_dict, requested_gpu
from pipeline.train import checkpoint as ckpt
from pipeline.train.distributed import all_reduce_sum, finish, init_context
from pipeline.train.evaluate import autocast, score, topk_correct, train_eval_on
from pipeline.train.fetch_figures import FetchFigures
from pipeline.train.init_from import load_initial_weights
from pipeline.train.mixing import MixedTargets, Mixer, mixed_cross_entropy
from pipeline.train.outputs import RunOutputs
from pipeline.train.preemption import PreemptionPoll, checkpoint_line
from pipeline.train.schedule import ScheduleState, learning_rate, plateau_update, warmup_update
from pipeline.train.setup import Run, TrainingProgress, setup_run
from pipeline.train.stall import StallNote
from pipeline.train.step_time import StepClock

WARMUP_CHECK_EVERY = 10  # iterations between checks of the ResNet-110 warm-up rule


class EpochSums:
    """An epoch's running sums on the device, read only when reduced: loss x n, top-1 and top-5
    hits, the first step with a non-finite loss, and the ResNet-110 warm-up window's hits; the
    image counts stay on the host (they are shapes)."""

    def __init__(self, device: torch.device, carried: tuple[float, ...] = ()):
        # ``carried``: rank 0's sums of the part of a resumed epoch done before the restart.
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.seen = 0.0
        if carried:
            self.sums += torch.tensor(carried[:3], dtype=torch.float64).to(device)
            self.seen = carried[3]
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), device=device)
        self.window_hits = torch.zeros((), dtype=torch.float64, device=device)
        self.window_seen = 0

    @torch.no_grad()
    def add(self, step: int, loss: torch.Tensor, top1: torch.Tensor, top5: torch.Tensor, n: int) -> None:
        newly = (self.bad_step < 0) & ~torch.isfinite(loss)
        self.bad_step = torch.where(newly, step, self.bad_step)
        self.bad_loss = torch.where(newly, loss, self.bad_loss)
        self.sums += torch.stack([loss.double() * n, top1.double(), top5.double()])
        self.window_hits += top1
        self.seen += n
        self.window_seen += n

    def reduced(self) -> tuple[float, ...]:
        """(loss x n, top-1 hits, top-5 hits, n) summed over ranks: one transfer each way."""
        return _reduce(self.sums, self.seen)

    def window_train_err(self) -> float:
        """The training error (%) since the last call, over all ranks; starts a new window."""
        hits, total = _reduce(self.window_hits.view(1), self.window_seen)
        self.window_hits.zero_()
        self.window_seen = 0
        return 100.0 * (1 - hits / total)

    def raise_if_non_finite(self, run: Run, epoch: int, state: ScheduleState) -> None:
        bad = int(self.bad_step.item())
        if bad >= 0:
            raise FloatingPointError(
                f"non-finite loss ({self.bad_loss.item()}) at epoch {epoch} step {bad} with lr "
                f"{lr_at(run, bad, state):.6g}; lower optim.lr, enable warm-up (schedule.warmup_epochs) "
                "or check the data"
            )


def _reduce(device_sums: torch.Tensor, host_count: float) -> tuple[float, ...]:
    count = torch.tensor([host_count], dtype=torch.float64).to(device_sums.device)
    return tuple(all_reduce_sum(torch.cat([device_sums.double(), count])).tolist())


def lr_at(run: Run, step: int, state: ScheduleState) -> float:
    d = run.derived
    return learning_rate(
        run.cfg.schedule,
        base_lr=d.lr,
        it=step,
        iters_per_epoch=d.iters_per_epoch,
        total_iters=d.total_iters,
        state=state,
    )


def train_step(
    run: Run, images: torch.Tensor, labels: torch.Tensor, mixed: MixedTargets | None = None
) -> tuple[torch.Tensor, ...]:
    """One optimizer step over this worker's batch, in micro-batches of at most ``micro_batch``.

    Each micro-batch's mean loss is weighted by its share of the global batch (``size x world /
    global``; DDP then averages over the world), so the gradient is exactly the global batch's
    mean, whatever the split over workers and micro-batches. DDP all-reduces only after the last
    micro-batch (``no_sync`` before). ``mixed``: the targets of a MixUp / CutMix batch
    (``pipeline.train.mixing``), whose hits count against the label of larger weight. Returns the
    batch's mean loss and its top-1 / top-5 hit counts, all still on the device.
    """
    cfg, d = run.cfg, run.derived
    fmt = torch.channels_last if cfg.precision.channels_last else torch.contiguous_format
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=images.device)
    hits = torch.zeros(2, dtype=torch.int64, device=images.device)
    targets = labels.split(d.micro_batch) if mixed is None else mixed.split(d.micro_batch)
    parts = list(zip(images.split(d.micro_batch), targets, strict=True))
    no_sync = getattr(run.model, "no_sync", None)
    for i, (x, y) in enumerate(parts):
        n = x.shape[0]
        with no_sync() if no_sync is not None and i < len(parts) - 1 else contextlib.nullcontext():
            with autocast(images.device, cfg.precision.amp):
                logits = run.model(x.contiguous(memory_format=fmt))
                loss = mixed_cross_entropy(logits.float(), y, cfg.optim.label_smoothing)
            run.scaler.scale(loss * (n * d.world_size / d.global_batch)).backward()
        with torch.no_grad():
            loss_sum += loss.detach() * n
            reference = y if mixed is None else y.dominant()
            hits += torch.stack(topk_correct(logits.detach().float(), reference))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss_sum / labels.shape[0], hits[0], hits[1]


def train_one_epoch(
    run: Run,
    epoch: int,
    progress: TrainingProgress,
    out: RunOutputs,
    clock: StepClock | None = None,
    preemption: PreemptionPoll | None = None,
) -> tuple[dict[str, float], TrainingProgress]:
    """One pass over this rank's split (the rest of it, when ``progress.step`` lies inside
    ``epoch``); logs step metrics to ``out`` and saves the mid-epoch checkpoints on the way:
    every ``checkpoint.every_n_steps``, and at a preemption notice (``preemption``, the run's).
    ``clock`` times the steps (``pipeline.train.step_time``; the run's, else one for this epoch).

    Returns the epoch's metrics (reduced over ranks) and the progress at its end.
    """
    cfg, d = run.cfg, run.derived
    clock = clock or StepClock.for_run(run)
    run.model.train()
    first = progress.step - epoch * d.iters_per_epoch  # > 0: resumed mid-epoch
    end = min(d.iters_per_epoch, d.total_iters - epoch * d.iters_per_epoch)
    acc = EpochSums(run.ctx.device, progress.epoch_sums if first > 0 and run.ctx.is_main else ())
    step, state = progress.step, progress.schedule
    lr = 0.0
    start = time.perf_counter()
    clock.start()
    batches = iter(run.data.train.epoch(epoch, start=first))
    mixer = Mixer.for_run(run)
    side = 0
    for i in range(first, end):
        images, labels = clock.next_batch(batches)
        lr = lr_at(run, step, state)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        clock.step_begins()
        mixed = None
        if mixer is not None:  # drawn from (seed, epoch, i): a resumed epoch mixes alike
            images, mixed = mixer.mix(images, labels, epoch, i)
        loss, top1, top5 = train_step(run, images, labels, mixed)
        if run.ema is not None:
            run.ema.update(run.network, updates=step)
        acc.add(step, loss, top1, top5, labels.shape[0])
        side = images.shape[-1]  # the crop's side (data.res_schedule may grow it between epochs)
        clock.step_ends(labels.shape[0], side)
        step += 1
        warming = cfg.schedule.warmup_until_train_err is not None and not state.warmup_done
        if warming and step % WARMUP_CHECK_EVERY == 0:  # a host sync every 10 steps, only while warming
            state = warmup_update(cfg.schedule, state, acc.window_train_err())
        # The console line every log_every_n_steps (and at the epoch's end), the tracker's row every
        # tracking.log_every_n_steps: reading the loss waits for the device, so only then.
        to_console = step % cfg.log_every_n_steps == 0 or i == end - 1
        to_tracker = step % cfg.tracking.log_every_n_steps == 0
        if to_console or to_tracker:
            acc.raise_if_non_finite(run, epoch, state)
            images_done = (i + 1 - first) * d.global_batch
            step_metrics = {
                "train/step_loss": loss.item(),
                "lr": lr,
                "img_per_s": images_done / max(time.perf_counter() - start, 1e-9),
                "epoch": epoch + (i + 1) / end,
                **clock.read("interval"),  # after the loss is read: the step's events are done
            }
            out.steps(step_metrics, step, console=to_console, track=to_tracker)
        due = preemption.after_step(last_in_epoch=i + 1 == end) if preemption else None
        every = cfg.checkpoint.every_n_steps
        if (due or (every and step % every == 0)) and i + 1 < end:
            acc.raise_if_non_finite(run, epoch, state)
            with clock.blocked():
                began = time.perf_counter()
                mid = dataclasses.replace(progress, step=step, schedule=state, epoch_sums=acc.reduced())
                # For a preemption the upload is waited for: the node may be gone at the deadline.
                ckpt.save_checkpoint(run, mid, {"epoch": epoch, "step": step}, wait_upload=due is not None)
            if due:
                took = time.perf_counter() - began
                preemption.uploaded(due, took)
                if run.ctx.is_main:
                    print(checkpoint_line(due, step, took, preemption), flush=True)
                with clock.blocked():
                    woke = preemption.wait_for_reclaim(due)
                if woke and run.ctx.is_main:
                    print(woke, flush=True)
    clock.stop()
    wall = time.perf_counter() - start
    metrics = epoch_metrics(run, acc, clock, lr=lr, steps=end - first, wall=wall)
    if side:  # a step ran: the side it trained at
        metrics["train/crop_px"] = side
    return metrics, dataclasses.replace(progress, step=step, schedule=state, epoch_sums=())


def epoch_metrics(run: Run, acc: EpochSums, clock: StepClock, *, lr: float, steps: int, wall: float) -> dict:
    """The epoch's record: its training loss and errors over all ranks, speed, and this worker's
    step timings (``perf/*``, read after the reduction has waited for the device)."""
    loss_sum, top1, top5, n = acc.reduced()
    perf = clock.read("epoch")
    metrics = {
        "train/loss": loss_sum / max(n, 1),
        "train/top1_err": 100.0 * (1 - top1 / max(n, 1)),
        "train/top5_err": 100.0 * (1 - top5 / max(n, 1)),
        "lr": lr,
        "img_per_s": steps * run.derived.global_batch / max(wall, 1e-9),
        "epoch_time_s": wall,
        "data_wait_frac": perf["perf/data_wait_s"] / max(wall, 1e-9),
        "world_size": run.ctx.world_size,
        "global_batch": run.derived.global_batch,
        **perf,
    }
    if run.ctx.device.type == "cuda":
        metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(run.ctx.device) / 2**30
    return metrics


def validate_epoch(
    run: Run, epoch: int, progress: TrainingProgress
) -> tuple[dict[str, float], TrainingProgress]:
    """The epoch's validation and what it decides: the plateau schedule's next step, the best error.
    The EMA of the weights is scored beside the weights (``val/ema_*``, when ``optim.ema_decay`` is
    on; the schedule and the best error follow the weights), and the training images in eval mode
    when ``eval.train_eval`` says so."""
    cfg = run.cfg
    metrics = score(run, "val", cfg.eval.mode)
    if run.ema is not None:
        metrics.update(score(run, "val", cfg.eval.mode, weights="ema"))
    # Patience counts epochs, not evaluations: the epochs since the previous one.
    since = (epoch + 1) % cfg.eval.every_n_epochs or cfg.eval.every_n_epochs
    schedule = plateau_update(
        cfg.schedule, progress.schedule, metrics["val/top1_err"], base_lr=run.derived.lr, epochs=since
    )
    best = min(progress.best_val_top1_err, metrics["val/top1_err"])
    if train_eval_on(cfg) and run.data.make_train_eval is not None:
        metrics.update(score(run, "train", "center"))
    metrics = {k: v for k, v in metrics.items() if not k.endswith("/images")}  # the same every epoch
    return metrics, dataclasses.replace(progress, schedule=schedule, best_val_top1_err=best)


def train_worker(config: dict[str, Any], under_ray: bool = False) -> dict[str, Any]:
    """Train and evaluate as the config says; returns the summary (on every rank).

    Args:
        config: the resolved config as a plain dict (``pipeline.config.to_dict``).
        under_ray: True when called by ``TorchTrainer`` (reporting goes through Ray Train).
    """
    cfg = config_from_dict(config)
    wall_start = time.perf_counter()
    ctx = init_context(under_ray, requested_gpu(cfg.cluster), cfg.cluster.collective_timeout_s)
    run = setup_run(cfg, ctx)
    d = run.derived
    # A group restarted after the last epoch (a node that joined during the final evaluation)
    # trains nothing: its summary names the checkpoint it restored.
    restored = ckpt.restore(run)
    progress, last_checkpoint = restored or (TrainingProgress(), None)
    if restored is None:  # a fresh run: step 0, from model.init_from's weights when it is set
        load_initial_weights(run.network, cfg, is_main=ctx.is_main)
        if run.ema is not None:
            run.ema.copy_from(run.network)
    out = RunOutputs.open(run, progress)
    progress = dataclasses.replace(progress, wandb_run_id=out.wandb_run_id)
    img_per_s = []
    clock, stall, fetched = StepClock.for_run(run), StallNote.for_run(run), FetchFigures.for_run(run)
    preemption = PreemptionPoll.for_run(run)
    for epoch in range(progress.epoch, d.epochs):
        train_metrics, progress = train_one_epoch(run, epoch, progress, out, clock, preemption)
        stall.check(epoch, train_metrics)
        img_per_s.append(train_metrics["img_per_s"])
        metrics = {"epoch": epoch + 1, "step": progress.step, **train_metrics}
        if (epoch + 1) % cfg.eval.every_n_epochs == 0 or epoch + 1 == d.epochs:
            val_metrics, progress = validate_epoch(run, epoch, progress)
            metrics.update(val_metrics)
        metrics.update(fetched.read("epoch"))  # after validation: its fetches and reads count here
        progress = dataclasses.replace(progress, epoch=epoch + 1)
        out.epoch(metrics, progress.step)
        with clock.blocked():  # counted in the next epoch's perf/* and the run's
            last_checkpoint = ckpt.save_checkpoint(run, progress, metrics)

    final_mode = cfg.eval.final_mode or cfg.eval.mode
    final = score(run, "val", final_mode)  # the epochs' loader when final_mode is eval.mode
    final_ema = score(run, "val", final_mode, weights="ema") if run.ema is not None else {}
    # CIFAR-10 with a held-out split: the test set is scored too, once, at the end.
    test = score(run, "test", final_mode) if run.data.make_test else None
    if test is not None and run.ema is not None:  # test/ema_top1_err ...: the EMA on the test set too
        test.update(score(run, "test", final_mode, weights="ema"))
    summary = {
        "name": cfg.name,
        "model": cfg.model.name,
        "eval_mode": final_mode,
        "val_top1_err": final["val/top1_err"],
        "val_top5_err": final["val/top5_err"],
        "val_images": final["val/images"],
        # test_top1_err, test_top5_err, test_images (only when a test set was scored); with an EMA
        # ema_test_top1_err, ema_test_top5_err
        **{
            k.replace("test/ema_", "ema_test_").replace("test/", "test_"): v
            for k, v in (test or {}).items()
            if k.endswith("_err") or k == "test/images"
        },
        # ema_val_top1_err, ema_val_top5_err: the EMA of the weights (optim.ema_decay), same mode
        **{k.replace("val/ema_", "ema_val_"): v for k, v in final_ema.items() if k.endswith("_err")},
        "best_val_top1_err": progress.best_val_top1_err,
        "epochs": progress.epoch,
        "steps": progress.step,
        "world_size": ctx.world_size,
        "global_batch": d.global_batch,
        "wall_s": time.perf_counter() - wall_start,
        "img_per_s": float(np.mean(img_per_s)) if img_per_s else None,
        **run_time_shares(clock),
        # data_get_retries, data_fetch_wait_s, data_bytes_fetched, data_cache_hit_rate (sharded, from a bucket)
        **{k.replace("/", "_"): v for k, v in fetched.read("run").items()},
        "checkpoint": last_checkpoint,
        **out.wandb_location(),  # wandb_dir, wandb_mode
        "run_dir": run.location,
    }
    out.close(summary, final_mode, test)
    finish(ctx)
    return summary


def run_time_shares(clock: StepClock) -> dict[str, Any]:
    """Where this worker's training time went over the run, for ``summary.json``: the data and
    checkpoint stalls (%), MFU (None without a known peak) and peak memory (None on CPUs)."""
    perf = clock.read("run")
    return {
        "data_stall_pct": perf["perf/data_stall_pct"],
        "checkpoint_stall_pct": perf["perf/checkpoint_stall_pct"],
        "mfu": perf.get("perf/mfu"),
        "peak_mem_gb": perf.get("perf/peak_mem_gb"),
        "device_name": clock.device_name,
    }
