"""Where a run lives: its location (a local folder or an ``s3://`` / ``gs://`` URI) and its checkpoints.

    location = run_location(cfg.checkpoint.storage_path, cfg.name)   # <storage>/<name>
    candidates = checkpoint_candidates(ctx, location)                 # newest first
    report_epoch(ctx, metrics, "checkpoint_epoch0003", location, save, num_to_keep=2)

Checkpoints are folders ``checkpoint_*`` under the run's location, beside the run's files
(``pipeline.rundir``). Under Ray, Ray Train copies and prunes them (its ``CheckpointConfig``);
without Ray, rank 0 writes and prunes them here. URIs go through pyarrow's filesystems,
which is what Ray itself uses.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.distributed import DistContext, barrier

CHECKPOINT_PREFIX = "checkpoint_"


def is_uri(path: str) -> bool:
    """A remote location (``s3://``, ``gs://``, ``file://``...) rather than a local path."""
    return "://" in path


def run_location(storage_path: str, name: str) -> str:
    """Where a run's files and checkpoints go: an absolute local path or a URI."""
    if is_uri(storage_path):
        return storage_path.rstrip("/") + "/" + name
    return str(Path(storage_path).expanduser().resolve() / name)


CHECKPOINT_PREFIX = "checkpoint_"


def local_checkpoints(location: str) -> list[Path]:
    """This run's checkpoint folders on a local filesystem, newest first (by name: epoch-numbered)."""
    root = Path(location)
    if is_uri(location) or not root.is_dir():
        return []
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)), reverse=True
    )


def remote_checkpoints(location: str) -> list[Path]:
    """This run's checkpoints under a URI (``s3://``, ``gs://``), newest first, fetched to local folders."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(location)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    names = sorted(
        (
            i.base_name
            for i in infos
            if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX)
        ),
        reverse=True,
    )
    fetched = []
    for name in names:
        local = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        pyarrow.fs.copy_files(f"{root}/{name}", str(local), source_filesystem=fs)
        fetched.append(local)
    return fetched


def checkpoint_candidates(ctx: DistContext, location: str) -> list[Path]:
    """Checkpoints to resume from, newest first: Ray's latest (after a restart or a re-run of the
    same name), then the older ones kept beside it, so a truncated latest can fall back."""
    if is_uri(location):  # Ray's latest lives in the same storage folder as the older ones
        return remote_checkpoints(location)
    found: list[Path] = []
    if ctx.under_ray:
        import ray.train

        latest = ray.train.get_checkpoint()
        if latest is not None:
            found.append(Path(latest.path))
    for path in local_checkpoints(location):
        if path.name not in {p.name for p in found}:
            found.append(path)
    return found


def report_epoch(
    ctx: DistContext,
    metrics: dict[str, Any],
    name: str,
    location: str,
    save: Callable[[Path], Any],
    num_to_keep: int,
) -> str:
    """Persist a checkpoint written by ``save(directory)`` on rank 0 and report the metrics.

    Under Ray every rank calls ``ray.train.report`` (it is a barrier); rank 0 hands over the
    checkpoint and Ray copies it to ``<storage>/<name>/<checkpoint name>``, keeping
    ``num_to_keep`` as its ``CheckpointConfig`` says. Without Ray, rank 0 writes it there
    itself and prunes the oldest.
    """
    if ctx.under_ray:
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            if ctx.is_main:
                save(Path(tmp))
            checkpoint = ray.train.Checkpoint.from_directory(tmp) if ctx.is_main else None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
    elif ctx.is_main and is_uri(location):
        import pyarrow.fs

        with tempfile.TemporaryDirectory() as tmp:
            save(Path(tmp))
            fs, root = pyarrow.fs.FileSystem.from_uri(f"{location.rstrip('/')}/{name}")
            fs.create_dir(root, recursive=True)
            pyarrow.fs.copy_files(tmp, root, destination_filesystem=fs)
    elif ctx.is_main:
        target = Path(location) / name
        save(target)
        for old in local_checkpoints(location)[max(num_to_keep, 1) :]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return f"{location.rstrip('/')}/{name}"
