"""Starts or joins Ray and builds the ``TorchTrainer`` for the train and eval commands (``bench ray``
builds its own, to time Ray Train itself).

    result = run_on_ray(cfg, worker=my_worker, extra={"checkpoint": path})

``worker(loop_config)`` runs on every Ray Train worker with ``loop_config = {"config":
to_dict(cfg), **extra}``; it should call ``quiet_worker_logs()`` first. Ray is joined at
``RAY_ADDRESS`` when set (or inside a submitted job), otherwise started here with as many
CPUs as the workers ask for. Before the trainer is built, ``pipeline.driver.cluster_check`` decides
``cluster.use_gpu: auto``, checks that the workers can be placed and that local paths are
shared (``ConfigError``, docs/cluster-checks.md).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import Config, to_dict
from pipeline.driver.cluster_check import check_cluster
from pipeline.host import usable_cpus
from pipeline.store.locations import is_uri
from pipeline.train.distributed import backend_for

REPORT_POLL_S = 0.5  # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, Ray's default 2


def with_absolute_paths(cfg: Config) -> Config:
    """Resolve relative local paths here: Ray Train workers run in their own working directory."""

    def absolute(path: str | None) -> str | None:
        return path if path is None or is_uri(path) else str(Path(path).expanduser().resolve())

    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, root=absolute(cfg.data.root)),
        checkpoint=dataclasses.replace(cfg.checkpoint, storage_path=absolute(cfg.checkpoint.storage_path)),
        resume_from=absolute(cfg.resume_from),
        model=dataclasses.replace(cfg.model, init_from=absolute(cfg.model.init_from)),
    )


def quiet_ray_env() -> None:
    """Turn Ray's own console noise down where it has a switch (before ray is imported)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Ray Train re-routes print() through its logger, which echoes every line twice on the console.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if (
        not sys.stdout.isatty()
    ):  # colour codes in the "(RayTrainWorker pid=...)" prefix garble files and pipes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def quiet_worker_logs() -> None:
    """Keep a worker's console to warnings and the pipeline's own printed lines.

    Ray Train sets the worker's root logger to INFO and logs ``Reporting training result N:
    TrainingReport(...)`` on every rank at every report, through a logger named after its
    source file (so not under ``ray.train``). The pipeline prints; it logs nothing at INFO.
    """
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)


