"""The parts every W&B view here is built from: checked line plots, run filters, final-error
columns, and the plain-beside-residual report layout.

``pipeline.tracking.dashboard_views`` (training, degradation, ImageNet tables) and
``pipeline.construction.views`` both build on these, so neither needs the other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import wandb_workspaces.reports.v2 as wr

from pipeline.models.registry import REGISTRY
from pipeline.tracking.tracker import FINAL_SUMMARY_METRICS, LOGGED_METRICS

STEP = "Step"  # W&B's step: the training loop logs every row at the global iteration
FULL_WIDTH = wr.Layout(x=0, y=0, w=24, h=10)


def logged_metric(name: str) -> str:
    """A logged metric name; fails at build time on a name tracking does not know."""
    if name not in LOGGED_METRICS:
        raise KeyError(f"{name!r} is not a metric pipeline.tracking.tracker logs")
    return name


def line_plot(title: str, y: list[str], x: str = STEP, **options) -> wr.LinePlot:
    """A line plot of logged metrics, each name checked against what tracking logs."""
    return wr.LinePlot(
        title=title, x=x if x == STEP else logged_metric(x), y=[logged_metric(k) for k in y], **options
    )


def final_columns(modes: tuple[str, ...]) -> list[str]:
    """The run-table columns of the final evaluation in these modes (``center``, ``tencrop``, ...)."""
    return [f"summary:{k}" for k in FINAL_SUMMARY_METRICS if k.split("/")[1] in modes]


def group_filter(group: str | None) -> str:
    """Only the runs of one W&B group; no filter for None."""
    # The W&B group is tracking.group (pipeline.tracking.tracker passes it to wandb.init).
    return "" if group is None else f"Metric('Group') in ['{group}']"


def model_filter(plain: bool) -> str:
    """Only the runs of plain networks, or only those of residual ones."""
    names = sorted(name for name, spec in REGISTRY.items() if spec.plain == plain)
    return f"Config('model.value.name') in {names!r}"


def all_of(*filters: str) -> str:
    """The filters joined with ``and``; empty ones are left out."""
    return " and ".join(f for f in filters if f)


def plain_and_residual_report(
    entity: str, project: str, title: str, description: str, intro: str, grid: Callable[..., Any]
) -> wr.Report:
    """A report of the intro, then ``grid("plain", plain=True)`` and ``grid("residual", plain=False)``
    under their headings: the paper's figures put plain and residual networks side by side."""
    return wr.Report(
        entity=entity,
        project=project,
        title=title,
        description=description,
        width="fluid",
        blocks=[
            wr.MarkdownBlock(text=intro),
            wr.H2(text="Plain networks"),
            grid("plain", plain=True),
            wr.H2(text="Residual networks"),
            grid("residual", plain=False),
        ],
    )
