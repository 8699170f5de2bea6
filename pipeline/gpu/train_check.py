"""The training parts of the GPU check: the training loop in one process, DDP with the bf16 hook, throughput.

Training runs ``pipeline.train.loop.train_worker`` itself (what ``pipeline train --no-ray`` runs),
so the loop, the DALI loaders, validation and the checkpoint files are the project's. The DDP
check builds the same DDP as ``pipeline.train.distributed.wrap_model`` (``gradient_as_bucket_view``,
DDP's ``bf16_compress_hook``) over a one-rank group: ``wrap_model`` hands a one-rank world the
bare module, and one GPU cannot hold two NCCL ranks.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.gpu.dali_check import CheckFailed

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = str(REPO / "configs/demo.yaml")
IMAGENET_CONFIG = str(REPO / "configs/imagenet/resnet50.yaml")


def _config(path: str, overrides: list[str]) -> dict[str, Any]:
    from pipeline.config import load_config, to_dict

    return to_dict(load_config(path, overrides))


def _one_process_run(name: str, root: str, runs: str, gpu: bool) -> list[str]:
    """The overrides every check's run shares: one worker in this process on ``root``, no
    tracking, one checkpoint kept under ``runs``, no per-step lines."""
    return [
        f"name={name}", f"data.root={root}", f"cluster.use_gpu={'true' if gpu else 'false'}", "cluster.num_workers=1",
        "tracking.mode=disabled", f"checkpoint.storage_path={runs}", "checkpoint.num_to_keep=1", "log_every_n_steps=1000",
    ]  # fmt: skip


def _metrics(run_dir: str) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_demo(
    root: str,
    runs: str,
    *,
    name: str,
    gpu: bool,
    amp: str,
    channels_last: bool,
    compile: bool,
    epochs: int,
    batch: int,
    threads: int,
) -> dict[str, Any]:
    """Train ``configs/demo.yaml`` on ``root`` in this process; the loss must fall, validation run,
    and the last checkpoint read back into a fresh model with the same weights."""
    from pipeline.models import build_model
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.loop import train_worker

    overrides = _one_process_run(name, root, runs, gpu) + [
        f"data.num_threads={threads}", f"optim.batch_size={batch}",
        f"optim.lr={0.1 * batch / 64:g}", f"schedule.epochs={epochs}", f"schedule.milestones=[{epochs}]",
        "schedule.warmup_epochs=0",
        f"precision.amp={amp}", f"precision.channels_last={'true' if channels_last else 'false'}",
        f"precision.compile={'true' if compile else 'false'}", "eval.final_mode=tencrop",
    ]  # fmt: skip
    config = _config(DEMO_CONFIG, overrides)
    t0 = time.perf_counter()
    summary = train_worker(config)
    wall = time.perf_counter() - t0
    epochs_seen = _metrics(summary["run_dir"])
    losses = [e["train/loss"] for e in epochs_seen]
    if len(losses) != epochs:
        raise CheckFailed(f"{name}: metrics.jsonl has {len(losses)} epochs, expected {epochs}")
    if not losses[-1] < losses[0]:
        raise CheckFailed(f"{name}: the training loss did not fall: {losses}")
    if any("val/top1_err" not in e for e in epochs_seen) or summary.get("val_images", 0) <= 0:
        raise CheckFailed(f"{name}: validation did not run every epoch (summary: {summary})")
    folder = Path(summary["checkpoint"])
    state = ckpt.read(folder)
    from pipeline.config import config_from_dict

    fresh = build_model(config_from_dict(state["config"]).model)
    ckpt.restore_model(state, fresh)
    for key, value in fresh.state_dict().items():
        if not torch.equal(value, state["model"][key]):
            raise CheckFailed(f"{name}: {key} differs after reading the checkpoint back")
    if state["epoch"] != epochs:
        raise CheckFailed(f"{name}: the checkpoint says epoch {state['epoch']}, expected {epochs}")
    return {
        "device": "cuda" if gpu else "cpu",
        "amp": amp,
        "channels_last": channels_last,
        "compile": compile,
        "epochs": epochs,
        "global_batch": batch,
        "train_loss": losses,
        "val_top1_err": [e["val/top1_err"] for e in epochs_seen],
        "final_tencrop_top1_err": summary["val_top1_err"],
        "img_per_s": [e["img_per_s"] for e in epochs_seen],
        "checkpoint": str(folder),
        "checkpoint_bytes": (folder / ckpt.STATE_FILE).stat().st_size,
        "wall_s": wall,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_bf16_step(backend: str, device: torch.device) -> dict[str, Any]:
    """One DDP step over a one-rank ``backend`` group with the bf16 compression hook.

    The gradients DDP leaves must be bf16 values (they went through the hook) and match a plain
    backward's rounded to bf16; the optimizer step must then move the weights.
    """
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from pipeline.models import create_model

    if dist.is_initialized():
        raise CheckFailed("a process group already exists in this process")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group(
        backend, rank=0, world_size=1, device_id=device if device.type == "cuda" else None
    )
    try:
        torch.manual_seed(0)
        model = create_model("cifar_resnet20").to(device)
        reference = copy.deepcopy(model)
        ids = [device.index] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
        ddp.register_comm_hook(state=None, hook=default_hooks.bf16_compress_hook)
        x = torch.randn(16, 3, 32, 32, device=device)
        y = torch.randint(10, (16,), device=device)
        F.cross_entropy(ddp(x), y).backward()
        F.cross_entropy(reference(x), y).backward()
        worst, not_bf16 = 0.0, []
        for (name, p), r in zip(model.named_parameters(), reference.parameters(), strict=True):
            g, want = p.grad.float(), r.grad.float()
            if not torch.equal(g, g.bfloat16().float()):
                not_bf16.append(name)
            scale = want.abs().max().clamp_min(1e-12)
            worst = max(worst, float(((g - want).abs().max() / scale).item()))
        if not_bf16:
            raise CheckFailed(f"{backend}: gradients not rounded to bf16 by the hook: {not_bf16[:5]}")
        if worst > 2**-6:
            raise CheckFailed(
                f"{backend}: DDP gradients differ from a plain backward by {worst:.2e} (relative)"
            )
        before = [p.detach().clone() for p in model.parameters()]
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        moved = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
        if moved == 0:
            raise CheckFailed(f"{backend}: the optimizer step changed no weight")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {"backend": backend, "device": str(device), "world_size": dist.get_world_size(),
                "max_rel_grad_diff": worst, "params_moved": moved}  # fmt: skip
    finally:
        dist.destroy_process_group()


def model_throughput(device: torch.device, *, batch: int, input_size: int, steps: int, warmup: int,
                     variants: list[str], eval_images: int) -> list[dict[str, Any]]:  # fmt: skip
    """``bench model``'s timed steps for resnet50_v1_5: training and 10-crop eval images/s per variant."""
    from pipeline.bench.model import bench_variant, parse_variants

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = []
    for variant in parse_variants(",".join(variants), device.type):
        row = bench_variant(
            variant, model_name="resnet50_v1_5", device=device, batch_size=batch, eval_images=eval_images,
            input_size=input_size, warmup=warmup, steps=steps, block=steps if device.type == "cuda" else 1,
            reference=False,
        )  # fmt: skip
        if row["error"]:
            raise CheckFailed(f"model throughput {variant.name}: {row['error']}")
        rows.append({k: row[k] for k in ("variant", "train_img_per_s", "eval_img_per_s") if k in row}
                    | {"first_step_s": row["train_timing"]["ours"]["first_step_s"]})  # fmt: skip
    return rows


