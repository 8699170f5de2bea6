"""``python -m pipeline train --config FILE [key=value ...]``: check everything, then train on Ray.

    python -m pipeline train --config configs/demo.yaml data.root=data/synth-demo
    RAY_ADDRESS=http://head:8265 ray job submit ... -- python -m pipeline train --config ...
    python -m pipeline train --config ... --no-ray        # one process, or under torchrun

The config and the dataset are checked before Ray starts (exit code 2 with a message that
names the key or the path). Then a ``TorchTrainer`` runs ``engine.train_worker`` on
``cluster.num_workers`` workers: on the cluster at ``RAY_ADDRESS`` when set (or inside a
submitted job), otherwise on a local Ray started here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, derive, dump_yaml, load_config, to_dict
from pipeline.rundir import is_uri, run_location


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline train", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", required=True, help="YAML experiment file, e.g. configs/imagenet/resnet50.yaml"
    )
    parser.add_argument(
        "--no-ray", action="store_true", help="run the engine in this process (or under torchrun)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=0.2"
    )
    return parser.parse_args(argv)


def dataset_size(cfg: Config) -> tuple[int, int]:
    """(training images, classes), checking the dataset's layout; raises ``DataLayoutError``."""
    if cfg.data.dataset == "cifar10":
        from pipeline.data.cifar import cifar_num_train

        return cifar_num_train(cfg.data.root, cfg.data.val_split), 10
    from pipeline.data.layout import scan_imagenet

    index = scan_imagenet(cfg.data.root)
    return len(index.train_files), index.num_classes


def preflight(cfg: Config) -> str:
    """Everything that can be checked before Ray starts; returns the text to print."""
    num_train, num_classes = dataset_size(cfg)
    if num_classes > cfg.model.num_classes:
        raise ConfigError(
            f"model.num_classes ({cfg.model.num_classes}) is smaller than the {num_classes} classes in "
            f"{cfg.data.root}; set model.num_classes={num_classes}"
        )
    import torch

    from pipeline.models import build_model

    try:
        with torch.device("meta"):  # builds the graph only: no memory, no arithmetic
            build_model(cfg.model)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    derived = derive(cfg, num_train)
    return (
        "resolved config:\n"
        + "\n".join("  " + line for line in dump_yaml(cfg).splitlines())
        + "\nderived:\n"
        + "\n".join(f"  {k}: {v}" for k, v in dataclasses.asdict(derived).items())
        + f"\n  train_images: {num_train}\n  classes: {num_classes}\n"
        + f"  run_dir: {run_location(cfg.checkpoint.storage_path, cfg.name)}"
    )


def with_absolute_paths(cfg: Config) -> Config:
    """Resolve relative local paths here: Ray Train workers run in their own working directory."""

    def absolute(path: str | None) -> str | None:
        return path if path is None or is_uri(path) else str(Path(path).expanduser().resolve())

    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, root=absolute(cfg.data.root)),
        checkpoint=dataclasses.replace(cfg.checkpoint, storage_path=absolute(cfg.checkpoint.storage_path)),
        resume_from=absolute(cfg.resume_from),
    )


def quiet_worker_logs() -> None:
    """Ray Train logs every report at INFO from each worker; keep its warnings only.

    Its "Reporting training result N" line comes from a logger named by file path (not under
    ``ray.train``) that reaches the console through the root logger, which Ray Train sets to
    INFO on workers: put the root back to Python's default, WARNING.
    """
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)


def _ray_worker(loop_config: dict[str, Any]) -> None:
    from pipeline.engine import train_worker

    quiet_worker_logs()
    train_worker(loop_config["config"], under_ray=True)


