"""Weights & Biases tracking, on rank 0 only.

    tracker = Tracker.create(cfg.tracking, run_name=cfg.name, run_dir=run_dir, config=resolved,
                             run_id=progress.wandb_run_id, is_main=ctx.is_main)
    tracker.log({"epoch": 3, "val/top1_err": 31.2, ...}, step=global_iteration)
    tracker.summary({"final/tencrop/top1_err": 24.1})
    tracker.finish()

Modes (``tracking.mode``; the ``WANDB_MODE`` environment variable, when set, replaces it
unless the config says ``disabled``, so ``WANDB_MODE=online make demo`` needs no config edit):

- ``online``: streams to the W&B server. With no API key (``WANDB_API_KEY``, ``~/.netrc``)
  or no reachable server, the run falls back to ``offline`` with one warning; training never
  stops or hangs because of tracking.
- ``offline``: writes ``<run_dir>/wandb/offline-run-*/run-<id>.wandb``; upload it later with
  ``wandb sync`` (docs/wandb.md).
- ``disabled``: wandb is not imported and nothing is written.

Every rank other than 0 gets a no-op tracker that never imports wandb. The training loop keeps
the run id in the checkpoint and passes it back on restart, so a resumed run
(``resume="allow"``) continues the same W&B run.

The API key is only ever read by wandb itself from the environment or netrc; it is never
passed in, logged, or written to the run config.
"""

from __future__ import annotations

import os
import pathlib
import secrets
import string
import warnings
from typing import Any, get_args, get_type_hints

from pipeline.config import EvalConfig, TrackingConfig

# Bounded waits so that a dead network costs at most this much, never a hang. wandb's own
# environment variables still win when set (they are the names its users know).
INIT_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 120.0

# ---- Every metric name the pipeline logs, in one place: `define_metrics` declares them to W&B,
# the dashboards (pipeline/tracking/view_parts.py) chart only these, and tests/test_dashboard.py checks
# the keys a real training run logs against them, so a renamed metric cannot leave an empty panel.

# The x-axes in the training loop's rows: `epoch` (fractional in step rows) and `step` (= wandb's step).
AXIS_METRICS = ("epoch", "step")
# Logged every tracking.log_every_n_steps iterations (epoch rows carry lr and img_per_s too) and
# charted against wandb's step, which the training loop sets to the global iteration (the x-axis
# of the paper's Figures 4 and 6).
STEP_METRICS = ("train/step_loss", "lr", "img_per_s")
# Where the time goes, rank 0's own (pipeline.train.step_time): in every step row (since the
# previous one) and every epoch row (since the previous epoch's), charted against wandb's step.
PERF_METRICS = (
    "perf/step_s",
    "perf/data_wait_s",
    "perf/compute_s",
    "perf/checkpoint_block_s",
    "perf/data_stall_pct",
    "perf/checkpoint_stall_pct",
    "perf/img_per_s_per_worker",
    "perf/mfu",
    "perf/peak_mem_gb",
)
# The sharded layout read from a bucket: retries, backoff, bytes and cache hits per epoch.
DATA_METRICS = ("data/get_retries", "data/fetch_wait_s", "data/bytes_fetched", "data/cache_hit_rate")
# Logged once per epoch and charted against `epoch` (val/ ones only in epochs that validate).
EPOCH_METRICS = (
    "train/loss",
    "train/top1_err",
    "train/top5_err",
    "val/loss",
    "val/top1_err",
    "val/top5_err",
    "val/ema_loss",  # the EMA of the weights scored beside them (optim.ema_decay)
    "val/ema_top1_err",
    "val/ema_top5_err",
    "train_eval/loss",  # the training images in eval mode: the train-eval pass (eval.train_eval)
    "train_eval/top1_err",
    "train_eval/top5_err",
    "epoch_time_s",
    "data_wait_frac",
    "gpu_mem_gb",
    "world_size",
    "global_batch",
    "train/crop_px",  # the training crop's side: data.res_schedule grows it between epochs
    # What object storage cost, summed over the ranks (pipeline.train.fetch_figures).
    *DATA_METRICS,
)
# Not in every run: gpu_mem_gb and perf/peak_mem_gb on GPU workers only, perf/mfu only on a GPU
# whose peak pipeline.train.step_time knows; train_eval/* only with eval.train_eval on; val/ema_*
# only with optim.ema_decay on; data/* only for shards read from a bucket;
# world_size, global_batch and train/crop_px are in every epoch row of today's runs, but not in runs logged by
# older versions (the dashboards' panels for them say "runs that log it").
OPTIONAL_METRICS = (
    "gpu_mem_gb", "world_size", "global_batch", "train/crop_px", "train_eval/loss", "train_eval/top1_err", "train_eval/top5_err",
    "perf/mfu", "perf/peak_mem_gb", "val/ema_loss", "val/ema_top1_err", "val/ema_top5_err", *DATA_METRICS,
)  # fmt: skip
# Summaries keep the best (lowest) value next to the last one (a subset of EPOCH_METRICS).
MIN_SUMMARY_METRICS = (
    "train/loss", "train/top1_err", "train/top5_err", "val/top1_err", "val/top5_err", "val/ema_top1_err",
    "val/ema_top5_err",
)  # fmt: skip
# Summary only, set at the end of a run: the final evaluation in its mode (e.g. 10-crop), and
# "final/test/..." for CIFAR-10's test set when validation held out training images (val_split).
FINAL_SUMMARY_METRICS = tuple(
    f"final/{mode}/{err}"
    for mode in (*get_args(get_type_hints(EvalConfig)["mode"]), "test")
    for err in ("top1_err", "top5_err")
)
LOGGED_METRICS = frozenset(AXIS_METRICS + STEP_METRICS + PERF_METRICS + EPOCH_METRICS)

