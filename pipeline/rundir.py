"""The files rank 0 keeps for a run: ``config.yaml``, ``metrics.jsonl``, ``summary.json``.

They live in ``<checkpoint.storage_path>/<name>/``, beside Ray Train's checkpoints. When the
storage is a URI (``s3://``, ``gs://``) the files are kept in a local staging folder and
copied there after every write through pyarrow's filesystems (what Ray itself uses).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml


def is_uri(path: str) -> bool:
    return "://" in path


def run_location(storage_path: str, name: str) -> str:
    """Where a run's files and checkpoints go: an absolute local path or a URI."""
    if is_uri(storage_path):
        return storage_path.rstrip("/") + "/" + name
    return str(Path(storage_path).expanduser().resolve() / name)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class RunDir:
    """Writer of one run's files (rank 0 only)."""

    def __init__(self, location: str):
        self.location = location
        if is_uri(location):
            self.local = (
                Path(tempfile.gettempdir()) / "pipeline-staging" / location.split("://", 1)[1].lstrip("/")
            )
        else:
            self.local = Path(location)
        self.local.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.local / "metrics.jsonl"

    def _sync(self, name: str) -> None:
        if not is_uri(self.location):
            return
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(self.location)
        fs.create_dir(root, recursive=True)
        pyarrow.fs.copy_files(str(self.local / name), f"{root}/{name}", destination_filesystem=fs)

    def write_config(self, config: dict[str, Any]) -> None:
        _atomic_write(self.local / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        self._sync("config.yaml")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def keep_epochs_upto(self, epoch: int) -> None:
        """Drop records of epochs after ``epoch``: a resumed run redoes them, and each epoch appears once."""
        kept = [r for r in self.read_metrics() if r.get("epoch", 0) <= epoch]
        _atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        self._sync("metrics.jsonl")

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n")
        self._sync("metrics.jsonl")

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write(
            self.local / "summary.json",
            json.dumps({k: _json_safe(v) for k, v in summary.items()}, indent=2) + "\n",
        )
        self._sync("summary.json")
