"""Where a step's time goes, measured without making the step wait for the device.

    clock = StepClock.for_run(run)                 # one per worker process, kept for the run
    clock.start()                                  # an epoch's steps begin
    images, labels = clock.next_batch(batches)     # time blocked in the loader's next()
    clock.step_begins(); train_step(...); clock.step_ends(labels.shape[0], images.shape[-1])
    with clock.blocked(): save_checkpoint(...)     # training blocked by a save or a report
    clock.stop()                                   # the epoch's steps are done (validation is not timed)
    clock.read("interval")  /  clock.read("epoch")  /  clock.read("run")   # perf/* figures

A window (``interval``: since the previous logged step row; ``epoch``: since the previous epoch
record; ``run``: since this worker started) holds the training time in it and its parts: the data
wait, the steps' own work and the blocked saves. Validation pauses the clock, so an epoch-end save
(made after its epoch's record is written) falls in the next epoch's window and in the run's.

On a GPU the step's work is timed by CUDA events recorded around it and read only in ``read``,
which the loop calls when it already waits for the device to log; on a CPU by the wall clock.
The data wait and the windows' wall time are host clocks on both.

MFU (model FLOPs utilisation) counts the model's multiply-adds x 2 FLOPs x 3 (forward and
backward) per image at the training crop, over the device's dense peak for the precision in use
(``PEAK_TFLOPS``); it is absent on CPUs and on GPUs the table does not name.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pipeline.train.setup import Run

WINDOWS = ("interval", "epoch", "run")
FLOPS_PER_MAC = 2
FORWARD_AND_BACKWARD = 3  # the backward pass costs about twice the forward
# Dense peak TFLOP/s from NVIDIA's data sheets (no 2:4 sparsity), by a part of the name
# torch.cuda.get_device_name reports; the more specific names first ("H100 PCIe" before "H100").
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0}),
)


def peak_precision(amp: str) -> str:
    """The precision whose peak bounds a step: the autocast dtype, else TF32 (cuDNN runs fp32
    convolutions in TF32 by default, and convolutions are nearly all of a ResNet's FLOPs)."""
    return amp if amp in ("bf16", "fp16") else "tf32"


def peak_flops(device_name: str, precision: str) -> float | None:
    """The device's dense peak FLOP/s in ``precision``, or None when the table does not know it.

    Args:
        device_name: what ``torch.cuda.get_device_name`` says, e.g. "NVIDIA H100 80GB HBM3".
        precision: "bf16", "fp16" or "tf32".
    """
    for part, peaks in PEAK_TFLOPS:
        if part in device_name:
            tflops = peaks.get(precision)
            return None if tflops is None else tflops * 1e12
    return None


def model_flops_utilisation(macs_per_image: int, images_per_s: float, peak: float) -> float:
    """The fraction of the peak that the model's own arithmetic uses at this throughput."""
    return macs_per_image * FLOPS_PER_MAC * FORWARD_AND_BACKWARD * images_per_s / peak


@dataclass
class Window:
    """The training time of one window and its parts, in seconds (host clocks unless noted)."""

    wall_s: float = 0.0  # training time: the steps, and the saves that blocked them
    data_wait_s: float = 0.0  # blocked in the loader's next()
    compute_s: float = 0.0  # the steps' own work (on a GPU, its CUDA events' time)
    checkpoint_block_s: float = 0.0  # blocked by a checkpoint save or a report
    steps: int = 0
    images: int = 0  # this worker's images
    macs: float = 0.0  # their forward passes' multiply-adds (known where MFU is)


@dataclass
class StepClock:
    """One worker's step timings in three windows (``WINDOWS``); see the module's docstring.

    Args:
        device: the worker's device; CUDA events time the steps there, else the wall clock.
        macs_at: the model's multiply-adds per training image at a crop side (for MFU), or None.
        peak: the device's peak FLOP/s in the precision in use (for MFU), or None.
    """

    device: torch.device
    macs_at: Callable[[int], int] | None = None
    peak: float | None = None
    windows: dict[str, Window] = field(default_factory=lambda: {name: Window() for name in WINDOWS})
    _running_since: float | None = None
    _step_began: Any = None  # a host time, or a CUDA event
    _pending: list[tuple[Any, Any]] = field(default_factory=list)  # (start, end) events not yet read

    @classmethod
    def for_run(cls, run: Run) -> StepClock:
        """A clock for ``run``'s device; with MFU's inputs when the device's peak is known."""
        device = run.ctx.device
        if device.type != "cuda":
            return cls(device)
        peak = peak_flops(torch.cuda.get_device_name(device), peak_precision(run.cfg.precision.amp))
        # Counted once per side: data.res_schedule changes it between epochs.
        return cls(device, functools.cache(functools.partial(training_macs, run)) if peak else None, peak)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def device_name(self) -> str:
        """The GPU's name as CUDA reports it (what the peak is looked up by); "cpu" on a CPU."""
        return torch.cuda.get_device_name(self.device) if self.on_gpu else "cpu"

    def _add(self, **parts: float) -> None:
        for window in self.windows.values():
            for name, value in parts.items():
                setattr(window, name, getattr(window, name) + value)

    def start(self) -> None:
        """Training resumes (an epoch's steps begin)."""
        self._running_since = time.perf_counter()

    def stop(self) -> None:
        """Training pauses (an epoch's steps are done); what follows is not timed until ``start``."""
        self._fold_running()
        self._running_since = None

    def _fold_running(self) -> None:
        # The windows' wall time up to now, so that a window read mid-epoch ends here.
        if self._running_since is not None:
            now = time.perf_counter()
            self._add(wall_s=now - self._running_since)
            self._running_since = now

    def next_batch(self, batches: Iterator[Any]) -> Any:
        """``next(batches)``, its wait counted as data wait."""
        began = time.perf_counter()
        batch = next(batches)
        self._add(data_wait_s=time.perf_counter() - began)
        return batch

    def step_begins(self) -> None:
        if self.on_gpu:
            self._step_began = torch.cuda.Event(enable_timing=True)
            self._step_began.record()
        else:
            self._step_began = time.perf_counter()

    def step_ends(self, images: int, side: int) -> None:
        """The step's work is queued (GPU) or done (CPU); ``images``: this worker's batch of
        ``side`` x ``side`` crops."""
        if self.on_gpu:
            ended = torch.cuda.Event(enable_timing=True)
            ended.record()
            self._pending.append((self._step_began, ended))  # read in ``read``: no wait here
        else:
            self._add(compute_s=time.perf_counter() - self._step_began)
        self._add(steps=1, images=images, macs=images * self.macs_at(side) if self.macs_at else 0.0)

    @contextlib.contextmanager
    def blocked(self) -> Iterator[None]:
        """Time training is blocked by what runs inside (a checkpoint save, a report)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - began
            self._add(checkpoint_block_s=spent)
            if self._running_since is None:  # outside the steps: the time is added to the windows'
                self._add(wall_s=spent)

    def _read_events(self) -> None:
        if not self._pending:
            return
        self._pending[-1][1].synchronize()  # done already: the loop has just read the loss
        self._add(compute_s=sum(start.elapsed_time(end) for start, end in self._pending) / 1000.0)
        self._pending.clear()

    def read(self, name: str) -> dict[str, float]:
        """The ``perf/*`` figures of window ``name`` (one of ``WINDOWS``); starts it afresh unless
        it is ``run``. Call it only where the loop already waits for the device."""
        self._read_events()
        self._fold_running()
        window = self.windows[name]
        if name != "run":
            self.windows[name] = Window()
        return self.figures(window)

    def figures(self, window: Window) -> dict[str, float]:
        """A window's ``perf/*`` metrics: MFU with a known peak, peak memory on GPUs."""
        wall = max(window.wall_s, 1e-9)
        per_worker = window.images / wall
        out = {
            "perf/step_s": window.wall_s / max(window.steps, 1),
            "perf/data_wait_s": window.data_wait_s,
            "perf/compute_s": window.compute_s,
            "perf/checkpoint_block_s": window.checkpoint_block_s,
            "perf/data_stall_pct": min(100.0, 100.0 * window.data_wait_s / wall),
            "perf/checkpoint_stall_pct": min(100.0, 100.0 * window.checkpoint_block_s / wall),
            "perf/img_per_s_per_worker": per_worker,
        }
        if self.macs_at and self.peak and window.images:
            out["perf/mfu"] = model_flops_utilisation(window.macs / window.images, per_worker, self.peak)
        if self.on_gpu:  # the allocator's own count: no wait for the device
            out["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out


def training_macs(run: Run, side: int) -> int:
    """Multiply-adds of one forward pass of a ``side`` x ``side`` crop, counted on the ``meta``
    device: no memory, no arithmetic."""
    from pipeline.models import build_model, count_macs

    with torch.device("meta"):
        model = build_model(run.cfg.model)
    return count_macs(model, side)


def describe_time(summary: dict[str, Any]) -> str:
    """The summary's line on where the time went, e.g. "data stall 3.1 %, checkpoint stall 0.4 %,
    MFU n/a on CPU", from the run's ``summary.json`` (``data_stall_pct``, ...)."""
    parts = []
    for label, key in (("data stall", "data_stall_pct"), ("checkpoint stall", "checkpoint_stall_pct")):
        value = summary.get(key)
        parts.append(f"{label} {value:.1f} %" if value is not None else f"{label} -")
    device, mfu = summary.get("device_name"), summary.get("mfu")
    if mfu is not None:
        parts.append(f"MFU {100 * mfu:.1f} % ({device})")
    elif device in (None, "cpu"):
        parts.append("MFU n/a on CPU")
    else:
        parts.append(f"MFU n/a (no peak known for {device})")
    return ", ".join(parts)
