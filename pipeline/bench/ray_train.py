"""``python -m pipeline bench ray``: Ray Train's start-up overhead and its scaling on CPU.

    python -m pipeline bench ray --json
    python -m pipeline bench ray --model cifar_resnet56 --batch-size 64 --steps 30
    python -m pipeline bench ray --global-batch 48 --max-worker-batch 8     # + fixed global batch, 1-3 workers

One small training loop (``synthetic_loop``: a registered model on a fixed random batch, SGD)
runs three ways:

1. in a fresh plain Python process (``python -c ...``): the baseline a user's own script pays,
   interpreter start and ``import torch`` included;
2. inside ``TorchTrainer`` with 1 worker, timed from before ``import ray`` (so ``ray.init``,
   the trainer's controller, the worker actor and its imports all count);
3. inside ``TorchTrainer`` with 2 workers (DDP over gloo).

``startup_overhead_s`` = time to the end of the first training step under Ray (1) minus the
same in the plain process. ``scaling_efficiency`` = throughput(2 workers) / (2 x
throughput(1 worker)): weak scaling, the per-worker batch stays fixed, each worker has one
CPU and one torch thread, so on a 2-core machine 1.0 means the all-reduce is free.

With ``--global-batch G`` it also runs the recipe's case, strong scaling: the global batch
stays G over 1, 2 and 3 workers (split as the training loop splits it, each rank's loss weighted by
its share), once as it comes and once with ``--max-worker-batch`` (gradient accumulation over
micro-batches, DDP's ``no_sync`` before the last). Each worker still has one CPU, so on a
2-core machine 3 workers share 2 cores.

Ray runs locally (``ray.init(address="local", num_cpus=2)``, with its dashboard: Ray Train asks its
state API whether the controller lives, and a Ray without one asks whatever answers on port 8265)
unless it is already initialised in this process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from pipeline.bench.common import BenchError, finish_machine, machine_info

HELP = "Ray Train start-up overhead vs a plain process, and 1->2 worker scaling efficiency on CPU"


def scaling_efficiency(rate_1: float, rate_n: float, workers: int = 2) -> float:
    """Throughput with ``workers`` workers over ``workers`` x the throughput with one.

    Args:
        rate_1: global images/s with one worker.
        rate_n: global images/s with ``workers`` workers (same per-worker batch).
        workers: the larger worker count.
    """
    if rate_1 <= 0 or workers < 1:
        raise ValueError(f"need a positive 1-worker rate and worker count, got {rate_1}, {workers}")
    return rate_n / (workers * rate_1)


def loop_config(
    model: str, batch_size: int, input_size: int | None, warmup: int, steps: int
) -> dict[str, Any]:
    """The loop's settings as the plain dict both the subprocess and Ray workers receive.

    Args:
        model: a registered model name.
        batch_size: images per worker per step.
        input_size: input side (None: the model's native size).
        warmup: untimed steps (the first one is the "first training step").
        steps: timed steps.
    """
    from pipeline.models import model_spec

    try:
        spec = model_spec(model)
    except ValueError as e:
        raise BenchError(str(e)) from None
    if batch_size < 1 or steps < 1 or warmup < 1:
        raise BenchError(
            f"need batch-size, steps and warmup of at least 1, got {batch_size}, {steps}, {warmup}"
        )
    return {
        "model": model,
        "global_batch": 0,  # > 0: fixed global batch split over the workers (strong scaling)
        "max_worker_batch": 0,  # > 0: micro-batches of at most this, gradients accumulated
        "batch_size": batch_size,
        "input_size": input_size or spec.input_size,
        "num_classes": spec.num_classes,
        "warmup": warmup,
        "steps": steps,
        "threads": 1,  # one CPU per Ray worker, so one torch thread everywhere, the baseline included
    }


def _step_run(model: Any, optimizer: Any, micro: int, world: int, global_batch: int) -> Any:
    """What the training loop's ``train_step`` reads of a ``Run``, for a bare model and optimizer."""
    from types import SimpleNamespace

    import torch

    from pipeline.config import load_config

    cfg = load_config(None, [f"optim.batch_size={global_batch}"])  # fp32, contiguous, no smoothing
    derived = SimpleNamespace(micro_batch=micro, world_size=world, global_batch=global_batch)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return SimpleNamespace(cfg=cfg, derived=derived, model=model, optimizer=optimizer, scaler=scaler)


def synthetic_loop(config: dict[str, Any], under_ray: bool = False) -> dict[str, Any]:
    """Train ``config["model"]`` on a fixed random batch; the same code in and out of Ray.

    Args:
        config: ``loop_config``'s dict.
        under_ray: inside a TorchTrainer worker: wrap the model in DDP with Ray's ``prepare_model``.

    Returns:
        ``start_time`` and ``first_step_time`` (wall clock, comparable across processes on one
        machine), ``world_size``, ``timed_s`` and the global ``img_per_s`` of the timed steps.
    """
    start = time.time()
    import torch

    from pipeline.models import create_model
    from pipeline.train.distributed import init_context, wrap_model
    from pipeline.train.loop import train_step

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    model = create_model(config["model"], num_classes=config["num_classes"])
    ctx = init_context(under_ray, use_gpu=False)  # the training loop's context: rank and world from Ray Train
    world = ctx.world_size
    model = wrap_model(model, ctx)  # DDP (Ray's prepare_model under Ray) when world > 1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    global_batch = config.get("global_batch") or 0
    if global_batch:  # the training loop's split: this rank's share, in micro-batches weighted by their size
        from pipeline.data.rank_split import rank_slice
        from pipeline.train.derived import accumulation

        share = rank_slice(global_batch, ctx.rank, world)
        n = share.stop - share.start
        micro, _ = accumulation(n, config.get("max_worker_batch") or 0)
    else:
        n = micro = config["batch_size"]
        global_batch = world * n
    s = config["input_size"]
    x = torch.randn(n, 3, s, s)
    y = torch.randint(config["num_classes"], (n,))
    run = _step_run(model, optimizer, micro=micro, world=world, global_batch=global_batch)
    first_step_time = timed_start = None
    for i in range(config["warmup"] + config["steps"]):
        if i == config["warmup"]:
            timed_start = time.perf_counter()
        train_step(run, x, y)  # the training loop's step: micro-batches, each rank's share weighted
        if i == 0:
            first_step_time = time.time()
    timed = time.perf_counter() - timed_start
    return {
        "start_time": start,
        "first_step_time": first_step_time,
        "world_size": world,
        "micro_batches": -(-n // micro),
        "timed_s": timed,
        "img_per_s": global_batch * config["steps"] / timed,
    }


def _ray_worker(config: dict[str, Any]) -> dict[str, Any]:
    # Ray Train V2 hands rank 0's return value back as Result.return_value (its Result.metrics
    # only holds metrics reported with a checkpoint).
    return synthetic_loop(config, under_ray=True)


def run_plain(config: dict[str, Any]) -> dict[str, Any]:
    """The loop in a fresh Python process; times relative to just before the process starts.

    Args:
        config: ``loop_config``'s dict.
    """
    code = (
        "import json, sys; from pipeline.bench.ray_train import synthetic_loop; "
        "print(json.dumps(synthetic_loop(json.loads(sys.argv[1]))))"
    )
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(config)], capture_output=True, text=True)
    end = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"the plain-process loop failed:\n{proc.stderr[-2000:]}")
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "first_step_s": m["first_step_time"] - t0,
        "loop_start_s": m["start_time"] - t0,
        "img_per_s": m["img_per_s"],
        "total_s": end - t0,
    }


