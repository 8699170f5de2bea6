"""``python -m pipeline eval --config FILE (--checkpoint DIR [--ema] | --weights FILE) [key=value ...]``: score a model.

    python -m pipeline eval --config configs/demo.yaml --checkpoint runs/demo/checkpoint_epoch0008 eval.mode=tencrop
    python -m pipeline eval --config configs/demo.yaml --checkpoint runs/demo/checkpoint_epoch0008 --ema
    python -m pipeline eval --config ... --checkpoint s3://bucket/runs/resnet50/checkpoint_epoch0120
    python -m pipeline eval --config configs/imagenet/resnet50.yaml --weights resnet50-0676ba61.pth \\
        model.name=resnet50_v1_5 data.normalize=meanstd data.root=/data/imagenet eval.mode=center

``--checkpoint`` loads a checkpoint of this pipeline, a local folder or a URI (each worker
fetches its own copy and removes it after loading), with ``--ema`` the EMA of its weights
(``optim.ema_decay``) in place of the weights; ``--weights`` a torchvision ResNet
state-dict file (the published ``resnetXX-*.pth``), so that our centre, 10-crop and
multi-scale numbers can be set beside torchvision's published ones. Distributed like training
(``cluster.num_workers`` Ray workers, each scoring its shard of the validation set;
``--no-ray`` for one process), and exact whatever the world size. Rank 0's result comes back
through Ray (no node-local file), is printed and written as JSON by this process (``--out``,
default ``<checkpoint>/eval-<mode>.json`` (``eval-<mode>-ema.json`` with ``--ema``), a URI when
the checkpoint is one, or ``<weights file>.eval-<mode>.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import (
    Config,
    ConfigError,
    config_from_dict,
    is_cifar,
    load_config,
    requested_gpu,
    to_dict,
)
from pipeline.driver.ray_runner import quiet_worker_logs, run_on_ray, with_absolute_paths


def _ema_state(state: dict[str, Any], where: str) -> dict[str, Any]:
    """``state`` with its EMA of the weights in place of the weights (what ``--ema`` scores)."""
    from pipeline.train.checkpoint import CheckpointError

    if state.get("ema") is None:
        raise CheckpointError(
            f"{where}: holds no EMA of the weights (trained with optim.ema_decay=0, or saved before the "
            "EMA existed); leave out --ema to score its weights"
        )
    return {**state, "model": state["ema"]}


def _load_weights(
    model: Any, cfg: Config, checkpoint: str | None, weights: str | None, ema: bool = False
) -> None:
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.checkpoint import fetched

    if weights is not None:
        from pipeline.models.pretrained import read_torchvision_weights

        model.load_state_dict(read_torchvision_weights(weights, cfg.model))
        return
    with fetched(checkpoint) as folder:
        state = ckpt.read(folder)
        ckpt.restore_model(_ema_state(state, checkpoint) if ema else state, model)


def eval_worker(
    config: dict[str, Any],
    checkpoint: str | None,
    under_ray: bool = False,
    weights: str | None = None,
    ema: bool = False,
) -> dict[str, Any]:
    """Load ``checkpoint`` (its EMA of the weights with ``ema``; or torchvision ``weights``) into the
    configured model and evaluate it in ``eval.mode`` on every rank; with a CIFAR-10 held-out split
    the test set is scored too.

    Returns the result (the same on every rank: the counts are summed over ranks).
    """
    from pipeline.train.distributed import init_context
    from pipeline.train.evaluate import evaluate
    from pipeline.train.setup import build_data, build_model_for

    cfg = config_from_dict(config)
    ctx = init_context(under_ray, requested_gpu(cfg.cluster), cfg.cluster.collective_timeout_s)
    data, _ = build_data(cfg, ctx)
    model, _ = build_model_for(cfg, ctx)
    _load_weights(model, cfg, checkpoint, weights, ema)
    start = time.perf_counter()

    def score(batches: Any) -> dict[str, float]:
        return evaluate(
            model,
            batches,
            mode=cfg.eval.mode,
            device=ctx.device,
            amp=cfg.precision.amp,
            channels_last=cfg.precision.channels_last,
            flip=cfg.eval.flip,
        )

    result = score(data.make_val(cfg.eval.mode).epoch(0))
    test = score(data.make_test().epoch(0)) if data.make_test else None
    return {
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "weights": str(weights) if weights is not None else None,
        "ema": ema,
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


def _ray_eval_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    quiet_worker_logs()
    # Rank 0's return value comes back as ``Result.return_value``; ``Result.metrics`` would hold
    # only what was reported with a checkpoint, so a ``ray.train.report(record)`` never reaches it.
    return eval_worker(
        loop_config["config"],
        loop_config["checkpoint"],
        under_ray=True,
        weights=loop_config["weights"],
        ema=loop_config["ema"],
    )


def _check_checkpoint(location: str, ema: bool) -> None:
    """Fail before any worker starts: a local checkpoint is read whole (and must hold an EMA for
    ``--ema``), a remote one must hold state.pt."""
    from pipeline.store.locations import is_uri, join, kind
    from pipeline.train import checkpoint as ckpt

    if not is_uri(location):
        state = ckpt.read(Path(location))
        if ema:
            _ema_state(state, location)
    elif kind(join(location, ckpt.STATE_FILE)) != "file":
        raise ckpt.CheckpointError(
            f"{location}: no {ckpt.STATE_FILE} there (is it a checkpoint folder of this pipeline?)"
        )


def _check_weights(cfg: Config, weights: Path) -> None:
    """torchvision's weights mean torchvision's input: ImageNet images normalised per channel."""
    from pipeline.models.pretrained import read_torchvision_weights

    if is_cifar(cfg.data.dataset):
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
    source.add_argument("--checkpoint", help="a checkpoint folder holding state.pt (a local path or a URI)")
    source.add_argument(
        "--weights", help="a torchvision ResNet state-dict file (.pth), e.g. torchvision's published weights"
    )
    parser.add_argument(
        "--ema", action="store_true", help="with --checkpoint: score its EMA of the weights (optim.ema_decay)"
    )
    parser.add_argument("--out", help="where to write the JSON result (a local path or a URI)")
    parser.add_argument("--no-ray", action="store_true", help="evaluate in this process (or under torchrun)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.ema and not args.checkpoint:
        parser.error("--ema scores a checkpoint's EMA of the weights: give --checkpoint")

    from pipeline.data.layout import DataLayoutError
    from pipeline.data.source import open_dataset
    from pipeline.models.pretrained import WeightsError
    from pipeline.store.locations import is_uri, join, write_bytes
    from pipeline.train import checkpoint as ckpt

    checkpoint = weights = None
    if args.checkpoint:
        checkpoint = args.checkpoint if is_uri(args.checkpoint) else str(Path(args.checkpoint).resolve())
    else:
        weights = str(Path(args.weights).resolve())
    try:
        cfg = with_absolute_paths(load_config(args.config, args.overrides))
        if weights:  # fail before any worker starts
            _check_weights(cfg, Path(weights))
        else:
            _check_checkpoint(checkpoint, args.ema)
        open_dataset(cfg.data)
    except (ConfigError, DataLayoutError, ckpt.CheckpointError, WeightsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    default_out = (
        join(checkpoint, f"eval-{cfg.eval.mode}{'-ema' if args.ema else ''}.json")
        if checkpoint
        else f"{weights}.eval-{cfg.eval.mode}.json"
    )
    out = args.out or default_out
    if args.no_ray:
        record = eval_worker(to_dict(cfg), checkpoint, weights=weights, ema=args.ema)
    else:
        try:
            result = run_on_ray(
                cfg,
                worker=_ray_eval_worker,
                extra={"checkpoint": checkpoint, "weights": weights, "ema": args.ema},
                name=f"{cfg.name}-eval-{time.strftime('%Y%m%d-%H%M%S')}",
            )
        except ConfigError as e:  # the cluster cannot run this (GPUs, shared paths): said before any work
            print(f"error: {e}", file=sys.stderr)
            return 2
        record = result.return_value
    text = json.dumps(record, indent=2)
    write_bytes(out if is_uri(out) else str(Path(out).resolve()), (text + "\n").encode())
    print(text)
    print(f"wrote {out}")
    return 0
