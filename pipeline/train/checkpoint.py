"""Checkpoints, written and resumed: what a checkpoint holds, where it goes, which one a run
resumes from and how many are kept.

    restored = restore(run)   # (progress, its checkpoint) or None; rank 0 picks the newest readable one
    save_checkpoint(run, progress, metrics)          # every rank; rank 0 writes state.pt, Ray uploads it
    state = read(folder); restore_model(state, model)    # evaluation: the weights only

What: the full training state in ``state.pt`` (the model unwrapped from DDP, the EMA of its weights
when ``optim.ema_decay`` is on, the optimizer, the grad scaler, the RNG states, the resolved config, and the run's ``TrainingProgress``: epoch,
global step, schedule state, best validation error, the W&B run id, the epoch's partial sums when
mid-epoch), and what fixed the data order (``data``: the sharded layout's manifest SHA-256 and
``data.shuffle_window``, ``Data.order_pin``), read back with ``torch.load(weights_only=True)``, so
only tensors and plain containers go in.

Where: folders ``checkpoint_*`` under the run's location (``pipeline.store.rundir.run_location``),
beside the run's files, named so that sorting by name is sorting by time
(``checkpoint_epoch0003`` < ``checkpoint_epoch0003_step0000450`` < ``checkpoint_epoch0004``).
Under Ray, Ray Train uploads them on a background thread; without Ray rank 0 writes them.

Which one a run resumes from: the newest readable one in the run's folder (the folder is the
record: Ray's own latest can lag behind it while uploads run), else ``resume_from``. A mid-epoch
one resumes only over the data order it was saved in (``order_pin_problem``): another manifest
or window stops the run before training, saying how to change the data at an epoch boundary.

How many are kept, the one retention policy: the newest ``checkpoint.num_to_keep``, mid-epoch
ones included, with or without Ray (Ray's ``CheckpointConfig(num_to_keep)`` without a score
attribute keeps the most recent; without Ray rank 0 prunes here). Keeping the newest, not the
best by validation error, is what resume needs: it always starts from the newest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.config import config_changes, to_dict
from pipeline.store.locations import copy_folder_to, filesystem, is_uri, join, remove_tree
from pipeline.store.staging import stage_checkpoint
from pipeline.train.distributed import DistContext, barrier, broadcast_object
from pipeline.train.ema import WeightAverage
from pipeline.train.schedule import ScheduleState
from pipeline.train.setup import Run, TrainingProgress

CHECKPOINT_PREFIX = "checkpoint_"
STATE_FILE = "state.pt"
# 2 added epoch_sums (mid-epoch checkpoints), 3 added data (the order pin), 4 added ema (the EMA of
# the weights, None when off); older files still load.
FORMAT_VERSION = 4
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
OPTIONAL_KEYS = frozenset({"epoch_sums", "data", "ema"})


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with a message naming the file and the problem."""


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
    order_pin: dict[str, Any] | None = None,
    ema: WeightAverage | None = None,
) -> Path:
    """Write ``state.pt`` into ``directory`` (created) and return its path; ``order_pin``: the run's
    ``Data.order_pin`` (None: a layout whose order the seed alone fixes); ``ema``: the run's EMA."""
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
        "data": order_pin,
        "ema": ema.state_dict() if ema is not None else None,
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


def load_state(
    state: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler | None,
    ema: WeightAverage | None = None,
) -> TrainingProgress:
    """Load a state read by ``read`` into the live objects; returns the progress to resume from.
    ``ema``: the run's EMA, loaded from the checkpoint's, or started at its weights when it has none
    (saved before format 4, or with the EMA off)."""
    restore_model(state, model)
    if ema is not None:
        if state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        else:
            ema.copy_from(model)
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


def checkpoint_name(epochs_done: int, step: int | None = None) -> str:
    """The folder name of a checkpoint after ``epochs_done`` epochs (and, mid-epoch, at global ``step``)."""
    return f"{CHECKPOINT_PREFIX}epoch{epochs_done:04d}" + ("" if step is None else f"_step{step:07d}")


def list_checkpoints(location: str) -> list[str]:
    """This run's checkpoints (as locations), newest first."""
    if not is_uri(location):
        root = Path(location)
        if not root.is_dir():
            return []
        names = [p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    else:
        import pyarrow.fs

        fs, root_path = filesystem(location)
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root_path, allow_not_found=True))
        names = [
            i.base_name
            for i in infos
            if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX)
        ]
    return [join(location, n) for n in sorted(names, reverse=True)]