def run_trainer(config: dict[str, Any], workers: int, storage: str, t0: float) -> dict[str, Any]:
    """The loop in a ``TorchTrainer`` with ``workers`` CPU workers (gloo); times relative to ``t0``.

    Args:
        config: ``loop_config``'s dict.
        workers: Ray Train workers, one CPU each.
        storage: RunConfig storage folder (a temporary one).
        t0: ``time.time()`` the start-up is measured from.
    """
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.distributed import backend_for

    fit_start = time.time()
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend=backend_for(use_gpu=False)),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=f"bench-ray-{workers}w",
            storage_path=storage,
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    m = getattr(trainer.fit(), "return_value", None)
    end = time.time()
    if not m:
        raise BenchError(
            "the trainer returned no metrics: bench ray needs Ray Train V2 (RAY_TRAIN_V2_ENABLED=1)"
        )
    return {
        "workers": workers,
        "first_step_s": m["first_step_time"] - t0,
        "fit_to_first_step_s": m["first_step_time"] - fit_start,
        "loop_start_s": m["start_time"] - t0,
        "img_per_s": m["img_per_s"],
        "micro_batches": m.get("micro_batches", 1),
        "total_s": end - t0,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench ray`` options.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument("--model", default="cifar_resnet20", help="a registered model (small: CPU workers)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per worker per step")
    parser.add_argument("--input-size", type=int, default=None, help="input side (default: the model's)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps; the first is the 'first step'")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (2 workers need 2)")
    parser.add_argument(
        "--global-batch",
        type=int,
        default=0,
        help="also: this global batch over 1, 2 and 3 workers (0: skip)",
    )
    parser.add_argument(
        "--max-worker-batch",
        type=int,
        default=0,
        help="with --global-batch: a second pass accumulating micro-batches of this",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark the parsed arguments describe and return its JSON-able result.

    Args:
        args: parsed ``bench ray`` arguments.
    """
    if args.num_cpus < 2:
        raise BenchError(f"--num-cpus must be at least 2 (two one-CPU workers), got {args.num_cpus}")
    if args.global_batch and args.num_cpus < 3:
        args.num_cpus = 3  # three one-CPU workers (they share the machine's cores)
    if args.global_batch and args.global_batch < 3:
        raise BenchError(f"--global-batch must cover 3 workers, got {args.global_batch}")
    config = loop_config(args.model, args.batch_size, args.input_size, args.warmup, args.steps)
    machine = machine_info()
    plain = run_plain(config)

    from pipeline.driver.ray_runner import (
        quiet_ray_env,  # the training launcher's settings, so both measure the same
    )

    quiet_ray_env()
    t0 = time.time()
    import logging

    import ray

    import_s = time.time() - t0
    started = not ray.is_initialized()
    if started:
        # log_to_driver=False: a failing worker's traceback still comes back in the exception
        # fit() raises.
        ray.init(
            address="local",
            num_cpus=args.num_cpus,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    init_s = time.time() - t0 - import_s
    storage = tempfile.mkdtemp(prefix="bench-ray-")
    fixed = []
    try:
        one = run_trainer(config, 1, storage, t0)
        two = run_trainer(config, 2, storage, time.time())
        for accumulate in (0, args.max_worker_batch) if args.max_worker_batch else (0,):
            for workers in (1, 2, 3) if args.global_batch else ():
                variant = {**config, "global_batch": args.global_batch, "max_worker_batch": accumulate}
                r = run_trainer(variant, workers, storage, time.time())
                fixed.append({"max_worker_batch": accumulate, **r})
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if started:
            ray.shutdown()
    return {
        "bench": "ray",
        **config,
        "plain_first_step_s": plain["first_step_s"],
        "ray_first_step_s": one["first_step_s"],
        "startup_overhead_s": one["first_step_s"] - plain["first_step_s"],
        "ray_import_s": import_s,
        "ray_init_s": init_s,
        "ray_was_initialized": not started,
        "plain_img_per_s": plain["img_per_s"],
        "img_per_s_1_worker": one["img_per_s"],
        "img_per_s_2_workers": two["img_per_s"],
        "scaling_efficiency": scaling_efficiency(one["img_per_s"], two["img_per_s"], 2),
        "plain": plain,
        "ray_1_worker": one,
        "ray_2_workers": two,
        # Strong scaling: the same global batch whatever the world size (empty without --global-batch).
        "fixed_global_batch": args.global_batch,
        "fixed_global_batch_runs": fixed,
        "backend": "gloo",
        "ray": ray.__version__,
        "machine": finish_machine(machine),
    }


def format_text(result: dict[str, Any]) -> str:
    """A few aligned lines for a terminal.

    Args:
        result: what ``run`` returned.
    """
    lines = [
        f"  global batch {result['fixed_global_batch']} over {r['workers']} worker(s)"
        f"{f', micro-batches of {mwb}' if (mwb := r['max_worker_batch']) else ''}: {r['img_per_s']:.1f} img/s"
        for r in result.get("fixed_global_batch_runs", [])
    ]
    return "\n".join(
        [
            f"Ray Train on CPU ({result['model']}, batch {result['batch_size']}/worker, 1 thread/worker), "
            f"load {result['machine']['load_avg_start']} -> {result['machine']['load_avg_end']}",
            f"  first step: plain process {result['plain_first_step_s']:.1f} s, Ray Train 1 worker "
            f"{result['ray_first_step_s']:.1f} s (overhead {result['startup_overhead_s']:.1f} s; "
            f"import {result['ray_import_s']:.1f} s, init {result['ray_init_s']:.1f} s)",
            f"  img/s: plain {result['plain_img_per_s']:.1f}, 1 worker {result['img_per_s_1_worker']:.1f}, "
            f"2 workers {result['img_per_s_2_workers']:.1f}; scaling efficiency {result['scaling_efficiency']:.2f}",
            *lines,
        ]
    )
