"""Where a run lives: its location (a local folder or an ``s3://`` / ``gs://`` URI) and its checkpoints.

    location = run_location(cfg.checkpoint.storage_path, cfg.name)     # <storage>/<name>
    names = checkpoint_candidates(ctx, location)                        # newest first, as locations
    with fetched(names[0]) as folder: state = checkpoint.read(folder)   # a local copy, removed after
    report_checkpoint(ctx, metrics, "checkpoint_epoch0003", location, save, num_to_keep=2)

Checkpoints are folders ``checkpoint_*`` under the run's location, beside the run's files
(``pipeline.rundir``), named so that sorting by name is sorting by time
(``checkpoint_epoch0003`` < ``checkpoint_epoch0003_step0000450`` < ``checkpoint_epoch0004``).
Under Ray, Ray Train uploads (asynchronously) and prunes them; without Ray, rank 0 writes and
prunes them here. URIs go through pyarrow's filesystems, as Ray's own storage does, so
``AWS_ENDPOINT_URL`` and the rest of the standard environment apply.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.distributed import DistContext, barrier
from pipeline.locations import filesystem, is_uri

CHECKPOINT_PREFIX = "checkpoint_"


def run_location(storage_path: str, name: str) -> str:
    """Where a run's files and checkpoints go: an absolute local path or a URI."""
    if is_uri(storage_path):
        return storage_path.rstrip("/") + "/" + name
    return str(Path(storage_path).expanduser().resolve() / name)


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
    return [f"{location.rstrip('/')}/{n}" for n in sorted(names, reverse=True)]


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


def upload_folder(local: Path, location: str) -> None:
    """Copy a local folder's files to a URI (replacing what is there): W&B's offline run."""
    import pyarrow.fs

    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(local), path, destination_filesystem=fs)


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
        name = f"{location.rstrip('/')}/{Path(latest.path).name}" if latest is not None else None
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
) -> str:
    """Persist a checkpoint written by ``save(directory)`` on rank 0 and report the metrics.

    Under Ray every rank calls ``ray.train.report`` (it is a barrier); rank 0 hands over the
    checkpoint, which Ray uploads to ``<storage>/<name>/<checkpoint name>`` on a background
    thread while training goes on (then deletes the local copy), keeping ``num_to_keep`` as its
    ``CheckpointConfig`` says. Without Ray, rank 0 writes it there itself and prunes the oldest.
    """
    if ctx.under_ray:
        import ray.train

        checkpoint = None
        if ctx.is_main:
            # A folder of our own (not a TemporaryDirectory): Ray deletes it once the upload is done.
            folder = Path(tempfile.mkdtemp(prefix=f"{name}-"))
            save(folder)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=name,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
        )
    elif ctx.is_main and is_uri(location):
        with tempfile.TemporaryDirectory() as tmp:
            save(Path(tmp))
            upload_folder(Path(tmp), f"{location.rstrip('/')}/{name}")
    elif ctx.is_main:
        save(Path(location) / name)
        for old in list_checkpoints(location)[max(num_to_keep, 1) :]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return f"{location.rstrip('/')}/{name}"