@contextlib.contextmanager
def fetched(location: str) -> Iterator[Path]:
    """A local folder holding the checkpoint at ``location``: the folder itself when it is local,
    else a temporary copy, removed on exit."""
    if not is_uri(location):
        yield Path(location)
        return
    import pyarrow.fs

    fs, path = filesystem(location)
    local = Path(tempfile.mkdtemp(prefix="pipeline-checkpoint-"))
    try:
        pyarrow.fs.copy_files(path, str(local), source_filesystem=fs)
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def checkpoint_candidates(ctx: DistContext, location: str, resume_from: str | None) -> list[str]:
    """Checkpoints to resume from, newest first, so an unreadable one can fall back to the one
    before; ``resume_from`` only when the run has none of its own.

    The run's folder is the record: Ray's latest registered checkpoint (``get_checkpoint``)
    lives there too but can lag behind it, since uploads run in the background and a report
    still queued when a node dies is never registered although its checkpoint is whole.
    """
    found = list_checkpoints(location)
    if ctx.under_ray:
        import ray.train

        latest = ray.train.get_checkpoint()
        name = join(location, Path(latest.path).name) if latest is not None else None
        if name is not None and name not in found:  # listed late by an eventually consistent store
            found = sorted([*found, name], reverse=True)
    if not found and resume_from:
        found.append(resume_from)
    return found


def report_checkpoint(
    ctx: DistContext,
    metrics: dict[str, Any],
    name: str,
    location: str,
    save: Callable[[Path], Any],
    num_to_keep: int,
    wait_upload: bool = False,
) -> str:
    """Persist a checkpoint written by ``save(directory)`` on rank 0 and report the metrics.

    Under Ray every rank calls ``ray.train.report`` (it is a barrier); rank 0 hands over the
    checkpoint, which Ray uploads to ``<storage>/<name>/<checkpoint name>`` on a background
    thread while training goes on (before ``report`` returns with ``wait_upload``; then
    deletes the local copy) and keeps the newest
    ``num_to_keep`` (``pipeline.driver.ray_runner`` sets its ``CheckpointConfig``). Without Ray,
    rank 0 writes it there itself and prunes all but the newest ``num_to_keep``, locally or in
    object storage alike.
    """
    if ctx.under_ray:
        import ray.train

        checkpoint = None
        if ctx.is_main:
            # Not a TemporaryDirectory: Ray deletes it once uploaded (pipeline.store.staging).
            folder = stage_checkpoint(name)
            save(folder)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=name,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.SYNC
            if wait_upload
            else ray.train.CheckpointUploadMode.ASYNC,
        )
    elif ctx.is_main:
        if is_uri(location):
            with tempfile.TemporaryDirectory() as tmp:
                save(Path(tmp))
                copy_folder_to(Path(tmp), join(location, name))
        else:
            save(Path(location) / name)
        for old in list_checkpoints(location)[max(num_to_keep, 1) :]:
            remove_tree(old)
    barrier()
    return join(location, name)


def pick_checkpoint(candidates: list[str]) -> tuple[str | None, dict[str, Any] | None, list[str], list[str]]:
    """(the newest readable checkpoint, its state, warnings, the candidates that hold a state file).

    A folder without ``state.pt`` is a checkpoint that never finished (its node died during the
    upload): it is passed over. One whose file cannot be read (truncated, corrupt) is skipped
    with a warning in favour of the one before it.
    """
    warnings, real = [], []
    for source in candidates:
        try:
            with fetched(source) as folder:
                if not (folder / STATE_FILE).is_file():
                    warnings.append(
                        f"warning: passing over {source}: no {STATE_FILE} (an unfinished upload?)"
                    )
                    continue
                real.append(source)
                return source, read(folder), warnings, real
        except (CheckpointError, OSError) as e:
            warnings.append(f"warning: skipping unusable checkpoint: {e}")
    return None, None, warnings, real


def _describe_order(pin: dict[str, Any] | None) -> str:
    if pin is None:
        return "a dataset without a manifest (image folders or CIFAR-10)"
    return f"the shards of manifest SHA-256 {pin['manifest_sha256']} with data.shuffle_window={pin['shuffle_window']}"


