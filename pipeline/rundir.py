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
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipeline.storage import is_uri

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunDir:
    """One run's files, local or in object storage (only rank 0 writes)."""

    def __init__(self, location: str):
        self.location = location.rstrip("/") if is_uri(location) else location
        if is_uri(location):
            import pyarrow.fs

            self._fs, self._root = pyarrow.fs.FileSystem.from_uri(self.location)
        else:
            self._fs, self._root = None, self.location
        self._dir_made = False

    # ------------------------------------------------------------ raw text

    def read_text(self, name: str) -> str | None:
        """A file's text, or None when it does not exist."""
        if self._fs is None:
            path = Path(self._root) / name
            return path.read_text() if path.is_file() else None
        import pyarrow.fs

        path = f"{self._root}/{name}"
        if self._fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with self._fs.open_input_stream(path) as f:
            return f.read().decode()

    def write_text(self, name: str, text: str) -> None:
        """Replace a file whole: a reader sees the old text or the new, never a part."""
        if self._fs is None:
            path = Path(self._root) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
            return
        if not self._dir_made:  # a file:// location needs its folder; on object stores this is cheap
            self._fs.create_dir(self._root, recursive=True)
            self._dir_made = True
        # An object store's PUT is atomic already: the object appears whole when the stream closes.
        with self._fs.open_output_stream(f"{self._root}/{name}") as f:
            f.write(text.encode())

    @property
    def local_dir(self) -> Path:
        """A local folder for what a library writes by path (W&B's offline run): the run's own
        folder, or for a URI a staging folder on this node."""
        if self._fs is None:
            return Path(self._root)
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
        if self._fs is None:
            path = Path(self._root) / METRICS_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n")
            return
        self.write_metrics([*self.read_metrics(), record])

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.write_text(
            SUMMARY_FILE, json.dumps({k: _json_safe(v) for k, v in summary.items()}, indent=2) + "\n"
        )

    def read_summary(self) -> dict[str, Any] | None:
        text = self.read_text(SUMMARY_FILE)
        return json.loads(text) if text is not None else None
