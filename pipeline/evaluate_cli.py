"""``python -m pipeline eval --config FILE (--checkpoint DIR | --weights FILE) [key=value ...]``: score a model.

    python -m pipeline eval --config configs/demo.yaml --checkpoint runs/demo/checkpoint_epoch0008 eval.mode=tencrop
    python -m pipeline eval --config configs/imagenet/resnet50.yaml --weights resnet50-0676ba61.pth \\
        model.name=resnet50_v1_5 data.normalize=meanstd data.root=/data/imagenet eval.mode=center

``--checkpoint`` loads a checkpoint of this pipeline; ``--weights`` a torchvision ResNet
state-dict file (the published ``resnetXX-*.pth``), so that our centre, 10-crop and
multi-scale numbers can be set beside torchvision's published ones. Distributed like training
(``cluster.num_workers`` Ray workers, each scoring its shard of the validation set;
``--no-ray`` for one process), and exact whatever the world size. The result is printed and
written as JSON (``--out``, default ``<checkpoint>/eval-<mode>.json`` or
``<weights file>.eval-<mode>.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, config_from_dict, load_config, requested_gpu, to_dict
from pipeline.ray_runner import quiet_worker_logs, run_on_ray, with_absolute_paths


def _load_weights(model: Any, cfg: Config, checkpoint: str | None, weights: str | None) -> None:
    from pipeline import checkpoint as ckpt

    if weights is not None:
        from pipeline.models.pretrained import read_torchvision_weights

        model.load_state_dict(read_torchvision_weights(weights, cfg.model))
    else:
        ckpt.restore_model(ckpt.read(Path(checkpoint)), model)


def eval_worker(
    config: dict[str, Any],
    checkpoint: str | None,
    out: str,
    under_ray: bool = False,
    weights: str | None = None,
) -> dict[str, Any]:
    """Load ``checkpoint`` (or torchvision ``weights``) into the configured model and evaluate it
    in ``eval.mode`` on every rank; with a CIFAR-10 held-out split the test set is scored too."""
    from pipeline.distributed import init_context
    from pipeline.evaluate import evaluate
    from pipeline.worker import build_data, build_model_for

    cfg = config_from_dict(config)
    ctx = init_context(under_ray, use_gpu=requested_gpu(cfg.cluster))
    data, _ = build_data(cfg, ctx)
    model, _ = build_model_for(cfg, ctx)
    _load_weights(model, cfg, checkpoint, weights)
    start = time.perf_counter()

    def score(batches: Any) -> dict[str, float]:
        return evaluate(
            model,
            batches,
            mode=cfg.eval.mode,
            device=ctx.device,
            amp=cfg.precision.amp,
            channels_last=cfg.precision.channels_last,
        )

    result = score(data.make_val(cfg.eval.mode).epoch(0))
    test = score(data.make_test().epoch(0)) if data.make_test else None
    record = {
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "weights": str(weights) if weights is not None else None,
        "model": cfg.model.name,
        "eval_mode": cfg.eval.mode,
        "scales": list(cfg.eval.scales) if cfg.eval.mode == "multiscale" else None,
        "top1_err": result["val/top1_err"],
        "top5_err": result["val/top5_err"],
        "loss": result["val/loss"],
        "images": result["val/images"],
        **{k.replace("val/", "test_"): v for k, v in (test or {}).items()},
        "world_size": ctx.world_size,
        "wall_s": time.perf_counter() - start,
    }
    if ctx.is_main:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _ray_eval_worker(loop_config: dict[str, Any]) -> None:
    quiet_worker_logs()
    eval_worker(
        loop_config["config"],
        loop_config["checkpoint"],
        loop_config["out"],
        under_ray=True,
        weights=loop_config["weights"],
    )


def _check_weights(cfg: Config, weights: Path) -> None:
    """torchvision's weights mean torchvision's input: ImageNet images normalised per channel."""
    from pipeline.models.pretrained import read_torchvision_weights

    if cfg.data.dataset != "imagenet":
        raise ConfigError(f"--weights: torchvision's ResNet weights are for ImageNet, not {cfg.data.dataset}")
    if cfg.data.normalize != "meanstd":
        raise ConfigError(
            f"--weights: torchvision's weights were trained on inputs normalised by the per-channel mean and "
            f"std; data.normalize={cfg.data.normalize!r} would score them on other inputs. Set data.normalize=meanstd"
        )
    read_torchvision_weights(weights, cfg.model)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint folder holding state.pt")
    source.add_argument(
        "--weights", help="a torchvision ResNet state-dict file (.pth), e.g. torchvision's published weights"
    )
    parser.add_argument("--out", help="where to write the JSON result")
    parser.add_argument("--no-ray", action="store_true", help="evaluate in this process (or under torchrun)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    from pipeline import checkpoint as ckpt
    from pipeline.data.layout import DataLayoutError
    from pipeline.data.source import open_dataset
    from pipeline.models.pretrained import WeightsError

    try:
        cfg = with_absolute_paths(load_config(args.config, args.overrides))
        # Fail before any worker starts.
        if args.weights:
            _check_weights(cfg, Path(args.weights))
        else:
            ckpt.read(Path(args.checkpoint))
        open_dataset(cfg.data)
    except (ConfigError, DataLayoutError, ckpt.CheckpointError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    checkpoint = str(Path(args.checkpoint).resolve()) if args.checkpoint else None
    weights = str(Path(args.weights).resolve()) if args.weights else None
    default_out = (
        Path(args.checkpoint) / f"eval-{cfg.eval.mode}.json"
        if checkpoint
        else Path(f"{args.weights}.eval-{cfg.eval.mode}.json")
    )
    out = str(Path(args.out or default_out).resolve())
    if args.no_ray:
        eval_worker(to_dict(cfg), checkpoint, out, weights=weights)
    else:
        run_on_ray(
            cfg,
            worker=_ray_eval_worker,
            extra={"checkpoint": checkpoint, "weights": weights, "out": out},
            name=f"{cfg.name}-eval-{time.strftime('%Y%m%d-%H%M%S')}",
        )
    record = json.loads(Path(out).read_text())
    print(json.dumps(record, indent=2))
    print(f"wrote {out}")
    return 0
