"""The parts of ``make gpu-check``: what each one runs, and what they share.

Each part is a function of the shared ``Context`` that returns its details for the JSON report,
raises ``CheckFailed`` when a check fails, or ``Skip`` when it has nothing to do on this machine.
``PARTS`` lists them in the order ``pipeline.gpu.check`` runs them; the parts' own work lives in
``dali_check``, ``train_check`` and ``images``.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.gpu import dali_check, train_check
from pipeline.gpu.dali_check import CheckFailed, Tolerance
from pipeline.gpu.images import write_real_sized
from pipeline.host import usable_cpus

SMOKE_NOTE = "CPU smoke run of the GPU figures' code with tiny sizes: proves the code path, is no GPU figure"


class Skip(Exception):
    """A part that has nothing to do on this machine; the message says why."""


@dataclass
class Context:
    """What the parts share: options, the device, the dataset once written, a scratch folder."""

    args: argparse.Namespace
    gpu: bool
    work: Path
    tol: Tolerance
    dataset: dict[str, Any] | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    cpu_smoke: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0) if self.gpu else torch.device("cpu")

    @property
    def threads(self) -> int:
        return self.args.threads or usable_cpus()

    def root(self) -> str:
        if self.dataset is None:
            raise CheckFailed("no dataset: the 'images' part did not run or failed")
        return self.dataset["root"]

    def runs(self, name: str) -> str:
        folder = self.work / "runs"
        shutil.rmtree(folder / name, ignore_errors=True)  # a fresh run, never a resumed one
        return str(folder)


@dataclass(frozen=True)
class Part:
    """One part of the check: its name, whether it needs a GPU, a line on what it does, and its run."""

    name: str
    needs_gpu: bool
    what: str
    run: Callable[[Context], dict[str, Any]]


# ---------------------------------------------------------------- the parts


def _images(ctx: Context) -> dict[str, Any]:
    a = ctx.args
    train, val = (
        (a.gpu_train_per_class, a.gpu_val_per_class) if ctx.gpu else (a.train_per_class, a.val_per_class)
    )
    info = write_real_sized(a.data, classes=a.classes, train_per_class=train, val_per_class=val)
    kb = info["mean_bytes"] / 1000
    if not 60 <= kb <= 200:
        raise CheckFailed(f"the generated JPEGs average {kb:.0f} KB, not ImageNet's ~110 KB")
    ctx.dataset = info
    return info


def _dali_cpu(ctx: Context) -> dict[str, Any]:
    return dali_check.cpu_pipelines(ctx.root(), ctx.threads, ctx.tol)


def _dali_mixed(ctx: Context) -> dict[str, Any]:
    return dali_check.mixed_vs_cpu(ctx.root(), 0, ctx.threads, ctx.tol)


def _train_cpu(ctx: Context) -> dict[str, Any]:
    return train_check.train_demo(
        ctx.root(), ctx.runs("gpu-check-train-cpu"), name="gpu-check-train-cpu", gpu=False,
        amp=ctx.args.cpu_amp, channels_last=True, compile=False, epochs=ctx.args.cpu_epochs,
        batch=ctx.args.cpu_batch, threads=ctx.threads,
    )  # fmt: skip


def _train_gpu(ctx: Context, compile: bool) -> dict[str, Any]:
    name = "gpu-check-train-gpu" + ("-compile" if compile else "")
    return train_check.train_demo(
        ctx.root(), ctx.runs(name), name=name, gpu=True, amp="bf16", channels_last=True, compile=compile,
        epochs=ctx.args.gpu_epochs, batch=64, threads=ctx.threads,
    )  # fmt: skip


def _ddp(ctx: Context, backend: str) -> dict[str, Any]:
    return train_check.ddp_bf16_step(backend, ctx.device if backend == "nccl" else torch.device("cpu"))


def _model_throughput(ctx: Context) -> dict[str, Any]:
    a = ctx.args
    rows = train_check.model_throughput(
        ctx.device, batch=a.batch, input_size=224, steps=a.steps, warmup=a.warmup,
        variants=["bf16-cl", "bf16-cl-compile"], eval_images=max(1, a.batch // 10),
    )  # fmt: skip
    ctx.figures["model_only"] = {"model": "resnet50_v1_5", "batch": a.batch, "input": 224, "variants": rows}
    return {"variants": rows}


def _end_to_end(ctx: Context) -> dict[str, Any]:
    a = ctx.args
    out = train_check.end_to_end(
        ctx.root(), ctx.runs("gpu-check-e2e"), name="gpu-check-e2e", gpu=True, batch=a.batch, crop=224,
        epochs=a.e2e_epochs, threads=ctx.threads, amp="bf16", compile=False,
    )  # fmt: skip
    model_only = {
        r["variant"]: r["train_img_per_s"] for r in ctx.figures.get("model_only", {}).get("variants", [])
    }
    if "bf16-cl" in model_only:
        out["fraction_of_model_only"] = out["img_per_s"] / model_only["bf16-cl"]
    ctx.figures["end_to_end"] = out
    return out


def _tencrop(ctx: Context) -> dict[str, Any]:
    out = train_check.tencrop_eval(
        ctx.root(), ctx.device, batch=32, crop=224, threads=ctx.threads, amp="bf16"
    )
    ctx.figures["tencrop_eval"] = out
    return out


def _fast_recipe(ctx: Context) -> dict[str, Any]:
    out = train_check.fast_recipe(
        ctx.root(), ctx.runs("gpu-check-fast"), name="gpu-check-fast", gpu=True, batch=ctx.args.batch,
        crops=(160, 192), threads=ctx.threads, amp="bf16",
    )  # fmt: skip
    # An estimate from this run's images/s (synthetic JPEGs of ImageNet's size), not a measured recipe.
    out["estimated_train_hours_one_gpu"] = train_check.recipe_gpu_hours(out["img_per_s"])
    ctx.figures["fast_recipe"] = out
    return out


def _cpu_smoke(ctx: Context) -> dict[str, Any]:
    if ctx.gpu:
        raise Skip("a GPU is present: the figures themselves were measured")
    cpu = torch.device("cpu")
    out = {
        "note": SMOKE_NOTE,
        "model_only": train_check.model_throughput(
            cpu, batch=2, input_size=64, steps=2, warmup=1, variants=["fp32-cl"], eval_images=1
        ),
        "end_to_end": train_check.end_to_end(
            ctx.root(),
            ctx.runs("gpu-check-e2e-smoke"),
            name="gpu-check-e2e-smoke",
            gpu=False,
            batch=16,
            crop=32,
            epochs=2,
            threads=ctx.threads,
            amp="none",
            compile=False,
            model="resnet18",
        ),  # fmt: skip
        "tencrop_eval": train_check.tencrop_eval(
            ctx.root(), cpu, batch=4, crop=32, threads=ctx.threads, amp="none", model="resnet18"
        ),
        "fast_recipe": train_check.fast_recipe(
            ctx.root(),
            ctx.runs("gpu-check-fast-smoke"),
            name="gpu-check-fast-smoke",
            gpu=False,
            batch=16,
            crops=(32, 48),
            threads=ctx.threads,
            amp="none",
            model="resnet18",
        ),  # fmt: skip
    }
    ctx.cpu_smoke = out
    return out


PARTS: tuple[Part, ...] = (
    Part("images", False, "real-sized synthetic JPEGs in an ImageNet layout", _images),
    Part("dali_cpu", False, "every DALI mode on the CPU; centre crop vs torchvision", _dali_cpu),
    Part("dali_mixed_vs_cpu", True, "every DALI mode, mixed decode vs CPU", _dali_mixed),
    Part("train_cpu", False, "demo config, a few tiny epochs on the CPU, checkpoint read back", _train_cpu),
    Part("train_gpu", True, "demo config on the GPU, bf16 + channels_last", lambda c: _train_gpu(c, False)),
    Part("ddp_gloo", False, "DDP step, bf16 hook, one-rank gloo group (CPU)", lambda c: _ddp(c, "gloo")),
    Part("ddp_nccl", True, "DDP step, bf16 hook, one-rank NCCL group (GPU)", lambda c: _ddp(c, "nccl")),
    Part(
        "model_throughput",
        True,
        "ResNet-50 v1.5 batch 256 bf16-cl, model only, eager and compiled",
        _model_throughput,
    ),
    Part(
        "end_to_end",
        True,
        "the same end to end: DALI mixed, paper's augmentation, data-wait fraction",
        _end_to_end,
    ),
    Part("tencrop_eval", True, "10-crop evaluation images/s, DALI mixed + network", _tencrop),
    Part(
        "fast_recipe",
        True,
        "the 16-epoch fast recipe's pieces: 160 -> 192 px mid-run, EMA scored, img/s per side",
        _fast_recipe,
    ),
    Part("train_gpu_compile", True, "the same with torch.compile", lambda c: _train_gpu(c, True)),
    Part("cpu_smoke", False, "tiny CPU runs of the four figures' code (no GPU figure)", _cpu_smoke),
)
PART_NAMES = tuple(p.name for p in PARTS)
