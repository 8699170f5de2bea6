"""``python -m pipeline train --config FILE [key=value ...]``: check everything, then train on Ray.

    python -m pipeline train --config configs/demo.yaml data.root=data/synth-demo
    RAY_ADDRESS=http://head:8265 ray job submit ... -- python -m pipeline train --config ...
    python -m pipeline train --config ... --no-ray        # one process, or under torchrun
    python -m pipeline train --config ... --dry-run       # print the plan on this cluster, train nothing

The config and the dataset are checked before Ray starts (exit code 2 with a message that
names the key or the path), and so is a resume in the middle of an epoch over other data than
its checkpoint's (exit code 1, naming both manifests' digests: ``pipeline.driver.resume_check``). Then a ``TorchTrainer`` runs ``pipeline.train.loop.train_worker`` on
``cluster.num_workers`` workers: on the cluster at ``RAY_ADDRESS`` when set (or inside a
submitted job), otherwise on a local Ray started here.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from typing import Any

from pipeline.config import Config, ConfigError, dump_yaml, load_config, to_dict
from pipeline.data.source import check_num_classes, open_dataset
from pipeline.driver.ray_runner import quiet_worker_logs, run_on_ray, with_absolute_paths
from pipeline.store.rundir import RunDir, run_location
from pipeline.train.derived import derive
from pipeline.train.distributed import launched_rank
from pipeline.train.step_time import describe_time


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline train", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", required=True, help="YAML experiment file, e.g. configs/imagenet/resnet50.yaml"
    )
    parser.add_argument(
        "--no-ray", action="store_true", help="run the training loop in this process (or under torchrun)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print what training would do on the cluster joined (nodes, GPUs, workers, storage, W&B, "
        "environment) and exit: 0 viable, 2 not (pipeline.driver.plan)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=0.2"
    )
    args = parser.parse_intermixed_args(argv)  # flags anywhere among the overrides (make submit ARGS=...)
    if args.dry_run and args.no_ray:
        parser.error("--dry-run plans a Ray run; it cannot be combined with --no-ray")
    return args


def preflight(cfg: Config) -> str:
    """Everything that can be checked before Ray starts; returns the text to print."""
    source = open_dataset(cfg.data)
    check_num_classes(cfg.model.num_classes, source)
    from pipeline.driver.resume_check import resume_problem
    from pipeline.train.checkpoint import CheckpointError

    problem = resume_problem(cfg, source)  # before any worker starts, not after Ray placed them
    if problem:
        raise CheckpointError(problem)
    import torch

    from pipeline.models import build_model

    try:
        with torch.device("meta"):  # builds the graph only: no memory, no arithmetic
            model = build_model(cfg.model)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if cfg.model.init_from:
        from pipeline.train.init_from import check_fits, read_initial_state

        check_fits(read_initial_state(cfg)[1], model, cfg.model.init_from)
    derived = derive(cfg, source.num_train)
    return (
        "resolved config:\n"
        + "\n".join("  " + line for line in dump_yaml(cfg).splitlines())
        + "\nderived:\n"
        + "\n".join(f"  {k}: {v}" for k, v in dataclasses.asdict(derived).items())
        + f"\n  train_images: {source.num_train}\n  classes: {source.num_classes}\n"
        + f"  run_dir: {run_location(cfg.checkpoint.storage_path, cfg.name)}"
    )


def _ray_worker(loop_config: dict[str, Any]) -> None:
    from pipeline.train.loop import train_worker

    quiet_worker_logs()
    train_worker(loop_config["config"], under_ray=True)


def train_on_ray(cfg: Config) -> Any:
    """``pipeline.train.loop.train_worker`` on ``cluster.num_workers`` Ray Train workers; Ray Train's ``Result``."""
    return run_on_ray(cfg, worker=_ray_worker)


def print_summary(cfg: Config) -> dict[str, Any] | None:
    location = run_location(cfg.checkpoint.storage_path, cfg.name)
    summary = RunDir(location).read_summary()
    if summary is None:
        print(f"run finished; files under {location}", flush=True)
        return None
    rate = summary.get("img_per_s")
    lines = [
        ("model", summary["model"]),
        (
            "val top-1 err",
            f"{summary['val_top1_err']:.2f}%  ({summary['eval_mode']}, {summary.get('val_images')} images)",
        ),
        ("val top-5 err", f"{summary['val_top5_err']:.2f}%"),
        ("train img/s", f"{rate:.1f}" if rate is not None else "-"),
        ("time", describe_time(summary)),
        ("epochs", f"{summary['epochs']} ({summary.get('steps')} steps)"),
        ("wall time", f"{summary['wall_s']:.1f} s"),
        ("checkpoint", summary["checkpoint"]),
        ("W&B run", f"{summary.get('wandb_dir')} ({summary.get('wandb_mode')})"),
        ("run dir", location),
    ]
    print("\n== summary ==\n" + "\n".join(f"  {k:<14} {v}" for k, v in lines), flush=True)
    return summary


def _training_failed(e: Exception) -> bool:
    """Ray Train gave up: workers failed beyond max_failures (``WorkerGroupError``) or the worker
    group could not start within cluster.start_retries (``ControllerError``); both derive from it."""
    import ray.train

    return isinstance(e, ray.train.TrainingFailedError)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from pipeline.data.layout import DataLayoutError
    from pipeline.train.checkpoint import CheckpointError

    # Under torchrun every process runs this; rank 0 alone prints the config and the summary.
    prints = not args.no_ray or launched_rank() == 0
    try:
        cfg = with_absolute_paths(load_config(args.config, args.overrides))
        plan = preflight(cfg)
        if prints:
            print(plan, flush=True)
    except (ConfigError, DataLayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # a mid-epoch resume over other data (pipeline.driver.resume_check)
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        from pipeline.driver.plan import dry_run

        return dry_run(cfg)
    try:
        if args.no_ray:
            from pipeline.train.loop import train_worker

            train_worker(to_dict(cfg), under_ray=False)
            # The DDP model sits in reference cycles that hold the gloo group's last pending work;
            # left to the interpreter's exit, freeing it can abort the process (SIGABRT, "terminate
            # called without an active exception") after a finished run. Free it now.
            gc.collect()
        else:
            train_on_ray(cfg)
    except ConfigError as e:  # the cluster checks before any worker starts (pipeline.driver.cluster_check)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if args.no_ray or not _training_failed(e):
            raise
        print(f"error: training failed: {e}", file=sys.stderr)
        return 1
    if prints:
        print_summary(cfg)
    return 0
