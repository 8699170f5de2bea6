"""The construction's W&B report (``python -m pipeline dashboard --kind construction``), beside the degradation one.

Per family (plain, residual) one chart of the training error in eval mode
(``train_eval/top1_err``) against iterations, with one runset per role, as ``make
construction`` tags them (``construction-constructed``, ``-scratch``, ``-continued``, and the
shallower net trained first, ``construction-shallow``), seeds of a role averaged with their
min-max band. ``python -m pipeline report --kind construction`` draws the same with the
shallower net's final error as a line, the table and the verdict.
"""

from __future__ import annotations

import wandb_workspaces.reports.v2 as wr

from pipeline.construction.experiment import GROUP
from pipeline.construction.report import ROLE_LABELS
from pipeline.tracking.view_parts import (
    FULL_WIDTH,
    all_of,
    final_columns,
    group_filter,
    line_plot,
    model_filter,
    plain_and_residual_report,
)


def construction_report(entity: str, project: str, group: str | None = None) -> wr.Report:
    """The three runs from the construction's start per family, and the shallower net, as W&B charts.

    Args:
        entity: W&B user or team.
        project: W&B project.
        group: the experiment's W&B group (default: ``construction-cifar10``).
    """
    group = group or GROUP

    def grid(family: str, plain: bool) -> wr.PanelGrid:
        runsets = [
            wr.Runset(
                entity=entity,
                project=project,
                name=f"{family}: {ROLE_LABELS[role]}",
                filters=all_of(
                    group_filter(group), model_filter(plain), f"Tags() in ['construction-{role}']"
                ),
                groupby=["config.model.name"],
                pinned_columns=[
                    "run:displayName",
                    "config:model.value.name",
                    "config:model.value.init_from",
                    *final_columns(("center", "test")),
                ],
            )  # fmt: skip
            for role in ("constructed", "scratch", "continued", "shallow")
        ]
        plot = line_plot(
            f"{family} networks: training error in eval mode (%)",
            ["train_eval/top1_err"],
            title_x="iterations (each run from step 0)",
            title_y="training error (%)",
            groupby=wr.Config("model.name"),
            groupby_aggfunc="mean",
            groupby_rangefunc="minmax",
            layout=FULL_WIDTH,
        )
        return wr.PanelGrid(runsets=runsets, panels=[plot])

    intro = (
        f"Runs of the W&B group `{group}` (`make construction`). He et al. (2015), Sec. 1: a deeper net "
        "built from a trained shallower one (copied layers, added identity blocks: `python -m pipeline "
        "deepen`) computes the same function, so it has no higher training error; the solver from scratch "
        "does worse. One runset per role: the deeper net from the construction, from scratch, the shallower "
        "net continued, and the shallower net as first trained (its last point is the line to stay under). "
        "`train_eval/top1_err` is the training error on the training images in eval mode; "
        "`python -m pipeline report --kind construction` adds the table over seeds and the verdict."
    )
    return plain_and_residual_report(
        entity, project, f"Construction: the deeper net from the shallower one ({group})",
        "The paper's constructed solution, trained from.", intro, grid,
    )  # fmt: skip
