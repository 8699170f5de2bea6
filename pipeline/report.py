"""Training curves and a results table against the paper, from run directories.

    python -m pipeline report --runs runs/cifar_plain20 runs/cifar_resnet20 --out runs/report
    python -m pipeline report --runs runs/resnet50 --out runs/report --x epoch
    python -m pipeline report --wandb my-team/resnet-pipeline --group degradation-cifar10 --out runs/report

Each run directory holds what the engine writes on rank 0: ``config.yaml`` (the resolved
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
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.rundir import RunDir

# ---------------------------------------------------------------- the paper's numbers


@dataclass(frozen=True)
class PaperResult:
    """One published error rate (percent) of He et al., "Deep Residual Learning" (2015)."""

    model: str  # canonical key, see canonical_model()
    eval: str  # "tencrop" | "multiscale" (ImageNet val) | "test" (CIFAR-10 test set)
    top1: float | None
    top5: float | None
    source: str  # where in the paper
    label: str  # the paper's own name for the network
    note: str = ""


# ImageNet 10-crop: Table 2 (top-1 only; all shortcuts option A) and Table 3 (top-1/top-5).
# ImageNet multi-scale fully-convolutional: Table 4 (single model, validation set).
# CIFAR-10 test error: Table 6 (no numbers for plain nets: the paper shows them in Fig. 6 only).
PAPER_RESULTS: tuple[PaperResult, ...] = (
    PaperResult("plain18", "tencrop", 27.94, None, "Table 2", "plain-18"),
    PaperResult("resnet18_a", "tencrop", 27.88, None, "Table 2", "ResNet-18 (A)"),
    PaperResult("plain34", "tencrop", 28.54, 10.02, "Table 3", "plain-34"),
    PaperResult("resnet34_a", "tencrop", 25.03, 7.76, "Table 3", "ResNet-34 A"),
    PaperResult("resnet34_b", "tencrop", 24.52, 7.46, "Table 3", "ResNet-34 B"),
    PaperResult("resnet34_c", "tencrop", 24.19, 7.40, "Table 3", "ResNet-34 C"),
    PaperResult("resnet50_b", "tencrop", 22.85, 6.71, "Table 3", "ResNet-50"),
    PaperResult("resnet101_b", "tencrop", 21.75, 6.05, "Table 3", "ResNet-101"),
    PaperResult("resnet152_b", "tencrop", 21.43, 5.71, "Table 3", "ResNet-152"),
    PaperResult("resnet34_b", "multiscale", 21.84, 5.71, "Table 4", "ResNet-34 B"),
    PaperResult("resnet34_c", "multiscale", 21.53, 5.60, "Table 4", "ResNet-34 C"),
    PaperResult("resnet50_b", "multiscale", 20.74, 5.25, "Table 4", "ResNet-50"),
    PaperResult("resnet101_b", "multiscale", 19.87, 4.60, "Table 4", "ResNet-101"),
    PaperResult("resnet152_b", "multiscale", 19.38, 4.49, "Table 4", "ResNet-152"),
    PaperResult("cifar_resnet20_a", "test", 8.75, None, "Table 6", "ResNet-20"),
    PaperResult("cifar_resnet32_a", "test", 7.51, None, "Table 6", "ResNet-32"),
    PaperResult("cifar_resnet44_a", "test", 7.17, None, "Table 6", "ResNet-44"),
    PaperResult("cifar_resnet56_a", "test", 6.97, None, "Table 6", "ResNet-56"),
    PaperResult(
        "cifar_resnet110_a", "test", 6.43, None, "Table 6", "ResNet-110", "best of 5; mean 6.61±0.16"
    ),
    PaperResult("cifar_resnet1202_a", "test", 7.93, None, "Table 6", "ResNet-1202"),
    *(
        PaperResult(f"cifar_plain{d}", "test", None, None, "Fig. 6", f"plain-{d}", "curves only")
        for d in (20, 32, 44, 56, 110)
    ),
)


def canonical_model(name: str, shortcut: str | None = None, v1_5: bool | None = None) -> str:
    """The paper-table key of a registered model with its config overrides applied.

    ``resnet34`` (option B by default) -> ``resnet34_b``; ``resnet34`` with ``model.shortcut=A``
    -> ``resnet34_a``; ``cifar_resnet56`` -> ``cifar_resnet56_a``; plain nets keep their name.
    ResNet-50 v1.5 gets a ``_v1_5`` suffix: it is not the paper's network. A name the registry
    does not know is returned as it is (it matches no paper row).

    Args:
        name: ``model.name`` from the config.
        shortcut: ``model.shortcut`` (None: the model's own option).
        v1_5: ``model.v1_5`` (None: the model's own choice).
    """
    from pipeline.models import model_spec

    try:
        spec = model_spec(name)
    except ValueError:
        return name
    prefix = "cifar_" if spec.family == "cifar" else ""
    if spec.plain:
        return f"{prefix}plain{spec.depth}"
    option = (shortcut or spec.shortcut).lower()
    newer = v1_5 if v1_5 is not None else spec.v1_5
    return f"{prefix}resnet{spec.depth}_{option}" + ("_v1_5" if newer else "")


def paper_eval(dataset: str, eval_mode: str | None) -> str | None:
    """The paper's evaluation that a run's final evaluation corresponds to, if any.

    Args:
        dataset: ``data.dataset`` ("imagenet" or "cifar10").
        eval_mode: the final evaluation's mode ("center", "tencrop", "multiscale").
    """
    if dataset == "cifar10":
        return "test"  # one view of the 32x32 image, whatever the mode is called
    return {"tencrop": "tencrop", "multiscale": "multiscale"}.get(eval_mode or "")


def paper_result(model_key: str, evaluation: str | None) -> PaperResult | None:
    """The ``PAPER_RESULTS`` entry for a canonical model and paper evaluation, or None.

    Args:
        model_key: from ``canonical_model``.
        evaluation: from ``paper_eval``.
    """
    for row in PAPER_RESULTS:
        if row.model == model_key and row.eval == evaluation:
            return row
    return None


# ---------------------------------------------------------------- reading runs


@dataclass
class RunData:
    """What the report needs from one run directory."""

    path: Path
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


def _num(value: Any) -> float | None:
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
        top1, top5 = _num(summary.get("val_top1_err")), _num(summary.get("val_top5_err"))
    else:  # a run still going (or killed): its last validation
        eval_mode = eval_cfg.get("mode")
        last = next((m for m in reversed(metrics) if _num(m.get("val/top1_err")) is not None), {})
        top1, top5 = _num(last.get("val/top1_err")), _num(last.get("val/top5_err"))
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
        test_top1=_num((summary or {}).get("test_top1_err")),
        test_top5=_num((summary or {}).get("test_top5_err")),
    )


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
        elif run.dataset == "cifar10":
            evaluation += f", {run.held_out} held out" if run.held_out else ", test"
        if not run.final:
            evaluation += " (last epoch)"
        lines.append(
            f"| {run.name} | {run.model} | {evaluation} | {_fmt(top1)} | {_fmt(top5)} | {_fmt(paper1)} "
            f"| {_fmt(paper5)} | {_diff(top1, paper1)} | {_diff(top5, paper5)} | {source} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- the figure

PANEL_SIZE_IN = (6.0, 4.5)  # inches per panel
DPI = 100


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
                    if _num(m.get(x)) is not None and _num(m.get(key)) is not None
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


# ---------------------------------------------------------------- W&B source (network only)


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
        # is the global iteration when the engine's `step` key is missing.
        rows = [
            {"step": row.get("_step"), **{k: row[k] for k in keys if row.get(k) is not None}}
            for row in run.scan_history()
            if row.get("train/top1_err") is not None or row.get("val/top1_err") is not None
        ]
        run_dir.write_metrics(rows)
        finals = {k: v for k, v in run.summary_metrics.items() if k.startswith("final/")}
        modes = [k.split("/")[1] for k in finals if k.split("/")[1] != "test"]
        if modes:  # the engine's "final/<eval mode>/top1_err" summary keys (and "final/test/...")
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


# ---------------------------------------------------------------- CLI


def build_report(run_dirs: list[Path], out: Path, x: str = "step") -> str:
    """Write ``curves.png`` and ``report.md`` into ``out``; returns the Markdown.

    Args:
        run_dirs: run directories to include, in order.
        out: output folder (created).
        x: "step" or "epoch" for the figure's x-axis.
    """
    from pipeline.report_seeds import has_seeds, plot_seed_curves, seed_groups, seeds_markdown

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
    parser.add_argument("--runs", nargs="+", type=Path, default=[], metavar="RUN_DIR", help="run directories")
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
        if args.kind == "construction":
            from pipeline.construction.report import build_construction_report

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
