"""The one reader and writer of a run's files: ``config.yaml``, ``metrics.jsonl``, ``summary.json``.

    run = RunDir("s3://bucket/runs/resnet50")      # or a local folder
    run.append_metrics({"epoch": 3, "val/top1_err": 31.2})
    run.read_summary()

They live in ``<checkpoint.storage_path>/<name>/``, beside the checkpoints. A URI
(``s3://``, ``gs://``) is read and written in place through pyarrow's filesystems (what Ray
itself uses; ``FileSystem.from_uri`` follows ``AWS_ENDPOINT_URL`` and the rest of the standard
environment), never through a node-local copy: rank 0 may start on another node after a
failure and must see, and extend, what the previous rank 0 wrote. Objects cannot be appended
to, so appending rewrites ``metrics.jsonl`` whole (one small object, once per epoch).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipeline.store.locations import is_uri, join, read_bytes, write_bytes

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def run_location(storage_path: str, name: str) -> str:
    """Where a run's files and checkpoints go, ``<checkpoint.storage_path>/<name>``: an absolute
    local path or a URI. Every command that finds a run by its config asks this function."""
    if is_uri(storage_path):
        return join(storage_path, name)
    return str(Path(storage_path).expanduser().resolve() / name)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunDir:
    """One run's files, local or in object storage (only rank 0 writes)."""

    def __init__(self, location: str):
        self.location = location.rstrip("/") if is_uri(location) else location

    def read_text(self, name: str) -> str | None:
        """A file's text, or None when it does not exist."""
        data = read_bytes(join(self.location, name))
        return None if data is None else data.decode()

    def write_text(self, name: str, text: str) -> None:
        """Replace a file whole: a reader sees the old text or the new, never a part."""
        write_bytes(join(self.location, name), text.encode())

    @property
    def local_dir(self) -> Path:
        """A local folder for what a library writes by path (W&B's offline run): the run's own
        folder, or for a URI a staging folder on this node."""
        if not is_uri(self.location):
            return Path(self.location)
        return Path(tempfile.gettempdir()) / "pipeline-staging" / self.location.split("://", 1)[1]

    def exists(self) -> bool:
        """Whether the run has written anything a report can read."""
        return self.read_text(CONFIG_FILE) is not None or self.read_text(METRICS_FILE) is not None

    # ------------------------------------------------------------ the run's files

    def write_config(self, config: dict[str, Any]) -> None:
        self.write_text(CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        text = self.read_text(CONFIG_FILE)
        return (yaml.safe_load(text) or {}) if text is not None else {}

    def read_metrics(self) -> list[dict[str, Any]]:
        text = self.read_text(METRICS_FILE) or ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        self.write_text(
            METRICS_FILE,
            "".join(json.dumps({k: _json_safe(v) for k, v in r.items()}) + "\n" for r in records),
        )

    def keep_epochs_upto(self, epoch: int) -> None:
        """Drop records of epochs after ``epoch``: a resumed run redoes them, and each epoch appears once."""
        records = self.read_metrics()
        kept = [r for r in records if r.get("epoch", 0) <= epoch]
        if len(kept) != len(records) or self.read_text(METRICS_FILE) is None:
            self.write_metrics(kept)

    def append_metrics(self, record: dict[str, Any]) -> None:
        if not is_uri(self.location):
            path = Path(self.location) / METRICS_FILE
            with path.open("a") as f:
                f.write(json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n")
            return
        self.write_metrics([*self.read_metrics(), record])  # objects cannot be appended to

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.write_text(
            SUMMARY_FILE, json.dumps({k: _json_safe(v) for k, v in summary.items()}, indent=2) + "\n"
        )

    def read_summary(self) -> dict[str, Any] | None:
        text = self.read_text(SUMMARY_FILE)
        return json.loads(text) if text is not None else None
