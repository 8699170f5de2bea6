"""``make gpu-check``: the GPU path proven in one command, with one JSON of every check and figure.

    python -m pipeline.gpu.check                          # everything this machine can run
    python -m pipeline.gpu.check --out $OUT/gpu-check.json --only dali_mixed_vs_cpu,ddp_nccl
    python -m pipeline.gpu.check --list                   # the parts, and which need a GPU

Parts (in this order; ``--only`` / ``--skip`` pick some):

- ``images``: real-sized synthetic JPEGs (about 500x375, 110 KB) in an ImageNet layout;
- ``dali_cpu``: every DALI mode on the CPU, and the centre crop against torchvision's;
- ``dali_mixed_vs_cpu`` (GPU): every mode with ``mixed`` decode against the CPU pipeline;
- ``train_cpu``: the demo config trained a few tiny epochs on the CPU (loss falls, validation,
  checkpoint written and read back); ``train_gpu`` / ``train_gpu_compile`` (GPU): the same in
  bf16 + channels_last, then with ``torch.compile``;
- ``ddp_gloo`` / ``ddp_nccl`` (GPU): a DDP step with the bf16 compression hook over a one-rank group;
- ``model_throughput`` (GPU), ``end_to_end`` (GPU), ``tencrop_eval`` (GPU): ResNet-50 v1.5 at
  batch 256 in bf16 + channels_last, model only (eager and compiled), end to end with DALI
  ``mixed`` decode and the paper's augmentation (with the data-wait fraction), 10-crop
  evaluation; ``cpu_smoke``: tiny versions of these three on the CPU, to prove the code runs
  (its numbers are labelled CPU smoke and are no GPU figure).

The parts themselves are in ``pipeline.gpu.check_parts``; this module picks them, runs them in
order and writes the report.

Exit code: 0 every part ran and passed; 1 a check failed; 2 bad arguments; 3 no GPU: the parts
that need none passed and the GPU parts were skipped (the JSON lists them). The JSON is
rewritten after every part, so a run stopped by a time limit still leaves what it did.
Imports torch, torchvision, DALI, NumPy, Pillow and PyYAML only (no Ray, no W&B).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pipeline.gpu.check_parts import PART_NAMES, PARTS, Context, Part, Skip
from pipeline.gpu.dali_check import CheckFailed, Tolerance
from pipeline.host import usable_cpus

EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_NO_GPU = 0, 1, 2, 3


# ---------------------------------------------------------------- environment and report


def _nvidia_smi() -> dict[str, Any]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"nvidia_smi": None}
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        return {"nvidia_smi": f"failed: {e}"}
    return {"nvidia_smi": out.splitlines()}


def environment() -> dict[str, Any]:
    """Versions, device and driver: what the figures were measured with."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": usable_cpus(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError as e:
        env["torchvision"] = f"missing: {e}"
    try:
        import nvidia.dali

        env["dali"] = nvidia.dali.__version__
        env["dali_path"] = str(Path(nvidia.dali.__file__).parent)
    except Exception as e:  # a missing library surfaces as OSError or ImportError
        env["dali"] = f"cannot import: {type(e).__name__}: {e}"
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["capability"] = list(torch.cuda.get_device_capability(0))
        env["gpus"] = torch.cuda.device_count()
        env["cudnn"] = torch.backends.cudnn.version()
        try:
            version = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception as e:  # NCCL missing from this build: the ddp_nccl part says so too
            env["nccl"] = f"unknown: {e}"
    env.update(_nvidia_smi())
    return env


def default_out() -> str:
    """``$OUT/gpu-check.json`` where ``OUT`` is set (the GPU machine's returned folder), else bench-results/."""
    out = os.environ.get("OUT")
    return str(Path(out) / "gpu-check.json") if out else "bench-results/gpu-check.json"


def write_json(path: str, report: dict[str, Any]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(target)  # never a half-written report under the real name


def exit_code(parts: list[dict[str, Any]]) -> int:
    if any(p["status"] == "fail" for p in parts):
        return EXIT_FAIL
    if any(
        p["status"] == "skipped" and p.get("needs_gpu") and p["reason"].startswith("no GPU") for p in parts
    ):
        return EXIT_NO_GPU
    return EXIT_PASS


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.gpu.check", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out",
        default=None,
        help="the JSON report (default: $OUT/gpu-check.json, else bench-results/gpu-check.json)",
    )
    p.add_argument(
        "--data",
        default="data/gpu-check",
        help="folder for the generated JPEGs (reused when it holds the same set)",
    )
    p.add_argument(
        "--work", default=None, help="scratch folder for the runs (default: a temporary one, removed)"
    )
    p.add_argument(
        "--only",
        default="",
        help=f"comma-separated parts to run ({', '.join(PART_NAMES)}); 'images' is added when needed",
    )
    p.add_argument("--skip", default="", help="comma-separated parts not to run")
    p.add_argument("--list", action="store_true", help="list the parts and exit")
    p.add_argument(
        "--tol-mean", type=float, default=Tolerance.mean, help="mean |diff| bound, 0-255 units (test modes)"
    )
    p.add_argument(
        "--tol-p99", type=float, default=Tolerance.p99, help="99th-percentile |diff| bound, 0-255 units"
    )
    p.add_argument(
        "--tol-stats", type=float, default=Tolerance.stats, help="per-channel mean/std bound, training modes"
    )
    p.add_argument("--classes", type=int, default=10, help="classes of the generated set")
    p.add_argument("--train-per-class", type=int, default=8, help="training images per class without a GPU")
    p.add_argument("--val-per-class", type=int, default=2, help="validation images per class without a GPU")
    p.add_argument(
        "--gpu-train-per-class", type=int, default=256, help="training images per class with a GPU"
    )
    p.add_argument("--gpu-val-per-class", type=int, default=52, help="validation images per class with a GPU")
    p.add_argument("--cpu-epochs", type=int, default=2, help="epochs of train_cpu")
    p.add_argument("--cpu-batch", type=int, default=16, help="global batch of train_cpu")
    p.add_argument(
        "--cpu-amp",
        default="none",
        choices=("none", "bf16"),
        help="train_cpu precision (bf16 is emulated on most CPUs: ~10x slower)",
    )
    p.add_argument("--gpu-epochs", type=int, default=4, help="epochs of train_gpu and train_gpu_compile")
    p.add_argument("--batch", type=int, default=256, help="ResNet-50 batch of the GPU figures")
    p.add_argument("--steps", type=int, default=30, help="timed steps of model_throughput")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (compile, cuDNN autotuning)")
    p.add_argument("--e2e-epochs", type=int, default=3, help="epochs of end_to_end (the first is left out)")
    p.add_argument("--threads", type=int, default=0, help="DALI threads (0: every usable CPU)")
    p.add_argument("--no-gpu", action="store_true", help="behave as on a machine without a GPU")
    args = p.parse_args(argv)
    for name in ("only", "skip"):
        chosen = [s.strip() for s in getattr(args, name).split(",") if s.strip()]
        unknown = [s for s in chosen if s not in PART_NAMES]
        if unknown:
            p.error(f"--{name}: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PART_NAMES)}")
        setattr(args, name, chosen)
    for name in ("tol_mean", "tol_p99", "tol_stats"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}")
    positive = ("classes", "train_per_class", "val_per_class", "gpu_train_per_class", "gpu_val_per_class",
                "cpu_epochs", "cpu_batch", "gpu_epochs", "batch", "steps", "e2e_epochs")  # fmt: skip
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.classes * args.train_per_class < args.cpu_batch:
        p.error(
            f"--classes x --train-per-class ({args.classes * args.train_per_class}) is below --cpu-batch ({args.cpu_batch})"
        )
    if args.classes > 10:
        p.error(f"--classes {args.classes}: the demo config's network has 10 outputs; use at most 10")
    args.out = args.out or default_out()
    return args


def selected(args: argparse.Namespace, gpu: bool) -> list[Part]:
    """The parts to run, in order: ``images`` first; with a GPU, the GPU parts before the CPU ones
    (a run stopped by its time limit has then done what only that machine can do)."""
    names = set(args.only or PART_NAMES) - set(args.skip)
    if names - {"images"} and "images" not in args.skip:
        names.add("images")  # every other part reads the generated files
    chosen = [p for p in PARTS if p.name in names]
    return sorted(chosen, key=lambda p: (p.name != "images", gpu and not p.needs_gpu))


def run(args: argparse.Namespace) -> int:
    gpu = torch.cuda.is_available() and not args.no_gpu
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ctx = Context(args, gpu, work, Tolerance(args.tol_mean, args.tol_p99, args.tol_stats))
    started = time.perf_counter()
    report: dict[str, Any] = {
        "check": "gpu-check",
        "command": " ".join([Path(sys.executable).name, "-m", "pipeline.gpu.check", *sys.argv[1:]]),
        "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "gpu": gpu,
        "environment": environment(),
        "tolerance": asdict(ctx.tol),
        "parts": [],
    }
    print(
        f"gpu-check: {'GPU ' + report['environment'].get('device', '') if gpu else 'no GPU'}; report: {args.out}",
        flush=True,
    )
    try:
        for part in selected(args, gpu):
            entry: dict[str, Any] = {"name": part.name, "needs_gpu": part.needs_gpu, "what": part.what}
            if part.needs_gpu and not gpu:
                entry.update(
                    status="skipped",
                    reason="no GPU: torch sees no CUDA device" + (" (--no-gpu)" if args.no_gpu else ""),
                )
            else:
                print(f"== {part.name}: {part.what}", flush=True)
                t0 = time.perf_counter()
                try:
                    entry.update(status="pass", details=part.run(ctx))
                except Skip as e:
                    entry.update(status="skipped", reason=str(e))
                except CheckFailed as e:
                    entry.update(status="fail", reason=str(e))
                except Exception as e:  # a crash is a failed check too, with its traceback in the report
                    entry.update(
                        status="fail",
                        reason=f"{type(e).__name__}: {e}",
                        traceback=traceback.format_exc()[-4000:],
                    )
                entry["seconds"] = round(time.perf_counter() - t0, 2)
            print(
                f"   {part.name}: {entry['status']}"
                + (f" ({entry['reason']})" if entry.get("reason") else ""),
                flush=True,
            )
            report["parts"].append(entry)
            _summarize(report, ctx, started)
            write_json(args.out, report)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    code = report["exit_code"]
    print(f"gpu-check: {report['status']} (exit {code}); passed {report['passed']}; failed {report['failed']}; "
          f"skipped {report['skipped']}; report {args.out}", flush=True)  # fmt: skip
    return code


def _summarize(report: dict[str, Any], ctx: Context, started: float) -> None:
    parts = report["parts"]
    report["passed"] = [p["name"] for p in parts if p["status"] == "pass"]
    report["failed"] = [p["name"] for p in parts if p["status"] == "fail"]
    report["skipped"] = [p["name"] for p in parts if p["status"] == "skipped"]
    report["figures"] = ctx.figures  # GPU figures only
    if ctx.cpu_smoke:
        report["cpu_smoke"] = ctx.cpu_smoke
    report["exit_code"] = exit_code(parts)
    report["status"] = {EXIT_PASS: "pass", EXIT_FAIL: "fail", EXIT_NO_GPU: "no-gpu"}[report["exit_code"]]
    report["wall_s"] = round(time.perf_counter() - started, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for p in PARTS:
            print(f"{p.name:<20}{'GPU' if p.needs_gpu else 'CPU':<5}{p.what}")
        return EXIT_PASS
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
