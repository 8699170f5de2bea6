"""The W&B dashboards of ``python -m pipeline dashboard``, as ``wandb-workspaces`` objects.

    view = degradation_report(entity="my-team", project="resnet-pipeline", group="degradation-cifar10")

- ``training``: a workspace (the project page's saved view) with error, loss, lr, throughput,
  data wait, epoch time, where the step's time goes (stalls, step time, MFU), GPU memory, world
  size and global batch; runs grouped by W&B group
  (= ``tracking.group``), or only the runs of ``group``, one line each.
- ``degradation``: a report in the style of the paper's Figure 6: plain and residual networks in
  separate charts, training and test error against iterations, one colour per network, the
  seeds of one network averaged with their min-max band.
- ``imagenet-tables``: a report with the runs' final 10-crop / multi-scale top-1 and top-5
  errors in the runs table, next to the paper's numbers (``pipeline.report.paper.PAPER_RESULTS``).

The construction's report is built by ``pipeline.construction.views`` from the same parts
(``pipeline.tracking.view_parts``). Building needs no network; ``pipeline.tracking.dashboard``
picks the kind, serialises, checks every key against ``pipeline.tracking.tracker``'s metric
lists, and saves.
"""

from __future__ import annotations

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws

from pipeline.report.paper import PAPER_RESULTS
from pipeline.tracking.view_parts import (
    FULL_WIDTH,
    STEP,
    all_of,
    final_columns,
    group_filter,
    line_plot,
    model_filter,
    plain_and_residual_report,
)

DEGRADATION_GROUP = "degradation-cifar10"  # what `make degradation` sets (mk/experiments.mk)


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
                line_plot("top-1 error: train and val", ["train/top1_err", "val/top1_err"], x=epoch),
                line_plot("top-5 error: train and val", ["train/top5_err", "val/top5_err"], x=epoch),
                # The training images in eval mode (eval.train_eval; CIFAR-10 runs by default).
                line_plot(
                    "training error in eval mode: top-1, top-5",
                    ["train_eval/top1_err", "train_eval/top5_err"],
                    x=epoch,
                ),  # fmt: skip
                # The EMA of the weights beside them (optim.ema_decay).
                line_plot(
                    "val error: weights and their EMA",
                    ["val/top1_err", "val/ema_top1_err", "val/top5_err", "val/ema_top5_err"],
                    x=epoch,
                ),
            ],
        ),
        ws.Section(
            name="Loss",
            is_open=True,
            panels=[
                line_plot("training loss (every logged step)", ["train/step_loss"]),
                line_plot(
                    "loss per epoch: train and val",
                    ["train/loss", "train_eval/loss", "val/loss", "val/ema_loss"],
                    x=epoch,
                ),
            ],
        ),
        ws.Section(
            name="Schedule and throughput",
            is_open=True,
            panels=[
                line_plot("learning rate", ["lr"], log_y=True),
                line_plot("images/s (global)", ["img_per_s"]),
                # Above ~0.1 the input pipeline is the bottleneck (docs/wandb.md).
                line_plot("data-wait fraction of the epoch", ["data_wait_frac"], x=epoch, range_y=(0, 1)),
                line_plot("epoch time (s)", ["epoch_time_s"], x=epoch),
            ],
        ),
        ws.Section(
            name="Where the time goes",
            is_open=True,
            # Rank 0's own step timings (pipeline.train.step_time), per logged step and per epoch.
            panels=[
                line_plot(
                    "stalls: data wait and checkpoint block (% of training time)",
                    ["perf/data_stall_pct", "perf/checkpoint_stall_pct"],
                    range_y=(0, 100),
                ),
                line_plot(
                    "seconds since the previous row: data wait, step work, checkpoint block",
                    ["perf/data_wait_s", "perf/compute_s", "perf/checkpoint_block_s"],
                ),
                line_plot("seconds per step", ["perf/step_s"]),
                line_plot("images/s per worker", ["perf/img_per_s_per_worker"]),
                line_plot("MFU (GPU runs on a known device)", ["perf/mfu"], range_y=(0, 1)),
                line_plot("GPU memory, peak allocated (GiB; GPU runs)", ["perf/peak_mem_gb"]),
            ],
        ),
        ws.Section(
            name="What object storage cost",
            is_open=False,
            # Shards read from a bucket only (pipeline.train.fetch_figures), summed over the ranks.
            panels=[
                line_plot("GETs retried (503 SlowDown, 5xx, resets, stalls)", ["data/get_retries"], x=epoch),
                line_plot("seconds of fetch backoff", ["data/fetch_wait_s"], x=epoch),
                line_plot("bytes fetched", ["data/bytes_fetched"], x=epoch),
                line_plot(
                    "shard reads served by the node's cache", ["data/cache_hit_rate"], x=epoch, range_y=(0, 1)
                ),
            ],
        ),
        ws.Section(
            name="Memory and scale",
            is_open=True,
            panels=[
                line_plot("GPU memory, peak allocated (GiB; GPU runs)", ["gpu_mem_gb"], x=epoch),
                line_plot("world size (runs that log it)", ["world_size"], x=epoch),
                line_plot("global batch (runs that log it)", ["global_batch"], x=epoch),
                line_plot("training crop, px (runs that log it)", ["train/crop_px"], x=epoch),
            ],
        ),
    ]
    columns = [
        "run:displayName",
        "config:model.value.name",
        "config:tracking.value.group",
        "config:derived.value.world_size",
        "config:optim.value.batch_size",
        *final_columns(("center", "tencrop", "multiscale", "test")),
    ]
    return ws.Workspace(
        entity=entity,
        project=project,
        name=f"Training: {group}" if group else "Training",
        sections=sections,
        settings=ws.WorkspaceSettings(x_axis=STEP, max_runs=20),
        runset_settings=ws.RunsetSettings(
            filters=group_filter(group),
            groupby=[] if group else [ws.Metric("Group")],
            pinned_columns=columns,
        ),
    )


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
            filters=all_of(group_filter(group), model_filter(plain)),
            # One line (and colour) per network; several seeds of it become their mean and band.
            groupby=["config.model.name"],
            pinned_columns=[
                "run:displayName",
                "config:model.value.name",
                *final_columns(("center", "test")),
            ],
        )
        plot = line_plot(
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
        filters=all_of(group_filter(group), "Config('data.value.dataset') in ['imagenet']"),
        pinned_columns=[
            "run:displayName",
            "config:model.value.name",
            "config:model.value.shortcut",
            *final_columns(("tencrop", "multiscale")),
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