def end_to_end(root: str, runs: str, *, name: str, gpu: bool, batch: int, crop: int, epochs: int,
               threads: int, amp: str, compile: bool, model: str = "resnet50_v1_5") -> dict[str, Any]:  # fmt: skip
    """The training loop on the ImageNet recipe (the paper's augmentation, DALI ``mixed`` decode on a GPU):
    images/s and the share of each epoch spent waiting for data, the first epoch left out."""
    from pipeline.train.loop import train_worker

    scale = crop / 224
    overrides = _one_process_run(name, root, runs, gpu) + [
        "data.normalize=meanstd", f"data.crop_size={crop}",
        f"data.scale_min={round(256 * scale)}", f"data.scale_max={round(480 * scale)}",
        f"data.val_resize={round(256 * scale)}", f"data.decoder={'mixed' if gpu else 'cpu'}",
        f"data.num_threads={threads}", f"model.name={model}", f"optim.batch_size={batch}",
        "schedule.kind=constant", f"schedule.epochs={epochs}", "schedule.max_iters=null",
        f"eval.every_n_epochs={epochs}", "eval.final_mode=center", f"precision.amp={amp}",
        "precision.channels_last=true", f"precision.compile={'true' if compile else 'false'}",
    ]  # fmt: skip
    summary = train_worker(_config(IMAGENET_CONFIG, overrides))
    rows = _metrics(summary["run_dir"])
    steady = rows[1:] or rows
    return {
        "model": model,
        "global_batch": batch,
        "crop": crop,
        "decoder": "mixed" if gpu else "cpu",
        "amp": amp,
        "channels_last": True,
        "compile": compile,
        "epochs": len(rows),
        "img_per_s": statistics.median(r["img_per_s"] for r in steady),
        "data_wait_frac": statistics.median(r["data_wait_frac"] for r in steady),
        "per_epoch": [{k: r[k] for k in ("img_per_s", "data_wait_frac", "epoch_time_s")} for r in rows],
        "gpu_mem_gb": rows[-1].get("gpu_mem_gb"),
    }