def quiet_ray_env() -> None:
    """Turn Ray's own console noise down where it has a switch (before ray is imported)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Ray Train re-routes print() through its logger, which echoes every line twice on the console.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def run_on_ray(
    cfg: Config,
    worker: Callable[[dict[str, Any]], None] = _ray_worker,
    extra: dict[str, Any] | None = None,
    name: str | None = None,
) -> Any:
    """Start or join Ray and run ``worker`` (by default ``train_worker``) on every worker.

    Args:
        cfg: the resolved config; its ``cluster`` section sizes the worker group.
        worker: the per-worker function; it gets ``{"config": to_dict(cfg), **extra}``.
        extra: more entries for the worker's loop config.
        name: the Ray Train run name (default ``cfg.name``, which is what resume keys on).
    """
    quiet_ray_env()
    import logging

    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    address = os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        else:
            # A local cluster with as many CPUs as the workers ask for (at least the machine's).
            need = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + 1
            ray.init(
                num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
                logging_level=logging.WARNING,
                log_to_driver=True,
            )
    if cfg.cluster.use_gpu == "auto":
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    else:
        use_gpu = cfg.cluster.use_gpu == "true"
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.cluster.gpus_per_worker
    cfg = with_absolute_paths(cfg)
    storage = cfg.checkpoint.storage_path
    print(
        f"Ray: {'cluster at ' + address if address else 'local'}; {cfg.cluster.num_workers} workers x {resources}, "
        f"{cfg.cluster.placement_strategy}, backend {'nccl' if use_gpu else 'gloo'}",
        flush=True,
    )
    trainer = TorchTrainer(
        worker,
        train_loop_config={"config": to_dict(cfg), **(extra or {})},
        # The process group's timeout: a collective with a dead peer fails within it (Ray's
        # default is 30 minutes), and Ray Train restarts the group per cluster.max_failures.
        torch_config=TorchConfig(timeout_s=cfg.cluster.collective_timeout_s),
        scaling_config=ScalingConfig(
            num_workers=cfg.cluster.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.cluster.placement_strategy,
        ),
        run_config=RunConfig(
            name=name or cfg.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.checkpoint.num_to_keep,
                checkpoint_score_attribute="val/top1_err",
                checkpoint_score_order="min",
            ),
            # Ray Train's INFO lines repeat every report; warnings and errors still show.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    return trainer.fit()  # raises TrainingFailedError when the workers fail beyond max_failures


def print_summary(cfg: Config) -> dict[str, Any] | None:
    location = run_location(cfg.checkpoint.storage_path, cfg.name)
    path = Path(location) / "summary.json"
    if is_uri(location) or not path.is_file():
        print(f"run finished; files under {location}", flush=True)
        return None
    summary = json.loads(path.read_text())
    rate = summary.get("img_per_s")
    lines = [
        ("model", summary["model"]),
        (
            "val top-1 err",
            f"{summary['val_top1_err']:.2f}%  ({summary['eval_mode']}, {summary.get('val_images')} images)",
        ),
        ("val top-5 err", f"{summary['val_top5_err']:.2f}%"),
        ("train img/s", f"{rate:.1f}" if rate is not None else "-"),
        ("epochs", f"{summary['epochs']} ({summary.get('steps')} steps)"),
        ("wall time", f"{summary['wall_s']:.1f} s"),
        ("checkpoint", summary["checkpoint"]),
        ("W&B run", f"{summary.get('wandb_dir')} ({summary.get('wandb_mode')})"),
        ("run dir", location),
    ]
    print("\n== summary ==\n" + "\n".join(f"  {k:<14} {v}" for k, v in lines), flush=True)
    return summary


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from pipeline.data.layout import DataLayoutError

    try:
        cfg = with_absolute_paths(load_config(args.config, args.overrides))
        print(preflight(cfg), flush=True)
    except (ConfigError, DataLayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pipeline.checkpoint import CheckpointError

    try:
        if args.no_ray:
            from pipeline.engine import train_worker

            train_worker(to_dict(cfg), under_ray=False)
        else:
            run_on_ray(cfg)
    except (CheckpointError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if type(e).__name__ != "TrainingFailedError":  # Ray's wrapper: workers failed beyond max_failures
            raise
        print(f"error: training failed: {e}", file=sys.stderr)
        return 1
    print_summary(cfg)
    return 0