def order_pin_problem(state: dict[str, Any], pin: dict[str, Any] | None, chosen: str, location: str,
                      root: str) -> str | None:  # fmt: skip
    """Why ``state`` (read from ``chosen``) cannot resume the run at ``location`` over the data at
    ``root`` whose ``Data.order_pin`` is ``pin``; None when it can: saved at an epoch's end, over
    the same manifest and window, or before checkpoints recorded them (format 2 and older). The
    driver asks before the workers start (``pipeline.driver.resume_check``), the workers again.

    A mid-epoch resume replays the epoch's sample order from the step it stopped at; another
    manifest or window gives another order, so samples would be skipped or seen twice.
    """
    if not state.get("epoch_sums") or "data" not in state or state["data"] == pin:
        return None
    epoch = int(state["epoch"]) + 1
    listed = list_checkpoints(location)
    after = []  # the mid-epoch checkpoints newer than the newest epoch-end one
    boundary = None
    for name in listed:  # newest first
        if "_step" not in Path(name).name:
            boundary = name
            break
        after.append(name)
    if chosen not in listed:  # resume_from, another run's
        redo = f"set resume_from to a checkpoint saved at an epoch's end ({CHECKPOINT_PREFIX}epochNNNN)"
    elif boundary is not None:
        redo = (
            f"remove {', '.join(after)} (the mid-epoch checkpoints after {Path(boundary).name}) and run again"
        )
    else:
        redo = f"none is kept in {location} (checkpoint.num_to_keep), so start afresh under another name"
    old_root = state["config"].get("data", {}).get("root")
    return (
        f"{chosen} was saved in the middle of epoch {epoch} (step {state['step']}) over "
        f"{_describe_order(state['data'])}; data.root={root} holds {_describe_order(pin)}. "
        "A mid-epoch resume replays that epoch's order, which other data changes, so training was not "
        f"started. Change the data at an epoch boundary instead: finish epoch {epoch} with "
        f"data.root={old_root} and switch once its end is checkpointed, or redo epoch {epoch} over the "
        f"new data from the last epoch-end checkpoint: {redo}. No setting skips ahead to the next boundary."
    )


def restore(run: Run) -> tuple[TrainingProgress, str] | None:
    """(the progress to resume from, the checkpoint it came from), None for a fresh run: rank 0
    picks the newest readable checkpoint in the run's folder (else the one before it, else
    ``resume_from``); every rank then loads that one. Copies fetched from object storage are
    removed once loaded."""
    ctx, location = run.ctx, run.location
    decision: tuple[str, str | None] = ("none", None)
    state = None
    if ctx.is_main:
        candidates = checkpoint_candidates(ctx, location, run.cfg.resume_from)
        chosen, state, warnings, real = pick_checkpoint(candidates)
        for line in warnings:
            print(line, flush=True)
        pin, root = run.data.order_pin, run.cfg.data.root
        problem = order_pin_problem(state, pin, chosen, location, root) if chosen is not None else None
        if problem:
            decision = ("error", problem)
        elif chosen is not None:
            decision = ("load", chosen)
        elif real:
            decision = (
                "error",
                f"none of the checkpoints of run {run.cfg.name!r} can be read ({', '.join(real)}); "
                "remove them or start under a new name",
            )
    kind, value = broadcast_object(decision)
    if kind == "error":
        raise CheckpointError(value)
    if kind == "none":
        return None
    if state is None:
        with fetched(value) as folder:
            state = read(folder)
    progress = load_state(state, model=run.network, optimizer=run.optimizer, scaler=run.scaler, ema=run.ema)
    if ctx.is_main:
        print(f"restored from checkpoint {value}: epoch {progress.epoch}, step {progress.step}", flush=True)
        changed = config_changes(state["config"], to_dict(run.cfg))
        if changed:
            print(f"warning: the config differs from the checkpoint's: {'; '.join(changed)}", flush=True)
        if run.ema is not None and state.get("ema") is None:
            print(
                "note: the checkpoint holds no EMA of the weights; the EMA starts at its weights", flush=True
            )
        if state.get("data", run.data.order_pin) != run.data.order_pin:  # at an epoch's end: allowed
            print(f"note: the data differ from the checkpoint's ({_describe_order(state['data'])} then, "
                  f"{_describe_order(run.data.order_pin)} now); the next epoch reads the new data", flush=True)  # fmt: skip
    return progress, value


def save_checkpoint(
    run: Run, progress: TrainingProgress, metrics: dict[str, Any], wait_upload: bool = False
) -> str:
    """Checkpoint the run at ``progress`` (an epoch's end, or mid-epoch when ``progress.step`` lies
    inside one) and report ``metrics`` with it; every rank calls this. Returns its location.
    ``wait_upload``: under Ray, return once it is uploaded (else it uploads while training goes on)."""
    mid_epoch = bool(progress.epoch_sums)  # the partial sums exist only inside an epoch
    name = checkpoint_name(progress.epoch, progress.step if mid_epoch else None)

    def write(folder: Path) -> None:
        save(
            folder,
            model=run.network,
            optimizer=run.optimizer,
            scaler=run.scaler,
            progress=progress,
            config=to_dict(run.cfg),
            order_pin=run.data.order_pin,
            ema=run.ema,
        )

    keep = run.cfg.checkpoint.num_to_keep
    return report_checkpoint(run.ctx, metrics, name, run.location, write, keep, wait_upload=wait_upload)
