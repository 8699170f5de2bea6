"""Training curves and a results table against the paper, from run directories.

    python -m pipeline report --runs runs/cifar_plain20 runs/cifar_resnet20 --out runs/report
    python -m pipeline report --runs runs/resnet50 --out runs/report --x epoch
    python -m pipeline report --wandb my-team/resnet-pipeline --group degradation-cifar10 --out runs/report

Each run directory holds what a training run writes on rank 0: ``config.yaml`` (the resolved
config), ``metrics.jsonl`` (one JSON object per epoch) and ``summary.json`` (the final
evaluation). Writes into ``--out``:

- ``curves.png``: error (%) against iterations (or epochs) in the style of the paper's
  Figures 4 and 6: thin dashed lines for training error, bold lines for validation error,
  one colour per run; plain and residual networks in separate panels, like the paper.
- ``report.md`` (also printed): each run's final top-1/top-5 error beside the paper's number
  for the same network and evaluation (``PAPER_RESULTS``), and the difference.

``--wandb ENTITY/PROJECT`` first downloads runs through ``wandb.Api`` into ``OUT/wandb-runs/``
in the same layout (needs network and an API key), then reports on them like local runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from pipeline.config import is_cifar
from pipeline.construction.report import build_construction_report
from pipeline.report.paper import paper_eval, paper_result
from pipeline.report.runs import DPI, PANEL_SIZE_IN, RunData, fetch_wandb_runs, load_run, number

# ---------------------------------------------------------------- the table


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _diff(ours: float | None, paper: float | None) -> str:
    return "-" if ours is None or paper is None else f"{ours - paper:+.2f}"


def results_table(runs: list[RunData]) -> str:
    """A Markdown table: each run's final errors, the paper's for the same model and evaluation.

    Args:
        runs: loaded runs, in the order to list them.
    """
    lines = [
        "| run | model | eval | top-1 err | top-5 err | paper top-1 | paper top-5 | Δ top-1 | Δ top-5 | paper |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in runs:
        ref = paper_result(run.model_key, paper_eval(run.dataset, run.eval_mode))
        paper1, paper5 = (ref.top1, ref.top5) if ref else (None, None)
        source = "-"
        if ref is not None:
            source = f"{ref.label}, {ref.source}" + (f" ({ref.note})" if ref.note else "")
        evaluation, top1, top5 = run.eval_mode or "-", run.top1, run.top5
        if run.test_top1 is not None:  # the test set, scored besides the held-out validation
            evaluation, top1, top5 = (
                f"{evaluation}, test ({run.held_out} held out for val)",
                run.test_top1,
                run.test_top5,
            )
        elif is_cifar(run.dataset):
            evaluation += f", {run.held_out} held out" if run.held_out else ", test"
        if not run.final:
            evaluation += " (last epoch)"
        lines.append(
            f"| {run.name} | {run.model} | {evaluation} | {_fmt(top1)} | {_fmt(top5)} | {_fmt(paper1)} "
            f"| {_fmt(paper5)} | {_diff(top1, paper1)} | {_diff(top5, paper5)} | {source} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- the figure


def plot_curves(runs: list[RunData], out: str | Path, x: str = "step") -> Path:
    """Error (%) against iterations or epochs, like the paper's Figures 4 and 6.

    Thin dashed lines are training error, bold lines validation error; one colour per run.
    Plain and residual networks go in separate panels (the paper's left and right plots).

    Args:
        runs: loaded runs.
        out: the PNG path to write.
        x: "step" (iterations, the paper's x-axis) or "epoch".
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    groups = [g for g in ([r for r in runs if r.plain], [r for r in runs if not r.plain]) if g]
    if not groups:
        groups = [[]]
    size = (PANEL_SIZE_IN[0] * len(groups), PANEL_SIZE_IN[1])
    fig, axes = plt.subplots(1, len(groups), figsize=size, dpi=DPI, sharey=True, squeeze=False)
    colours = plt.get_cmap("tab10").colors
    scale = (
        1e4
        if x == "step" and max((m.get("step", 0) or 0 for r in runs for m in r.metrics), default=0) >= 1e4
        else 1
    )
    top = 0.0
    for ax, group in zip(axes[0], groups, strict=True):
        for run in group:
            colour = colours[runs.index(run) % len(colours)]
            for key, style in (
                ("train/top1_err", dict(lw=1.0, ls="--")),
                ("val/top1_err", dict(lw=2.2, ls="-")),
            ):
                points = [
                    (m[x] / scale, m[key])
                    for m in run.metrics
                    if number(m.get(x)) is not None and number(m.get(key)) is not None
                ]
                if not points:
                    continue
                xs, ys = zip(*points, strict=True)
                top = max(top, *ys)
                label = run.label if key == "val/top1_err" else None
                ax.plot(xs, ys, color=colour, label=label, **style)
        family = "plain" if group and group[0].plain else "ResNet" if group else ""
        ax.set_title(f"{family} networks" if family else "")
        ax.set_xlabel("iter. (1e4)" if scale == 1e4 else "iterations" if x == "step" else "epochs")
        ax.grid(True, alpha=0.3)
        if any(ax.get_legend_handles_labels()[1]):
            ax.legend(fontsize="small", title="dashed: train, bold: val", title_fontsize="small")
    axes[0][0].set_ylabel("error (%)")
    axes[0][0].set_ylim(0, top * 1.05 if top > 0 else 100)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)  # no bbox_inches="tight": each panel stays PANEL_SIZE_IN x DPI pixels
    plt.close(fig)
    return out


# ---------------------------------------------------------------- CLI


def build_report(run_dirs: list[Path], out: Path, x: str = "step") -> str:
    """Write ``curves.png`` and ``report.md`` into ``out``; returns the Markdown.

    Args:
        run_dirs: run directories to include, in order.
        out: output folder (created).
        x: "step" or "epoch" for the figure's x-axis.
    """
    from pipeline.report.seeds import has_seeds, plot_seed_curves, seed_groups, seeds_markdown

    runs = [load_run(p) for p in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    seeds = has_seeds(runs)  # several runs of a network: mean curves, spreads and the verdict
    if seeds:
        png = plot_seed_curves(seed_groups(runs), out / "curves.png", x=x)
    else:
        png = plot_curves(runs, out / "curves.png", x=x)
    text = "\n".join(
        [
            "# Results against He et al. (2015)",
            "",
            *(seeds_markdown(runs, png.name) + ["## Each run", ""] if seeds else []),
            results_table(runs),
            "",
            "Errors in %. Paper numbers: ImageNet val 10-crop (Tables 2, 3) or multi-scale (Table 4); "
            "CIFAR-10 test set (Table 6; a run with data.val_split > 0 shows its test-set score, or, without one, "
            "its held-out training images, so its Δ is indicative only). Δ = ours − paper. '-': the paper has no number for that "
            "network and evaluation.",
            "",
            *([] if seeds else [f"![training curves]({png.name})", ""]),
        ]
    )
    (out / "report.md").write_text(text)
    return text


def main(argv: list[str]) -> int:
    """``python -m pipeline report``: figure and table from run directories (and/or W&B).

    Args:
        argv: command-line arguments after ``report``.
    """
    parser = argparse.ArgumentParser(prog="python -m pipeline report", description=__doc__.split("\n\n")[0])
    # Strings, not Paths: Path("s3://bucket/run") would become "s3:/bucket/run".
    parser.add_argument(
        "--runs", nargs="+", default=[], metavar="RUN_DIR", help="run directories (local or s3:// / gs://)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="where curves.png and report.md go"
    )
    parser.add_argument("--x", choices=("step", "epoch"), default="step", help="x-axis of the figure")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read runs from W&B (needs network)")
    parser.add_argument("--group", help="with --wandb: only runs of this W&B group")
    parser.add_argument(
        "--kind",
        choices=("paper", "construction"),
        default="paper",
        help="paper: curves and table against the paper; construction: `make construction`'s runs "
        "(pipeline.construction.report)",
    )
    args = parser.parse_args(argv)
    run_dirs = list(args.runs)
    if args.wandb:
        run_dirs += fetch_wandb_runs(args.wandb, args.out / "wandb-runs", group=args.group)
    if not run_dirs:
        parser.error("give --runs RUN_DIR... and/or --wandb ENTITY/PROJECT")
    try:
        # The command picks the kind: construction/ owns its report and reads runs through
        # pipeline.report.runs, so this module is the only one that knows both.
        if args.kind == "construction":
            text = build_construction_report(run_dirs, args.out)
        else:
            text = build_report(run_dirs, args.out, x=args.x)
    except (FileNotFoundError, json.JSONDecodeError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    figures = "the construction-*.png figures" if args.kind == "construction" else args.out / "curves.png"
    print(f"wrote {args.out / 'report.md'} and {figures}")
    return 0
