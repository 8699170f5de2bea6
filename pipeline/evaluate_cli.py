"""``python -m pipeline eval --config FILE --checkpoint PATH [key=value ...]``: score a checkpoint.

    python -m pipeline eval --config configs/demo.yaml --checkpoint runs/demo/checkpoint_epoch0008 eval.mode=tencrop
    python -m pipeline eval --config ... --checkpoint s3://bucket/runs/resnet50/checkpoint_epoch0120

Distributed like training (``cluster.num_workers`` Ray workers, each scoring its shard of
the validation set; ``--no-ray`` for one process), and exact whatever the world size. The
checkpoint may be a local folder or a URI: each worker fetches its own copy and removes it
after loading. Rank 0's result comes back through Ray (no node-local file), is printed and
written as JSON by this process (``--out``, default ``<checkpoint>/eval-<mode>.json``, a
URI when the checkpoint is one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, config_from_dict, load_config, requested_gpu, to_dict
from pipeline.ray_runner import quiet_worker_logs, run_on_ray, with_absolute_paths


def eval_worker(config: dict[str, Any], checkpoint: str, under_ray: bool = False) -> dict[str, Any]:
    """Load ``checkpoint`` into the configured model and evaluate it in ``eval.mode`` on every rank.

    Returns the result (the same on every rank: the counts are summed over ranks).
    """
    from pipeline import checkpoint as ckpt
    from pipeline.distributed import init_context
    from pipeline.evaluate import evaluate
    from pipeline.storage import fetched
    from pipeline.worker import build_data, build_model_for

    cfg = config_from_dict(config)
    ctx = init_context(under_ray, use_gpu=requested_gpu(cfg.cluster))
    data, _ = build_data(cfg, ctx)
    model, _ = build_model_for(cfg, ctx)
    with fetched(checkpoint) as folder:
        ckpt.restore_model(ckpt.read(folder), model)
    start = time.perf_counter()
    result = evaluate(
        model,
        data.make_val(cfg.eval.mode).epoch(0),
        mode=cfg.eval.mode,
        device=ctx.device,
        amp=cfg.precision.amp,
        channels_last=cfg.precision.channels_last,
    )
    record = {
        "checkpoint": str(checkpoint),
        "model": cfg.model.name,
        "eval_mode": cfg.eval.mode,
        "scales": list(cfg.eval.scales) if cfg.eval.mode == "multiscale" else None,
        "top1_err": result["val/top1_err"],
        "top5_err": result["val/top5_err"],
        "loss": result["val/loss"],
        "images": result["val/images"],
        "world_size": ctx.world_size,
        "wall_s": time.perf_counter() - start,
    }
    return record


def _ray_eval_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    quiet_worker_logs()
    record = eval_worker(loop_config["config"], loop_config["checkpoint"], under_ray=True)
    ray.train.report(record)  # rank 0's record becomes the run's result on the driver


def _check_checkpoint(location: str) -> None:
    """Fail before any worker starts: a local checkpoint is read whole, a remote one must hold state.pt."""
    from pipeline import checkpoint as ckpt
    from pipeline.locations import is_uri

    if not is_uri(location):
        ckpt.read(Path(location))
        return
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(f"{location.rstrip('/')}/{ckpt.STATE_FILE}")
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        raise ckpt.CheckpointError(
            f"{location}: no {ckpt.STATE_FILE} there (is it a checkpoint folder of this pipeline?)"
        )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder holding state.pt")
    parser.add_argument("--out", help="where to write the JSON result")
    parser.add_argument("--no-ray", action="store_true", help="evaluate in this process (or under torchrun)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    from pipeline import checkpoint as ckpt
    from pipeline.data.layout import DataLayoutError
    from pipeline.data.source import open_dataset
    from pipeline.locations import is_uri, write_bytes

    checkpoint = args.checkpoint if is_uri(args.checkpoint) else str(Path(args.checkpoint).resolve())
    try:
        cfg = with_absolute_paths(load_config(args.config, args.overrides))
        _check_checkpoint(checkpoint)
        open_dataset(cfg.data)
    except (ConfigError, DataLayoutError, ckpt.CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or f"{checkpoint.rstrip('/')}/eval-{cfg.eval.mode}.json"
    if args.no_ray:
        record = eval_worker(to_dict(cfg), checkpoint)
    else:
        try:
            result = run_on_ray(
                cfg,
                worker=_ray_eval_worker,
                extra={"checkpoint": checkpoint},
                name=f"{cfg.name}-eval-{time.strftime('%Y%m%d-%H%M%S')}",
            )
        except ConfigError as e:  # the cluster cannot run this (GPUs, shared paths): said before any work
            print(f"error: {e}", file=sys.stderr)
            return 2
        record = dict(result.metrics)
    text = json.dumps(record, indent=2)
    write_bytes(out, (text + "\n").encode())
    print(text)
    print(f"wrote {out}")
    return 0
