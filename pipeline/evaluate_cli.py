"""``python -m pipeline eval --config FILE --checkpoint PATH [key=value ...]``: score a checkpoint.

    python -m pipeline eval --config configs/demo.yaml --checkpoint runs/demo/checkpoint_epoch0008 eval.mode=tencrop

Distributed like training (``cluster.num_workers`` Ray workers, each scoring its shard of
the validation set; ``--no-ray`` for one process), and exact whatever the world size. The
result is printed and written as JSON (``--out``, default ``<checkpoint>/eval-<mode>.json``).
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


def eval_worker(config: dict[str, Any], checkpoint: str, out: str, under_ray: bool = False) -> dict[str, Any]:
    """Load ``checkpoint`` into the configured model and evaluate it in ``eval.mode`` on every rank."""
    from pipeline import checkpoint as ckpt
    from pipeline.distributed import init_context
    from pipeline.evaluate import evaluate
    from pipeline.worker import build_data, build_model_for

    cfg = config_from_dict(config)
    ctx = init_context(under_ray, use_gpu=requested_gpu(cfg.cluster))
    data, _ = build_data(cfg, ctx)
    model, _ = build_model_for(cfg, ctx)
    ckpt.restore_model(ckpt.read(Path(checkpoint)), model)
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
    if ctx.is_main:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _ray_eval_worker(loop_config: dict[str, Any]) -> None:
    quiet_worker_logs()
    eval_worker(loop_config["config"], loop_config["checkpoint"], loop_config["out"], under_ray=True)


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

    try:
        cfg = with_absolute_paths(load_config(args.config, args.overrides))
        ckpt.read(Path(args.checkpoint))  # fail before any worker starts
        open_dataset(cfg.data)
    except (ConfigError, DataLayoutError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = str(Path(args.out or Path(args.checkpoint) / f"eval-{cfg.eval.mode}.json").resolve())
    if args.no_ray:
        eval_worker(to_dict(cfg), str(Path(args.checkpoint).resolve()), out)
    else:
        run_on_ray(
            cfg,
            worker=_ray_eval_worker,
            extra={"checkpoint": str(Path(args.checkpoint).resolve()), "out": out},
            name=f"{cfg.name}-eval-{time.strftime('%Y%m%d-%H%M%S')}",
        )
    record = json.loads(Path(out).read_text())
    print(json.dumps(record, indent=2))
    print(f"wrote {out}")
    return 0
