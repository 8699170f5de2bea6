"""Local folders that hold a checkpoint until Ray Train has uploaded it.

    folder = stage_checkpoint("checkpoint_epoch0003")   # rank 0, under Ray, before writing state.pt

Under Ray, rank 0 writes a checkpoint into a local folder and hands it to ``ray.train.report``
(``CheckpointUploadMode.ASYNC``): a background thread copies it to the run's storage and then
deletes the folder, while training goes on. Two things Ray leaves to the caller:

- **A process that dies mid-upload leaves its folders.** A worker SIGKILLed, a job stopped, a
  group torn down after a peer's failure: every folder it had queued stays on the node's disk
  (hundreds of MB each for a ResNet-50). So the folders live in one place per node,
  ``<tmp>/pipeline-checkpoints``, named with the pid of the process that wrote them, and each new
  stage removes those of processes that no longer exist.
- **Nothing bounds the queue.** The uploads run one after the other, and Ray Train's controller
  takes one report per worker per poll; a run that checkpoints faster than that (slow storage,
  frequent ``checkpoint.every_n_steps``) piles up folders on the disk and loses them all if the
  process dies. So a new stage first waits until this process's earlier ones are uploaded but
  the newest: at most two checkpoints on the disk, and training never runs more than one
  checkpoint ahead of storage (a folder Ray uploaded but could not delete stops holding it
  after ``GIVE_UP_S``, with a warning).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.host import process_alive

STAGING_DIR = "pipeline-checkpoints"  # W&B's offline folders are in pipeline-staging
IN_FLIGHT = 1  # earlier checkpoints of this process that may still be uploading
SLOW_UPLOAD_S = 60.0  # waiting longer than this is said once
GIVE_UP_S = 1800.0  # an upload this slow is not coming: a folder Ray failed to delete


def staging_root() -> Path:
    root = Path(tempfile.gettempdir()) / STAGING_DIR
    try:
        root.mkdir()
        root.chmod(0o1777)  # shared like /tmp (several users' runs on one node), past the umask
    except FileExistsError:
        pass
    return root


def _writer_pid(folder: Path) -> int | None:
    """The pid in ``checkpoint_<...>.<pid>.<random>``, or None for a name of another form."""
    parts = folder.name.rsplit(".", 2)
    ours = len(parts) == 3 and parts[0].startswith("checkpoint_") and parts[1].isdigit()
    return int(parts[1]) if ours else None


def remove_orphans(root: Path) -> list[Path]:
    """Remove the folders whose writer no longer runs; returns them."""
    removed = []
    for folder in root.iterdir():
        pid = _writer_pid(folder)
        if pid is not None and pid != os.getpid() and not process_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def wait_for_uploads(
    root: Path,
    in_flight: int = IN_FLIGHT,
    say: Callable[[str], None] = print,
    poll_s: float = 0.05,
    give_up_s: float = GIVE_UP_S,
) -> bool:
    """Block until at most ``in_flight`` folders of this process remain (Ray deletes each once
    uploaded); True then. If an upload fails, Ray ends the worker group, and this wait with it;
    a folder Ray uploaded but could not delete would hold it forever, so after ``give_up_s``
    it says so and returns False (training goes on, the disk no longer bounded)."""
    start, said = time.monotonic(), False
    while True:
        mine = sorted(f for f in root.iterdir() if _writer_pid(f) == os.getpid())
        if len(mine) <= in_flight:
            return True
        waited = time.monotonic() - start
        oldest = mine[0].name.rsplit(".", 2)[0]
        if waited > give_up_s:
            say(
                f"warning: {mine[0]} still here after {waited:.0f} s; training goes on without waiting for it"
            )
            return False
        if waited > SLOW_UPLOAD_S and not said:
            say(
                f"checkpoint upload slow: {oldest} not in storage after {waited:.0f} s; training "
                f"waits for it (at most {in_flight + 1} checkpoints on this disk)"
            )
            said = True
        time.sleep(poll_s)


def stage_checkpoint(name: str) -> Path:
    """A new empty folder for checkpoint ``name``, after the orphans are removed and this process's
    earlier checkpoints but ``IN_FLIGHT`` are uploaded."""
    root = staging_root()
    remove_orphans(root)
    wait_for_uploads(root)
    return Path(tempfile.mkdtemp(prefix=f"{name}.{os.getpid()}.", dir=root))