_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline"}


class TrackingWarning(UserWarning):
    """Tracking degraded (fell back to offline, or stopped) but training goes on."""


def resolve_mode(configured: str) -> str:
    """The mode to use: ``WANDB_MODE`` when set to a known mode, else the config's.

    A config that says ``disabled`` stays disabled: that is a deliberate choice (benchmarks,
    tests), while ``WANDB_MODE=offline`` is usually a machine-wide safety net.

    Args:
        configured: ``tracking.mode`` from the config.
    """
    if configured == "disabled":
        return "disabled"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    return _MODES.get(env, configured)


def new_run_id() -> str:
    """A fresh W&B run id (8 base-36 characters, wandb's own format)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return default


class Tracker:
    """One W&B run, or a no-op stand-in (non-zero ranks, ``disabled`` mode, failures).

    Build it with :meth:`Tracker.create`; the constructor only stores state.
    """

    def __init__(
        self,
        run: Any = None,
        *,
        mode: str = "disabled",
        run_id: str | None = None,
        wandb_dir: str | None = None,
    ):
        self._run = run
        self.mode = mode
        self.run_id = run_id
        self.wandb_dir = wandb_dir

    @classmethod
    def create(
        cls,
        cfg: TrackingConfig,
        *,
        run_name: str,
        run_dir: pathlib.Path,
        config: dict,
        run_id: str | None,
        is_main: bool,
    ) -> Tracker:
        """Start (or resume) the W&B run on rank 0; a no-op tracker elsewhere.

        Args:
            cfg: the ``tracking`` section of the config.
            run_name: the run's display name (``cfg.name``).
            run_dir: the run's local folder; wandb writes under ``run_dir/wandb``.
            config: the resolved config as a plain dict, stored as the W&B run config.
            run_id: the W&B id saved in the checkpoint, to continue that run; None for a new run.
            is_main: whether this is rank 0; other ranks never import wandb.
        """
        if not is_main:
            return cls(mode="disabled", run_id=run_id)
        mode = resolve_mode(cfg.mode)
        if mode == "disabled":
            return cls(mode="disabled", run_id=run_id)
        try:
            import wandb
        except Exception as e:  # a broken install must not stop training
            warnings.warn(
                f"W&B: cannot import wandb ({e}); tracking is off for this run", TrackingWarning, stacklevel=2
            )
            return cls(mode="disabled", run_id=run_id)

        try:
            # Global quiet first: wandb.login() prints, and looks up the user name over the
            # network, unless the process-wide settings are silent.
            wandb.setup(settings=wandb.Settings(silent=True))
        except Exception as e:
            warnings.warn(
                f"W&B: wandb.setup failed ({type(e).__name__}: {e}); tracking is off for this run",
                TrackingWarning,
                stacklevel=2,
            )
            return cls(mode="disabled", run_id=run_id)
        run_dir = pathlib.Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        init = dict(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            name=run_name,
            tags=list(cfg.tags) or None,
            config=config,
            dir=str(run_dir),
            id=run_id or new_run_id(),
            resume="allow",
        )

        reason = None
        if mode == "online":
            tracker, reason = cls._try_online(wandb, init)
            if tracker is not None:
                return tracker
        return cls._offline(wandb, init, fallback_reason=reason)

    @classmethod
    def _try_online(cls, wandb: Any, init: dict[str, Any]) -> tuple[Tracker | None, str | None]:
        """(the online tracker, None), or (None, why it cannot start); never prompts or hangs."""
        reason = missing_credentials(wandb)
        if reason is not None:
            return None, reason
        try:
            return cls._start(wandb, "online", init), None
        except Exception as e:  # no network, server error, init timeout
            # The failed run still holds its id in wandb's service process; a fresh service lets
            # the offline retry reuse the same id.
            _quiet_teardown(wandb)
            return None, f"wandb.init failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"

    @classmethod
    def _offline(cls, wandb: Any, init: dict[str, Any], fallback_reason: str | None) -> Tracker:
        """The offline run (the configured mode, or the fallback when online could not start)."""
        try:
            tracker = cls._start(wandb, "offline", init)
        except Exception as e:
            warnings.warn(
                f"W&B: offline run could not start ({type(e).__name__}: {e}); tracking is off for this run",
                TrackingWarning,
                stacklevel=3,
            )
            _quiet_teardown(wandb)
            return cls(mode="disabled", run_id=init["id"])
        if fallback_reason is not None:
            warnings.warn(
                f"W&B: tracking.mode is 'online' but {fallback_reason}; logging offline to {tracker.wandb_dir} "
                f"instead. Upload it later with: wandb sync {tracker.wandb_dir}",
                TrackingWarning,
                stacklevel=3,
            )
        else:
            print(
                f"W&B: offline run {tracker.run_id} in {tracker.wandb_dir} (upload: wandb sync "
                f"{tracker.wandb_dir})",
                flush=True,
            )
        return tracker

    @classmethod
    def _start(cls, wandb: Any, mode: str, init: dict[str, Any]) -> Tracker:
        settings = wandb.Settings(
            silent=True,
            # Ray already collects worker stdout, and wandb's fd redirect fights pytest and Ray.
            console="off",
            init_timeout=_env_float("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S),
            # Past this, finish() gives up uploading; the data stays on disk for `wandb sync`.
            finish_timeout=_env_float("WANDB_FINISH_TIMEOUT", FINISH_TIMEOUT_S),
        )
        run = wandb.init(mode=mode, settings=settings, **init)
        define_metrics(run)
        tracker = cls(run, mode=mode, run_id=run.id, wandb_dir=str(run.settings.sync_dir))
        if mode == "online":
            print(f"W&B: run {run.id} at {run.url}", flush=True)
        return tracker

    def log(self, metrics: dict[str, float], *, step: int) -> None:
        """Log one row of metrics at a global training iteration.

        Args:
            metrics: name -> value (errors in percent); include ``epoch`` for the epoch x-axis.
            step: the global training iteration; must not decrease within a run.
        """
        if self._run is None:
            return
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        self._guard("log", lambda: self._run.log(row, step=int(step)))

    def summary(self, values: dict) -> None:
        """Set run summary values (final numbers shown in the W&B runs table).

        Args:
            values: summary key -> value.
        """
        if self._run is None:
            return
        self._guard("summary", lambda: self._run.summary.update(dict(values)))

    def finish(self) -> None:
        """Close the run (flushes the offline file, or uploads within ``FINISH_TIMEOUT_S``)."""
        if self._run is None:
            return
        run, self._run = self._run, None
        try:
            run.finish()
            # finish() returns before wandb's service has closed the run file; tearing the
            # service down waits for that, so the .wandb file is whole once this returns (a
            # later init starts a fresh service).
            import wandb

            wandb.teardown()
        except Exception as e:
            warnings.warn(
                f"W&B: finishing the run failed ({type(e).__name__}: {e})", TrackingWarning, stacklevel=2
            )

    def _guard(self, what: str, fn: Any) -> None:
        # Tracking must never kill a training run: on the first failure, warn and stop tracking.
        try:
            fn()
        except Exception as e:
            warnings.warn(
                f"W&B: {what} failed ({type(e).__name__}: {e}); tracking is off for the rest of this run",
                TrackingWarning,
                stacklevel=3,
            )
            self._run = None


def missing_credentials(wandb: Any) -> str | None:
    """Why online mode cannot start (no key), or None. Never prompts, never touches the network."""
    try:
        if wandb.login(prompt=False, verify=False):
            return None
    except Exception as e:  # e.g. a malformed key
        return f"the W&B credentials are unusable ({type(e).__name__}: {e})"
    return "no W&B API key was found (WANDB_API_KEY or ~/.netrc; run `wandb login`)"


def _quiet_teardown(wandb: Any) -> None:
    try:
        wandb.teardown()
        # teardown() drops the process-wide settings; keep wandb quiet for the retry.
        wandb.setup(settings=wandb.Settings(silent=True))
    except Exception:
        pass  # the retry (or the no-op tracker) reports what still fails


def define_metrics(run: Any) -> None:
    run.define_metric("epoch")
    # The training loop logs `step` in epoch rows too; it equals wandb's own step, so hide its chart.
    run.define_metric("step", hidden=True)
    # One call per metric with all its options: later calls for the same name are separate
    # records in the run file, so keep each definition whole.
    for name in EPOCH_METRICS:
        summary = "min,last" if name in MIN_SUMMARY_METRICS else None
        run.define_metric(name, step_metric="epoch", summary=summary)
