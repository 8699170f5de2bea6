"""Reading runs for the reports: a run directory (local or a URI) or W&B runs, as ``RunData``.

``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON object per epoch) and
``summary.json`` (the final evaluation) are what the training loop writes on rank 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.report.paper import canonical_model
from pipeline.store.rundir import RunDir

# The figures' size, shared by the single-run and the over-seeds reports.
PANEL_SIZE_IN = (6.0, 4.5)  # inches per panel
DPI = 100


@dataclass
class RunData:
    """What the report needs from one run directory."""

    path: str | Path  # a local folder or a URI
    name: str
    model: str  # model.name
    model_key: str  # canonical_model(...)
    dataset: str
    eval_mode: str | None
    top1: float | None  # final top-1 error (%), from summary.json or the last epoch
    top5: float | None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    final: bool = True  # False: no summary.json yet, numbers are the last epoch's
    held_out: int = 0  # CIFAR-10 data.val_split: evaluated on held-out training images, not the test set
    test_top1: float | None = None  # the test set's final errors when scored besides validation (val_split)
    test_top5: float | None = None

    @property
    def plain(self) -> bool:
        return "plain" in self.model_key

    @property
    def label(self) -> str:
        return self.name if self.name == self.model else f"{self.name} ({self.model})"


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def load_run(path: str | Path) -> RunData:
    """Read one run directory (``config.yaml``, ``metrics.jsonl``, ``summary.json``), local or a URI.

    Args:
        path: the run directory.

    Raises:
        FileNotFoundError: the directory has neither a config nor metrics.
    """
    run_dir = RunDir(str(path))
    if not run_dir.exists():
        raise FileNotFoundError(f"{path}: not a run directory (no config.yaml or metrics.jsonl)")
    config, metrics, summary = run_dir.read_config(), run_dir.read_metrics(), run_dir.read_summary()

    model_cfg = config.get("model") or {}
    eval_cfg = config.get("eval") or {}
    model = (summary or {}).get("model") or model_cfg.get("name") or "?"
    if summary is not None:
        eval_mode = summary.get("eval_mode")
        top1, top5 = number(summary.get("val_top1_err")), number(summary.get("val_top5_err"))
    else:  # a run still going (or killed): its last validation
        eval_mode = eval_cfg.get("mode")
        last = next((m for m in reversed(metrics) if number(m.get("val/top1_err")) is not None), {})
        top1, top5 = number(last.get("val/top1_err")), number(last.get("val/top5_err"))
    return RunData(
        path=path,
        name=config.get("name") or str(path).rstrip("/").rsplit("/", 1)[-1],
        model=model,
        model_key=canonical_model(model, model_cfg.get("shortcut"), model_cfg.get("v1_5")),
        dataset=(config.get("data") or {}).get("dataset", "imagenet"),
        eval_mode=eval_mode,
        top1=top1,
        top5=top5,
        metrics=metrics,
        final=summary is not None,
        held_out=int((config.get("data") or {}).get("val_split") or 0),
        test_top1=number((summary or {}).get("test_top1_err")),
        test_top5=number((summary or {}).get("test_top5_err")),
    )


def fetch_wandb_runs(project_path: str, dest: Path, group: str | None = None) -> list[Path]:
    """Download runs of a W&B project into run directories that ``load_run`` reads.

    Needs network and credentials (``WANDB_API_KEY`` or ``wandb login``); untested offline.

    Args:
        project_path: ``ENTITY/PROJECT``.
        dest: folder to create ``<run name>/`` directories in.
        group: only runs of this W&B group (e.g. ``degradation-cifar10``).
    """
    import wandb

    api = wandb.Api()
    keys = ("epoch", "step", "train/top1_err", "train/top5_err", "val/top1_err", "val/top5_err")
    paths = []
    for run in api.runs(project_path, filters={"group": group} if group else None):
        path = dest / (run.name or run.id)
        run_dir = RunDir(str(path))
        config = {
            k: v.get("value", v) if isinstance(v, dict) and "value" in v else v for k, v in run.config.items()
        }
        run_dir.write_config(config)
        # Epoch rows only (the every-N-steps rows carry no error rates); wandb's own `_step`
        # is the global iteration when the training loop's `step` key is missing.
        rows = [
            {"step": row.get("_step"), **{k: row[k] for k in keys if row.get(k) is not None}}
            for row in run.scan_history()
            if row.get("train/top1_err") is not None or row.get("val/top1_err") is not None
        ]
        run_dir.write_metrics(rows)
        finals = {k: v for k, v in run.summary_metrics.items() if k.startswith("final/")}
        modes = [k.split("/")[1] for k in finals if k.split("/")[1] != "test"]
        if modes:  # the training loop's "final/<eval mode>/top1_err" summary keys (and "final/test/...")
            mode = modes[0]
            summary = {
                "model": (config.get("model") or {}).get("name"),
                "eval_mode": mode,
                "val_top1_err": finals.get(f"final/{mode}/top1_err"),
                "val_top5_err": finals.get(f"final/{mode}/top5_err"),
            }
            if "final/test/top1_err" in finals:
                summary["test_top1_err"] = finals["final/test/top1_err"]
                summary["test_top5_err"] = finals.get("final/test/top5_err")
            run_dir.write_summary(summary)
        paths.append(path)
    return paths