def tencrop_eval(root: str, device: torch.device, *, batch: int, crop: int, threads: int, amp: str,
                 passes: int = 2, model: str = "resnet50_v1_5") -> dict[str, Any]:  # fmt: skip
    """10-crop evaluation images/s end to end: the DALI loader (``mixed`` on a GPU) and the network."""
    from pipeline.data.imagenet import build_val_loader
    from pipeline.data.layout import scan_imagenet
    from pipeline.gpu.dali_check import data_config
    from pipeline.models import create_model
    from pipeline.train.evaluate import evaluate

    gpu = device.type == "cuda"
    index = scan_imagenet(root, use_index=False)
    cfg = data_config(root, "none", "mixed" if gpu else "cpu", crop, round(256 * crop / 224))
    loader = build_val_loader(index, cfg, mode="tencrop", scales=(), batch_size=batch, rank=0, world_size=1,
                              device_id=device.index if gpu else None, num_threads=threads, channels_last=True)  # fmt: skip
    net = create_model(model).to(device).to(memory_format=torch.channels_last)
    if gpu:
        torch.backends.cudnn.benchmark = True
    times = []
    for _ in range(max(2, passes)):
        t0 = time.perf_counter()
        result = evaluate(net, loader.epoch(0), mode="tencrop", device=device, amp=amp, channels_last=True)
        times.append(time.perf_counter() - t0)  # evaluate() ends with a host read: the device is done
    n = result["val/images"]
    return {"model": model, "images": n, "crops": n * 10, "batch": batch, "crop": crop, "amp": amp,
            "decoder": cfg.decoder, "img_per_s": n / min(times[1:]), "first_pass_s": times[0]}  # fmt: skip


FAST_CONFIG = "configs/imagenet/fast/rn50_{epochs}ep.yaml"
RECIPE_EPOCHS = (16, 24, 32, 40, 88)
IMAGENET_TRAIN_IMAGES = 1_281_167


def recipe_gpu_hours(img_per_s: dict[int, float]) -> dict[str, float]:
    """Each fast recipe's training time on one GPU, in hours, from measured images/s per crop side:
    its epochs at each side (``data.res_schedule``) over ImageNet's 1,281,167 training images.
    Validation and start-up are left out; N GPUs at the same rate each take 1/N of it."""
    from pipeline.config import load_config

    hours = {}
    for epochs in RECIPE_EPOCHS:
        data = load_config(str(REPO / FAST_CONFIG.format(epochs=epochs)), []).data
        seconds = sum(IMAGENET_TRAIN_IMAGES / img_per_s[data.train_crop(e)] for e in range(epochs))
        hours[f"rn50_{epochs}ep"] = seconds / 3600
    return hours


def fast_recipe(root: str, runs: str, *, name: str, gpu: bool, batch: int, crops: tuple[int, int],
                threads: int, amp: str, model: str = "resnet50_v1_5") -> dict[str, Any]:  # fmt: skip
    """The 16-epoch fast recipe's pieces through the training loop: 4 epochs, the crop growing from
    ``crops[0]`` to ``crops[1]`` after epoch 1 (``data.res_schedule``), the EMA of the weights scored
    beside them every epoch, centre evaluation with its flip at the recipe's test crop. Checks that
    each epoch trained at its side and the EMA was scored; images/s at each side from the epoch
    after the first at it (the first pays start-up and, on a GPU, cuDNN's tuning for the new shape)."""
    from pipeline.train.loop import train_worker

    small, large = crops
    overrides = _one_process_run(name, root, runs, gpu) + [
        f"data.decoder={'mixed' if gpu else 'cpu'}", f"data.num_threads={threads}",
        f"data.crop_size={small}", f"data.res_schedule.end_res={large}", "data.res_schedule.start_ramp=1",
        "data.res_schedule.end_ramp=2", f"data.res_schedule.step={large - small}",
        f"data.val_resize={round(large * 293 / 192)}", f"data.val_crop={round(large * 256 / 192)}",
        f"model.name={model}", f"model.v1_5={'true' if model.startswith('resnet50') else 'null'}",
        f"optim.batch_size={batch}", "optim.ema_decay=0.9", "schedule.epochs=4", "schedule.warmup_epochs=1",
        "eval.every_n_epochs=1", f"precision.amp={amp}", "precision.channels_last=true",
    ]  # fmt: skip
    summary = train_worker(_config(str(REPO / FAST_CONFIG.format(epochs=16)), overrides))
    rows = _metrics(summary["run_dir"])
    sides = [r.get("train/crop_px") for r in rows]
    if sides != [small, small, large, large]:
        raise CheckFailed(f"{name}: epochs trained at {sides} px, expected {[small, small, large, large]}")
    if any("val/ema_top1_err" not in r for r in rows) or "ema_val_top1_err" not in summary:
        raise CheckFailed(f"{name}: the EMA was not scored every epoch (summary: {summary})")
    img_per_s = {small: rows[1]["img_per_s"], large: rows[3]["img_per_s"]}
    return {
        "model": model,
        "global_batch": batch,
        "crop_per_epoch": sides,
        "img_per_s": img_per_s,
        "first_epoch_at_new_side_img_per_s": rows[2]["img_per_s"],
        "val_top1_err": [r["val/top1_err"] for r in rows],
        "val_ema_top1_err": [r["val/ema_top1_err"] for r in rows],
        "final_center_flip_top1_err": summary["val_top1_err"],
        "final_ema_top1_err": summary["ema_val_top1_err"],
        "test_crop": round(large * 256 / 192),
    }