def connect(cfg: Config) -> str | None:
    """Join the cluster at ``RAY_ADDRESS``, or start a local one; returns the address joined."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        else:
            # A local cluster with as many CPUs as the workers ask for (at least the machine's).
            need = cfg.cluster.max_workers * cfg.cluster.cpus_per_worker + 1
            ray.init(
                num_cpus=max(usable_cpus(), int(need + 0.999)),
                logging_level=logging.WARNING,
                log_to_driver=True,
            )
    return address


def run_on_ray(
    cfg: Config,
    worker: Callable[[dict[str, Any]], None],
    extra: dict[str, Any] | None = None,
    name: str | None = None,
) -> Any:
    """Start or join Ray and run ``worker`` on ``cluster.num_workers`` Ray Train workers.

    Args:
        cfg: the resolved config; its ``cluster`` section sizes the worker group.
        worker: the per-worker function; it gets ``{"config": to_dict(cfg), **extra}``.
        extra: more entries for the worker's loop config.
        name: the Ray Train run name (default ``cfg.name``, which is what resume keys on).

    Returns:
        Ray Train's ``Result``; raises ``TrainingFailedError`` when the workers fail beyond
        ``cluster.max_failures``.
    """
    quiet_ray_env()
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    address = connect(cfg)
    cfg = with_absolute_paths(cfg)
    # GPUs or not, whether the workers can ever be placed, and shared paths: ConfigError here,
    # before any worker starts (pipeline.driver.cluster_check).
    plan = check_cluster(cfg, address)
    use_gpu, resources = plan.use_gpu, plan.resources
    # Workers see the decision, not "auto" (they must not guess again from their own node).
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, use_gpu=str(use_gpu).lower()))
    # Read by Ray Train's controller (it is among the variables Ray passes on to it).
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.cluster.start_timeout_s)
    # The controller takes one report per worker per poll, every 2 s by Ray's default: a run that
    # reports more often (short epochs, mid-epoch checkpoints) waited on it, and so did the end of
    # every run, its last reports drained one poll at a time (a 40-step test run with 20
    # checkpoints: 78 s, 47 s at 0.5 s). A variable set in the environment wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(REPORT_POLL_S))
    if address is None:
        # Ray Train's preemption watcher notices nodes being drained (spot reclaims, autoscaler
        # scale-down) so such losses do not count against cluster.max_failures. A local Ray
        # started here has one node that is never drained, and the watcher's only effect is
        # Ray's "E ... core_worker.cc ... Actor with class name: 'PreemptionWatcher' ...
        # max_restarts > 0" line on every run, which reads as an error. On a cluster it stays on.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    print(
        f"Ray: {'cluster at ' + address if address else 'local'}; {plan.placement}; "
        f"backend {backend_for(use_gpu)} ({plan.gpu_reason})",
        *(f"warning: {w}" for w in plan.warnings),
        sep="\n",
        flush=True,
    )
    # Elastic: after the first start, a restart waits cluster.restart_timeout_s, not
    # start_timeout_s, then starts with the workers that fit (pipeline.driver.elastic).
    trainer_cls, callbacks = TorchTrainer, []
    if cfg.cluster.preemption_poll_s > 0:
        callbacks.append(sigterm_notes())
    if cfg.cluster.elastic:
        from pipeline.driver.elastic import BoundedRestart, elastic_trainer

        trainer_cls, callbacks = (
            elastic_trainer(TorchTrainer),
            [BoundedRestart(cfg.cluster.restart_timeout_s)],
        )
    trainer = trainer_cls(
        worker,
        train_loop_config={"config": to_dict(cfg), **(extra or {})},
        # The process group's timeout: a collective with a dead peer fails within it (Ray's
        # default is 30 minutes), and Ray Train restarts the group per cluster.max_failures.
        torch_config=TorchConfig(backend=backend_for(use_gpu), timeout_s=cfg.cluster.collective_timeout_s),
        scaling_config=ScalingConfig(
            # [min, max]: Ray Train's elastic scaling; a resize restarts the group, which resumes
            # from the latest checkpoint with the same global batch, re-sharded.
            num_workers=(cfg.cluster.min_workers, cfg.cluster.max_workers)
            if cfg.cluster.elastic
            else cfg.cluster.max_workers,
            elastic_resize_monitor_interval_s=cfg.cluster.resize_check_s,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.cluster.placement_strategy,
        ),
        run_config=RunConfig(
            name=name or cfg.name,
            storage_path=cfg.checkpoint.storage_path,
            failure_config=FailureConfig(
                max_failures=cfg.cluster.max_failures,
                controller_failure_limit=cfg.cluster.start_retries,
                max_preemption_failures=cfg.cluster.max_preemption_failures,
            ),
            # The one retention policy (pipeline.train.checkpoint): the newest num_to_keep.
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            # Ray Train's INFO lines repeat every report; warnings and errors still show.
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
    )
    abort_on_sigterm()
    return trainer.fit()


def sigterm_notes() -> Any:
    """A Ray Train callback that makes a SIGTERM to a training worker (a pod deleted with a grace
    period) a preemption notice (``pipeline.train.preemption.note_sigterm``), on each worker's
    main thread as its group starts."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    from pipeline.train.preemption import note_sigterm

    class SigtermNotes(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group: Any) -> None:
            worker_group.execute(note_sigterm)

    return SigtermNotes()


def abort_on_sigterm() -> None:
    """``ray job stop``, KubeRay and a node's shutdown end a job's driver with SIGTERM, on which
    Python exits at once: Ray Train's controller dies with it unaborted, and its resource request
    stays with Ray's autoscaling coordinator until it expires (180 s), so an elastic run submitted
    again finds no room for that long. Ray Train aborts a run gracefully on SIGINT (the handler
    ``fit()`` sets: the workers stopped, the request cancelled); SIGTERM now does the same, then exits."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread may
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signum, frame)  # Ray Train's: aborts the run, then exits itself
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
