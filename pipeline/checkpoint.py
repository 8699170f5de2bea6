"""The full training state, to and from a checkpoint directory (``state.pt`` inside).

Everything a resumed run needs to carry on as if never stopped: the model (unwrapped from
DDP), optimizer, schedule state (plateau counters), grad scaler, epoch, global step, best
validation error, RNG states, the W&B run id and the resolved config. Loaded with
``torch.load(weights_only=True)``, so only tensors and plain Python containers go in.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from pipeline.schedule import ScheduleState

STATE_FILE = "state.pt"
FORMAT_VERSION = 2  # 2 added epoch_sums (mid-epoch checkpoints); version 1 files still load
REQUIRED_KEYS = frozenset(
    {
        "format_version",
        "model",
        "optimizer",
        "scaler",
        "schedule",
        "epoch",
        "step",
        "best_val_top1_err",
        "rng",
        "wandb_run_id",
        "config",
    }
)
OPTIONAL_KEYS = frozenset({"epoch_sums"})


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with a message naming the file and the problem."""


@dataclasses.dataclass(frozen=True)
class TrainingProgress:
    """Where the run is: restored from, and written into, every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    best_val_top1_err: float = float("inf")
    schedule: ScheduleState = ScheduleState()
    wandb_run_id: str | None = None
    # Mid-epoch only: (loss x n, top-1 hits, top-5 hits, n) of the epoch so far, summed over ranks,
    # so a resumed epoch reports the same training metrics as an uninterrupted one.
    epoch_sums: tuple[float, ...] = ()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    directory: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    progress: TrainingProgress,
    config: dict[str, Any],
) -> Path:
    """Write ``state.pt`` into ``directory`` (created) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
        "schedule": dataclasses.asdict(progress.schedule),
        "epoch": progress.epoch,
        "step": progress.step,
        "best_val_top1_err": progress.best_val_top1_err,
        "rng": rng_state(),
        "wandb_run_id": progress.wandb_run_id,
        "config": config,
        "epoch_sums": list(progress.epoch_sums),
    }
    path = directory / STATE_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never leave a half-written state.pt under the real name
    return path


def read(directory: Path) -> dict[str, Any]:
    """Load and check a checkpoint's state dict; ``CheckpointError`` on anything unusable."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no checkpoint state here (expected a {STATE_FILE} written by this pipeline)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupt files surface as many different torch errors
        raise CheckpointError(
            f"{path}: cannot be read ({type(e).__name__}: {e}); the file is truncated or corrupt"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a training state (got {type(state).__name__})")
    missing = sorted(REQUIRED_KEYS - state.keys())
    unexpected = sorted(state.keys() - REQUIRED_KEYS - OPTIONAL_KEYS)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: wrong keys; missing: {missing or 'none'}; unexpected: {unexpected or 'none'}"
        )
    return state


def restore_model(state: dict[str, Any], model: torch.nn.Module) -> None:
    """Load only the weights (evaluation), failing with the exact missing and unexpected keys."""
    result = model.load_state_dict(state["model"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            "checkpoint does not fit this model "
            f"(model.name={state['config'].get('model', {}).get('name')!r} in the checkpoint); "
            f"missing keys: {result.missing_keys or 'none'}; unexpected keys: {result.unexpected_keys or 'none'}"
        )


def restore(
    state: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler | None,
) -> TrainingProgress:
    """Load a state read by ``read`` into the live objects; returns the progress to resume from."""
    restore_model(state, model)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and scaler.is_enabled() and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return TrainingProgress(
        epoch=int(state["epoch"]),
        step=int(state["step"]),
        best_val_top1_err=float(state["best_val_top1_err"]),
        schedule=ScheduleState(**state["schedule"]),
        wandb_run_id=state["wandb_run_id"],
        epoch_sums=tuple(float(x) for x in state.get("epoch_sums", ())),
    )
