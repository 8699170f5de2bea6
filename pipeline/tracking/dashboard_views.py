"""The W&B dashboards of ``python -m pipeline dashboard``, as ``wandb-workspaces`` objects.

    view = build("degradation", entity="my-team", project="resnet-pipeline", group="degradation-cifar10")

- ``training``: a workspace (the project page's saved view) with error, loss, lr, throughput,
  data wait, epoch time, GPU memory, world size and global batch; runs grouped by W&B group
  (= ``tracking.group``), or only the runs of ``group``, one line each.
- ``degradation``: a report in the style of the paper's Figure 6: plain and residual networks in
  separate charts, training and test error against iterations, one colour per network, the
  seeds of one network averaged with their min-max band.
- ``imagenet-tables``: a report with the runs' final 10-crop / multi-scale top-1 and top-5
  errors in the runs table, next to the paper's numbers (``pipeline.report.paper.PAPER_RESULTS``).

Building needs no network; ``pipeline.tracking.dashboard`` serialises, checks every key against
``pipeline.tracking.tracker``'s metric lists, and saves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws

from pipeline.models.registry import REGISTRY
from pipeline.report.paper import PAPER_RESULTS
from pipeline.tracking.tracker import FINAL_SUMMARY_METRICS, LOGGED_METRICS

DEGRADATION_GROUP = "degradation-cifar10"  # what `make degradation` sets (mk/experiments.mk)
STEP = "Step"  # W&B's step: the training loop logs every row at the global iteration
FULL_WIDTH = wr.Layout(x=0, y=0, w=24, h=10)


def _m(name: str) -> str:
    """A logged metric name; fails at build time on a name tracking does not know."""
    if name not in LOGGED_METRICS:
        raise KeyError(f"{name!r} is not a metric pipeline.tracking.tracker logs")
    return name


def _line(title: str, y: list[str], x: str = STEP, **options) -> wr.LinePlot:
    return wr.LinePlot(title=title, x=x if x == STEP else _m(x), y=[_m(k) for k in y], **options)


def _final_columns(modes: tuple[str, ...]) -> list[str]:
    return [f"summary:{k}" for k in FINAL_SUMMARY_METRICS if k.split("/")[1] in modes]


def _group_filter(group: str | None) -> str:
    # The W&B group is tracking.group (pipeline.tracking.tracker passes it to wandb.init).
    return "" if group is None else f"Metric('Group') in ['{group}']"


def _and(*filters: str) -> str:
    return " and ".join(f for f in filters if f)


def training_workspace(entity: str, project: str, group: str | None = None) -> ws.Workspace:
    """The workspace to watch training runs in.

    Args:
        entity: W&B user or team.
        project: W&B project (``tracking.project``).
        group: only this W&B group, one line per run; None: every run, grouped by W&B group.
    """
    epoch = "epoch"
    sections = [
        ws.Section(
            name="Error (%)",
            is_open=True,
            panels=[
                _line("top-1 error: train and val", ["train/top1_err", "val/top1_err"], x=epoch),
                _line("top-5 error: train and val", ["train/top5_err", "val/top5_err"], x=epoch),
                # The training images in eval mode (eval.train_eval; CIFAR-10 runs by default).
                _line(
                    "training error in eval mode: top-1, top-5",
                    ["train_eval/top1_err", "train_eval/top5_err"],
                    x=epoch,
                ),  # fmt: skip
            ],
        ),
        ws.Section(
            name="Loss",
            is_open=True,
            panels=[
                _line("training loss (every logged step)", ["train/step_loss"]),
                _line(
                    "loss per epoch: train and val", ["train/loss", "train_eval/loss", "val/loss"], x=epoch
                ),
            ],
        ),
        ws.Section(
            name="Schedule and throughput",
            is_open=True,
            panels=[
                _line("learning rate", ["lr"], log_y=True),
                _line("images/s (global)", ["img_per_s"]),
                # Above ~0.1 the input pipeline is the bottleneck (docs/wandb.md).
                _line("data-wait fraction of the epoch", ["data_wait_frac"], x=epoch, range_y=(0, 1)),
                _line("epoch time (s)", ["epoch_time_s"], x=epoch),
            ],
        ),
        ws.Section(
            name="Memory and scale",
            is_open=True,
            panels=[
                _line("GPU memory, peak allocated (GiB; GPU runs)", ["gpu_mem_gb"], x=epoch),
                _line("world size (runs that log it)", ["world_size"], x=epoch),
                _line("global batch (runs that log it)", ["global_batch"], x=epoch),
            ],
        ),
    ]
    columns = [
        "run:displayName",
        "config:model.value.name",
        "config:tracking.value.group",
        "config:derived.value.world_size",
        "config:optim.value.batch_size",
        *_final_columns(("center", "tencrop", "multiscale", "test")),
    ]
    return ws.Workspace(
        entity=entity,
        project=project,
        name=f"Training: {group}" if group else "Training",
        sections=sections,
        settings=ws.WorkspaceSettings(x_axis=STEP, max_runs=20),
        runset_settings=ws.RunsetSettings(
            filters=_group_filter(group),
            groupby=[] if group else [ws.Metric("Group")],
            pinned_columns=columns,
        ),
    )


def _model_filter(plain: bool) -> str:
    names = sorted(name for name, spec in REGISTRY.items() if spec.plain == plain)
    return f"Config('model.value.name') in {names!r}"


def degradation_report(entity: str, project: str, group: str | None = None) -> wr.Report:
    """The paper's Figure 6 as a report: plain vs residual, training and test error against iterations.

    Args:
        entity: W&B user or team.
        project: W&B project.
        group: the experiment's W&B group (default: ``degradation-cifar10``).
    """
    group = group or DEGRADATION_GROUP

    def grid(family: str, plain: bool) -> wr.PanelGrid:
        runset = wr.Runset(
            entity=entity,
            project=project,
            name=f"{family} networks",
            filters=_and(_group_filter(group), _model_filter(plain)),
            # One line (and colour) per network; several seeds of it become their mean and band.
            groupby=["config.model.name"],
            pinned_columns=[
                "run:displayName",
                "config:model.value.name",
                *_final_columns(("center", "test")),
            ],
        )
        plot = _line(
            f"{family} networks: training and test error (%)",
            ["train/top1_err", "val/top1_err"],
            range_y=(0, 20),  # the paper's y-range
            title_x="iterations",
            title_y="error (%)",
            groupby=wr.Config("model.name"),
            groupby_aggfunc="mean",
            groupby_rangefunc="minmax",
            layout=FULL_WIDTH,
        )
        return wr.PanelGrid(runsets=[runset], panels=[plot])

    intro = (
        f"Runs of the W&B group `{group}` (`make degradation`). He et al. (2015), Sec. 4.2 and "
        "Fig. 6: plain-56 has *higher* training and test error than plain-20 (the degradation "
        "problem), while ResNet-56 beats ResNet-20. `train/top1_err` is the training error of "
        "each epoch, `val/top1_err` the test error. W&B styles lines per run id, so training "
        "lines cannot be set thin and dashed before the runs exist (edit the panel to style "
        "them); `python -m pipeline report` draws the same figure as a PNG in the paper's style."
    )
    return plain_and_residual_report(
        entity, project, f"Degradation: plain vs residual ({group})", "The paper's Figure 6 from this project's runs.",
        intro, grid,
    )  # fmt: skip


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


def paper_table() -> str:
    """The paper's ImageNet validation errors (10-crop and multi-scale) as a Markdown table."""
    lines = [
        "| network (paper) | our key | evaluation | top-1 err | top-5 err | source |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    for r in PAPER_RESULTS:
        if r.eval in ("tencrop", "multiscale"):
            top5 = "-" if r.top5 is None else f"{r.top5:.2f}"
            lines.append(f"| {r.label} | `{r.model}` | {r.eval} | {r.top1:.2f} | {top5} | {r.source} |")
    return "\n".join(lines)


def imagenet_tables_report(entity: str, project: str, group: str | None = None) -> wr.Report:
    """Final 10-crop / multi-scale errors of the ImageNet runs next to the paper's numbers.

    Args:
        entity: W&B user or team.
        project: W&B project.
        group: only runs of this W&B group (e.g. ``imagenet-table3``); None: every ImageNet run.
    """
    runset = wr.Runset(
        entity=entity,
        project=project,
        name=f"ImageNet runs ({group})" if group else "ImageNet runs",
        filters=_and(_group_filter(group), "Config('data.value.dataset') in ['imagenet']"),
        pinned_columns=[
            "run:displayName",
            "config:model.value.name",
            "config:model.value.shortcut",
            *_final_columns(("tencrop", "multiscale")),
        ],
        lock_columns=True,
    )
    intro = (
        "The runs table below lists each run's final evaluation (`final/<mode>/top1_err`, "
        "`final/<mode>/top5_err`, set at the end of a run; `eval.final_mode` picks the mode). "
        "The paper's numbers follow; `our key` is the network with its shortcut option "
        "(`resnet34_b` = `model.name=resnet34`, option B). `python -m pipeline report` "
        "computes the differences run by run."
    )
    return wr.Report(
        entity=entity,
        project=project,
        title="ImageNet: final errors vs the paper" + (f" ({group})" if group else ""),
        description="He et al. (2015), Tables 2-4, against this project's runs.",
        width="fluid",
        blocks=[
            wr.MarkdownBlock(text=intro),
            wr.PanelGrid(runsets=[runset], panels=[wr.RunComparer(diff_only="split", layout=FULL_WIDTH)]),
            wr.H2(text="He et al. (2015): ImageNet validation error (%)"),
            wr.MarkdownBlock(text=paper_table()),
        ],
    )


def build(kind: str, entity: str, project: str, group: str | None = None) -> ws.Workspace | wr.Report:
    """The dashboard of one kind (``pipeline.tracking.dashboard.KINDS``)."""
    builders = {
        "training": training_workspace,
        "degradation": degradation_report,
        "imagenet-tables": imagenet_tables_report,
    }
    if kind == "construction":  # make construction's report, beside the degradation one
        from pipeline.construction.views import construction_report

        return construction_report(entity, project, group)
    return builders[kind](entity, project, group)
