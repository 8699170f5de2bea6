"""Where a run's metrics go, on rank 0: the console, the run's files, W&B.

    out = RunOutputs.open(run, progress)     # run: pipeline.train.setup.Run
    out.steps(metrics, step, console=True, track=False)   # every few steps
    out.epoch(metrics, step)             # once per epoch
    out.close(summary, final_mode)       # at the end

On other ranks every call does nothing. With object storage, W&B's offline run is written
to a local staging folder and copied to ``<location>/wandb/`` after every epoch, so a rank 0
that dies takes at most one epoch of W&B records with it (``pipeline wandb-sync`` fills any
gap from ``metrics.jsonl``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Config, to_dict
from pipeline.store.locations import copy_folder_to, is_uri, join
from pipeline.store.rundir import RunDir
from pipeline.train.derived import Derived

if TYPE_CHECKING:
    from pipeline.train.setup import Run, TrainingProgress


def describe(cfg: Config, derived: Derived, num_train: int, num_classes: int) -> str:
    """The derived values printed at start (and saved in config.yaml under ``derived``)."""
    micro = (
        f" (micro-batch {derived.micro_batch} x {derived.accum_steps} accumulation steps)"
        if derived.accum_steps > 1
        else ""
    )
    return (
        f"run {cfg.name}: {cfg.model.name} on {cfg.data.dataset} ({num_train} train images, {num_classes} classes)\n"
        f"  world size {derived.world_size}, global batch {derived.global_batch}, "
        f"per-worker batch {derived.worker_share}{micro}\n"
        f"  lr {derived.lr:g} (base {cfg.optim.lr:g}{', linear scaling' if cfg.optim.scale_lr else ''}), "
        f"schedule {cfg.schedule.kind}\n"
        f"  {derived.iters_per_epoch} iterations/epoch, {derived.total_iters} iterations, {derived.epochs} epochs"
    )


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class RunOutputs:
    """Rank 0's console lines, run files and W&B run; inert on other ranks."""

    def __init__(self, derived: Derived, rundir: RunDir | None, tracker: Any):
        self.derived, self.rundir, self.tracker = derived, rundir, tracker
        self._start, self._start_step = time.perf_counter(), None

    @classmethod
    def open(cls, run: Run, progress: TrainingProgress) -> RunOutputs:
        """Print the run's description, write its config, drop records a restart redoes, start W&B."""
        from pipeline.tracking.tracker import Tracker

        cfg, derived, is_main = run.cfg, run.derived, run.ctx.is_main
        rundir = RunDir(run.location) if is_main else None
        with_derived = {**to_dict(cfg), "derived": dataclasses.asdict(derived)}
        if rundir is not None:
            print(describe(cfg, derived, run.data.num_train, run.data.num_classes), flush=True)
            rundir.write_config(with_derived)
            rundir.keep_epochs_upto(progress.epoch)
        tracker = Tracker.create(
            cfg.tracking,
            run_name=cfg.name,
            run_dir=rundir.local_dir if rundir else Path("."),
            config=with_derived,
            run_id=progress.wandb_run_id,
            is_main=is_main,
        )
        return cls(derived, rundir, tracker)

    @property
    def is_main(self) -> bool:
        return self.rundir is not None

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run's id, saved in every checkpoint so that a restarted run logs into the same run."""
        return self.tracker.run_id

    def wandb_location(self) -> dict[str, str | None]:
        """Where the W&B run's files are and how it logs, for the run's summary."""
        return {"wandb_dir": self.tracker.wandb_dir, "wandb_mode": self.tracker.mode}

    def steps(self, metrics: dict[str, float], step: int, console: bool, track: bool) -> None:
        """A step line on the console and/or a step row in W&B."""
        if not self.is_main:
            return
        if track:
            self.tracker.log(metrics, step=step)
        if not console:
            return
        if self._start_step is None:
            self._start_step, self._start = step, time.perf_counter()
        d = self.derived
        rate = (step - self._start_step) / max(time.perf_counter() - self._start, 1e-9)
        eta = (d.total_iters - step) / rate if rate > 0 else float("nan")
        print(
            f"epoch {metrics['epoch']:.2f}/{d.epochs} step {step}/{d.total_iters} "
            f"loss {metrics['train/step_loss']:.4f} lr {metrics['lr']:.5g} "
            f"img/s {metrics['img_per_s']:.1f} eta {_format_eta(eta) if math.isfinite(eta) else '?'}",
            flush=True,
        )

    def epoch(self, metrics: dict[str, float], step: int) -> None:
        """The epoch line, its record in ``metrics.jsonl`` and its W&B row (then W&B's files to storage)."""
        if not self.is_main:
            return
        nan = float("nan")
        print(
            f"epoch {metrics['epoch']}/{self.derived.epochs} done: train loss {metrics['train/loss']:.4f} "
            f"top1 err {metrics['train/top1_err']:.2f}% "
            + (
                f"(eval mode {metrics['train_eval/top1_err']:.2f}%) "
                if "train_eval/top1_err" in metrics
                else ""
            )
            + f"| val top1 err {metrics.get('val/top1_err', nan):.2f}% "
            f"top5 err {metrics.get('val/top5_err', nan):.2f}% "
            + (f"(EMA {metrics['val/ema_top1_err']:.2f}%) " if "val/ema_top1_err" in metrics else "")
            + f"| lr {metrics['lr']:.5g} "
            f"| {metrics['img_per_s']:.1f} img/s | {metrics['epoch_time_s']:.1f}s",
            flush=True,
        )
        self.rundir.append_metrics(metrics)
        self.tracker.log(metrics, step=step)
        self._upload_wandb()

    def close(self, summary: dict[str, Any], final_mode: str, test: dict[str, float] | None = None) -> None:
        """The final lines, ``summary.json``, W&B's summary; W&B closed and its files in storage.

        ``test``: CIFAR-10's test-set scores (``test/*``) when validation used a held-out split.
        """
        if not self.is_main:
            return
        print(
            f"final ({final_mode}, {summary['val_images']} images): val top-1 err {summary['val_top1_err']:.2f}% "
            f"top-5 err {summary['val_top5_err']:.2f}% | checkpoint {summary['checkpoint']} "
            f"| run dir {summary['run_dir']}",
            flush=True,
        )
        if "ema_val_top1_err" in summary:
            print(
                f"final ({final_mode}), the EMA of the weights: val top-1 err {summary['ema_val_top1_err']:.2f}% "
                f"top-5 err {summary['ema_val_top5_err']:.2f}%",
                flush=True,
            )
        if test:
            print(
                f"test set ({test['test/images']} images): top-1 err {test['test/top1_err']:.2f}% "
                f"top-5 err {test['test/top5_err']:.2f}%"
                + (
                    f"; the EMA of the weights: top-1 err {test['test/ema_top1_err']:.2f}%"
                    if "test/ema_top1_err" in test
                    else ""
                ),
                flush=True,
            )
        self.rundir.write_summary(summary)
        self.tracker.summary(
            {
                f"final/{final_mode}/top1_err": summary["val_top1_err"],
                f"final/{final_mode}/top5_err": summary["val_top5_err"],
                # the EMA of the weights in the same mode (optim.ema_decay)
                **{
                    f"final/{final_mode}/ema_{k.removeprefix('ema_val_')}": v
                    for k, v in summary.items()
                    if k.startswith("ema_val_")
                },
                **{
                    k.replace("test/", "final/test/"): v
                    for k, v in (test or {}).items()
                    if k.endswith("_err")
                },
            }
        )
        self.tracker.finish()
        self._upload_wandb()

    def _upload_wandb(self) -> None:
        """With object storage, copy W&B's local offline folder beside the run's other files."""
        local = self.rundir.local_dir / "wandb"
        if not (is_uri(self.rundir.location) and local.is_dir()):
            return
        for segment in local.iterdir():  # "latest-run" is a link to one of them: not copied twice
            if segment.is_dir() and not segment.is_symlink():
                copy_folder_to(segment, join(self.rundir.location, "wandb", segment.name))
