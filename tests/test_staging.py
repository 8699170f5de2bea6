"""Checkpoint staging (pipeline.store.staging): orphans of dead writers removed, the queue bounded."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.store import staging


def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_folders_of_dead_writers_are_removed_and_the_rest_kept(tmp_path):
    pid = dead_pid()
    dead = tmp_path / f"checkpoint_epoch0003.{pid}.abcd"
    dotted = tmp_path / f"imagenet.{pid}.v2"  # not a checkpoint's name (a bucket's, say)
    mine = tmp_path / f"checkpoint_epoch0004.{os.getpid()}.efgh"
    parent = tmp_path / f"checkpoint_epoch0004.{os.getppid()}.ijkl"  # alive
    other = tmp_path / "not-a-staged-folder"
    for folder in (dead, dotted, mine, parent, other):
        folder.mkdir()
        (folder / "state.pt").write_bytes(b"x" * 100)
    assert staging.remove_orphans(tmp_path) == [dead]
    assert not dead.exists() and all(f.is_dir() for f in (dotted, mine, parent, other))


def test_a_new_stage_waits_until_all_but_one_earlier_upload_are_done(tmp_path):
    older = [tmp_path / f"checkpoint_epoch000{i}.{os.getpid()}.x{i}" for i in (1, 2)]
    for folder in older:
        folder.mkdir()
    lines: list[str] = []

    def upload_the_first():  # what Ray's upload thread does once the copy is in storage
        time.sleep(0.3)
        older[0].rmdir()

    uploader = threading.Thread(target=upload_the_first)
    start = time.monotonic()
    uploader.start()
    staging.wait_for_uploads(tmp_path, in_flight=1, say=lines.append)
    uploader.join()
    assert time.monotonic() - start >= 0.3 and not older[0].exists() and older[1].is_dir()
    assert lines == []  # not slow enough to be said


def test_stage_checkpoint_names_the_writer_under_the_node_temp_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(staging.tempfile, "tempdir", str(tmp_path))
    folder = staging.stage_checkpoint("checkpoint_epoch0007")
    assert folder.parent == tmp_path / staging.STAGING_DIR and folder.is_dir()
    assert folder.name.startswith(f"checkpoint_epoch0007.{os.getpid()}.")
    assert staging._writer_pid(folder) == os.getpid()
    assert Path(tmp_path / staging.STAGING_DIR).stat().st_mode & 0o1777 == 0o1777


def test_the_checkpoint_of_a_killed_writer_is_removed_by_the_next_stage(tmp_path, monkeypatch):
    """A writer SIGKILLed with a checkpoint staged (Ray had not uploaded it): the next process to
    stage one on the node removes it, and keeps its own."""
    code = (
        "import os, signal, tempfile; tempfile.tempdir = os.environ['NODE_TMP']; "
        "from pipeline.store.staging import stage_checkpoint; "
        "(stage_checkpoint('checkpoint_epoch0002_step0000020') / 'state.pt').write_bytes(b'x'); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "NODE_TMP": str(tmp_path)})
    assert proc.returncode == -9
    root = tmp_path / staging.STAGING_DIR
    (left,) = root.iterdir()
    assert left.name.startswith("checkpoint_epoch0002_step0000020.") and (left / "state.pt").is_file()
    monkeypatch.setattr(staging.tempfile, "tempdir", str(tmp_path))
    mine = staging.stage_checkpoint("checkpoint_epoch0002_step0000022")
    assert list(root.iterdir()) == [mine]


def test_a_folder_that_never_goes_stops_holding_training_after_the_limit(tmp_path):
    """Ray logs and goes on when it cannot delete an uploaded folder: the wait gives up, says so."""
    for i in (1, 2):
        (tmp_path / f"checkpoint_epoch000{i}.{os.getpid()}.x{i}").mkdir()
    lines: list[str] = []
    assert staging.wait_for_uploads(tmp_path, in_flight=1, say=lines.append, give_up_s=0.2) is False
    assert len(lines) == 1 and "checkpoint_epoch0001" in lines[0] and "goes on" in lines[0]
