"""``python -m pipeline bench model``: training-step and 10-crop eval images/s, ours against torchvision.

    python -m pipeline bench model --model resnet50_v1_5 --batch-size 256 --variants bf16-cl --device cuda --json
    python -m pipeline bench model --model resnet18 --batch-size 8 --steps 6 --variants fp32,fp32-cl
    python -m pipeline bench model --model cifar_resnet20 --input-size 32 --batch-size 4 --steps 2 --json

A training step is forward, cross-entropy, backward and an SGD step (momentum 0.9, weight
decay 1e-4, as the training loop runs it) on a fixed random batch already on the device, so the
figure is the network's speed with no data loading. An eval step is the paper's 10-crop test:
``eval-batch-size`` images x 10 crops forward, softmax, averaged over the crops.

Variants are ``fp32`` or ``bf16`` (autocast, as ``precision.amp=bf16``), each optionally with
``-cl`` (channels_last) and ``-compile`` (torch.compile); ``--variants all`` runs the eight.
The default leaves torch.compile out on CPU (inductor compiles C++ for minutes on two cores).

Where torchvision has the same network (``resnet18``, ``resnet34``, and ``resnet50_v1_5`` =
torchvision's ``resnet50``) both are built in this process with the same weights and inputs,
and their timed steps are interleaved (the order flipping every round), so a load spike on a
shared machine hits both; ``ratio`` is ours / torchvision's.

This path imports torch (and torchvision if present) only: it runs where Ray and DALI are not
installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from pipeline.bench.common import BenchError, cpu_model, finish_machine, machine_info, ratio
from pipeline.bench.steps import NUM_CROPS, make_eval_step, make_train_step
from pipeline.bench.timing import paired_ratio, rate, time_interleaved

HELP = "training-step and 10-crop eval images/s (fp32/bf16, channels_last, torch.compile) vs torchvision"

AMP = {"fp32": "none", "bf16": "bf16"}  # variant dtype -> precision.amp

# Our networks that are torchvision's, operation for operation. Our resnet50/101/152 are the
# paper's v1 (stride in the first 1x1) and have no torchvision twin; resnet50_v1_5 is the twin of
# torchvision's resnet50.
TORCHVISION_TWINS: dict[str, str] = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50_v1_5": "resnet50",
}


@dataclass(frozen=True)
class Variant:
    """One cell of the precision x layout x compile matrix."""

    dtype: Literal["fp32", "bf16"]
    channels_last: bool = False
    compile: bool = False

    @property
    def name(self) -> str:
        return self.dtype + ("-cl" if self.channels_last else "") + ("-compile" if self.compile else "")


# Eager first, then compiled; within each, fp32 before bf16 and contiguous before channels_last.
ALL_VARIANTS: tuple[Variant, ...] = tuple(
    Variant(dtype, channels_last, compiled)
    for compiled in (False, True)
    for dtype in ("fp32", "bf16")
    for channels_last in (False, True)
)
DEFAULT_VARIANTS = {
    "cpu": "fp32,fp32-cl,bf16,bf16-cl",
    "cuda": ",".join(v.name for v in ALL_VARIANTS),
}


def parse_variants(spec: str | None, device_type: str) -> list[Variant]:
    """The variants a ``--variants`` value names, in its order, without duplicates.

    Args:
        spec: comma-separated names (``fp32``, ``bf16-cl``, ``fp32-cl-compile`` ...), ``all``, or
            None/empty for this device's default.
        device_type: "cpu" or "cuda"; picks the default.
    """
    spec = spec or DEFAULT_VARIANTS.get(device_type, DEFAULT_VARIANTS["cpu"])
    if spec.strip() == "all":
        return list(ALL_VARIANTS)
    by_name = {v.name: v for v in ALL_VARIANTS}
    chosen: list[Variant] = []
    for item in (s.strip() for s in spec.split(",")):
        if item not in by_name:
            raise BenchError(
                f"unknown variant {item!r}; choose from {', '.join(by_name)} (comma-separated) or 'all'"
            )
        if by_name[item] not in chosen:
            chosen.append(by_name[item])
    return chosen


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error.

    Args:
        name: "auto", "cpu" or "cuda" (or "cuda:N").
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is visible to torch; use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {name!r}: choose auto, cpu or cuda")
    return device


def build_reference(name: str, num_classes: int) -> tuple[nn.Module | None, str | None, str | None]:
    """torchvision's twin of a registered model: (module, its name, why there is none).

    Args:
        name: a registered model name.
        num_classes: outputs of the twin's fc layer (the same as ours).
    """
    twin = TORCHVISION_TWINS.get(name)
    if twin is None:
        return None, None, f"torchvision has no network identical to {name}"
    try:
        import torchvision
    except ImportError:
        return None, None, "torchvision is not installed"
    return getattr(torchvision.models, twin)(num_classes=num_classes), f"torchvision.models.{twin}", None


def _prepare(model: nn.Module, device: torch.device, variant: Variant) -> nn.Module:
    model = model.to(device)
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if variant.compile else model


def bench_variant(
    variant: Variant,
    *,
    model_name: str,
    device: torch.device,
    batch_size: int,
    eval_images: int,
    input_size: int,
    warmup: int,
    steps: int,
    block: int,
    reference: bool,
) -> dict[str, Any]:
    """Train-step and 10-crop eval images/s of our model (and torchvision's twin) in one variant.

    Args:
        variant: precision, layout, compile.
        model_name: a registered model name.
        device: where to run.
        batch_size: training images per step.
        eval_images: images per eval step (x10 crops); 0 skips the eval phase.
        input_size: side of the square input (the crop size for eval).
        warmup: untimed steps per model and phase.
        steps: timed steps per model and phase.
        block: steps per timed block (see ``time_interleaved``).
        reference: also time torchvision's twin when there is one.

    Returns:
        The variant's row: rates, ratios, the raw block times and first-step times, or ``error``.
    """
    from pipeline.models import create_model, from_torchvision_state_dict, model_spec

    num_classes = model_spec(model_name).num_classes
    row: dict[str, Any] = {"variant": variant.name, **dataclasses.asdict(variant), "error": None}
    models: dict[str, nn.Module] = {"ours": create_model(model_name)}
    if reference:
        twin, _, _ = build_reference(model_name, num_classes)
        if twin is not None:
            # The same weights on both sides, so both compute the same numbers: differently drawn
            # random weights can drift into denormals on one side only, which CPUs run far slower.
            models["ours"].load_state_dict(from_torchvision_state_dict(twin.state_dict()))
            models["torchvision"] = twin
    try:
        models = {k: _prepare(m, device, variant) for k, m in models.items()}
        for m in models.values():
            m.train()
        train = time_interleaved(
            {
                k: make_train_step(
                    m, device, variant.channels_last, AMP[variant.dtype], batch_size, input_size, num_classes
                )
                for k, m in models.items()
            },
            warmup=warmup,
            timed=steps,
            block=block,
            device=device,
        )
        row["train_img_per_s"] = rate(train["ours"], batch_size)
        row["torchvision_train_img_per_s"] = (
            rate(train["torchvision"], batch_size) if "torchvision" in train else None
        )
        row["ratio"] = ratio(row["train_img_per_s"], row["torchvision_train_img_per_s"])
        row["ratio_paired"] = (
            paired_ratio(train["ours"], train["torchvision"]) if "torchvision" in train else None
        )
        row["train_timing"] = train
        if eval_images > 0:
            for m in models.values():
                m.eval()
            evals = time_interleaved(
                {
                    k: make_eval_step(
                        m, device, variant.channels_last, AMP[variant.dtype], eval_images, input_size
                    )
                    for k, m in models.items()
                },
                warmup=warmup,
                timed=steps,
                block=block,
                device=device,
            )
            row["eval_img_per_s"] = rate(evals["ours"], eval_images)
            row["torchvision_eval_img_per_s"] = (
                rate(evals["torchvision"], eval_images) if "torchvision" in evals else None
            )
            row["eval_ratio"] = ratio(row["eval_img_per_s"], row["torchvision_eval_img_per_s"])
            row["eval_ratio_paired"] = (
                paired_ratio(evals["ours"], evals["torchvision"]) if "torchvision" in evals else None
            )
            row["eval_timing"] = evals
    except Exception as e:  # one variant failing (compile, OOM) must not lose the others
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
    finally:
        del models
        if variant.compile:
            torch._dynamo.reset()  # compiled graphs of one variant would count against the next's cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench model`` options.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument(
        "--model", default="resnet50_v1_5", help="a registered model (python -m pipeline models)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="training images per step")
    parser.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help="images per 10-crop eval step, each 10 crops (default: batch-size / 10, at least 1; 0: skip eval)",
    )
    parser.add_argument(
        "--input-size", type=int, default=None, help="input side (default: the model's, 224 or 32)"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model, variant and phase")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile, cuDNN autotune)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated: fp32, fp32-cl, bf16, bf16-cl and each with -compile, or all "
        f"(default: {DEFAULT_VARIANTS['cpu']} on CPU, all on CUDA)",
    )
    parser.add_argument(
        "--block",
        type=int,
        default=0,
        help="timed steps per interleaved block (0: 1 on CPU, where shared cores make load the largest "
        "error; all of them on CUDA, where a sync per step would idle the GPU)",
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch's default)")
    parser.add_argument("--no-reference", action="store_true", help="do not time torchvision's twin")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark the parsed arguments describe and return its JSON-able result.

    Args:
        args: parsed ``bench model`` arguments.
    """
    from pipeline.models import model_spec

    try:
        spec = model_spec(args.model)
    except ValueError as e:
        raise BenchError(str(e)) from None
    for flag in ("batch_size", "steps"):
        if getattr(args, flag) < 1:
            raise BenchError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise BenchError(f"--warmup must be at least 0, got {args.warmup}")
    device = resolve_device(args.device)
    variants = parse_variants(args.variants, device.type)
    input_size = args.input_size or spec.input_size
    eval_images = (
        max(1, args.batch_size // NUM_CROPS) if args.eval_batch_size is None else args.eval_batch_size
    )
    block = args.block or (1 if device.type == "cpu" else args.steps)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # pick the fastest conv algorithms for these fixed shapes
    _, ref_name, ref_note = (
        build_reference(args.model, spec.num_classes)
        if not args.no_reference
        else (None, None, "--no-reference")
    )
    try:
        import torchvision

        tv_version: str | None = torchvision.__version__
    except ImportError:
        tv_version = None
    machine = machine_info()
    start = time.perf_counter()
    rows = [
        bench_variant(
            v,
            model_name=args.model,
            device=device,
            batch_size=args.batch_size,
            eval_images=eval_images,
            input_size=input_size,
            warmup=args.warmup,
            steps=args.steps,
            block=block,
            reference=ref_name is not None,
        )
        for v in variants
    ]
    return {
        "bench": "model",
        "model": args.model,
        "reference": ref_name,
        "reference_note": ref_note,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "batch_size": args.batch_size,
        "eval_batch_size": eval_images,
        "eval_crops": NUM_CROPS,
        "input_size": input_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "block": block,
        "threads": torch.get_num_threads(),
        "cudnn_benchmark": device.type == "cuda",
        "torch": torch.__version__,
        "torchvision": tv_version,
        "wall_s": time.perf_counter() - start,
        "variants": rows,
        "machine": finish_machine(machine),
    }


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def format_text(result: dict[str, Any]) -> str:
    """A few aligned lines for a terminal.

    Args:
        result: what ``run`` returned.
    """
    lines = [
        f"{result['model']} vs {result['reference'] or 'no reference'} on {result['device']} "
        f"({result['device_name']}), batch {result['batch_size']}, input {result['input_size']}, "
        f"{result['threads']} threads, load {result['machine']['load_avg_start']} -> {result['machine']['load_avg_end']}",
        f"{'variant':<18}{'train img/s':>12}{'tv img/s':>10}{'ratio':>7}{'10-crop img/s':>15}{'tv':>8}{'ratio':>7}",
    ]
    for r in result["variants"]:
        if r["error"]:
            lines.append(f"{r['variant']:<18}error: {r['error']}")
            continue
        lines.append(
            f"{r['variant']:<18}{_fmt(r['train_img_per_s']):>12}{_fmt(r['torchvision_train_img_per_s']):>10}"
            f"{_fmt(r['ratio'], 3):>7}{_fmt(r.get('eval_img_per_s')):>15}{_fmt(r.get('torchvision_eval_img_per_s')):>8}"
            f"{_fmt(r.get('eval_ratio'), 3):>7}"
        )
    return "\n".join(lines)
