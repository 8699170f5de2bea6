"""The report for several seeds per network: mean curves with bands, mean ± std, and the verdict.

``pipeline.report.single`` switches to this when some network has more than one run (``make
degradation SEEDS=k``). Runs are grouped by network (the paper-table key of the model, so
``cifar_resnet56`` with its seeds is one group). Per network:

- the figure (``curves.png``): the mean over seeds of the training error (thin, dashed) and
  the test error (bold) against iterations, each with a band from the lowest to the highest
  seed, plain and residual networks in separate panels as in the paper's Figure 6;
- the table: mean ± std (sample std over seeds) and min-max of the final test error, the
  number of seeds, the paper's number, and the final training error likewise;
- the verdict: for each family, every deeper network against the shallowest (plain-56 against
  plain-20, ResNet-56 against ResNet-20): the paper's claim (deeper plain nets end with
  *higher* training error, deeper ResNets with *lower* error), the margin between the means and
  its spread (the standard error of a difference of two means, sqrt(s1²/n1 + s2²/n2)), and
  whether the claim holds, clearly (margin beyond 2 spreads) or within the noise.

"Final test error" is ``test_top1_err`` from summary.json when the run scored a separate test
set (CIFAR-10 with ``data.val_split``), else the final validation error (the test set itself
when CIFAR-10 runs without a split). "Final training error" is the last epoch's
``train/top1_err`` (the running error over the epoch's augmented batches, the paper's
training curves).
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from pipeline.report.paper import paper_eval, paper_result
from pipeline.report.runs import DPI, PANEL_SIZE_IN, RunData


@dataclass(frozen=True)
class Spread:
    """A value over seeds."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}" if self.std is not None else f"{self.mean:.2f}"


def seed_groups(runs: list[RunData]) -> dict[str, list[RunData]]:
    """Runs by network (canonical model key), in the order the networks first appear."""
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        groups.setdefault(run.model_key, []).append(run)
    return groups


def has_seeds(runs: list[RunData]) -> bool:
    """Whether some network has more than one run (then this module's report applies)."""
    return any(len(g) > 1 for g in seed_groups(runs).values())


def final_test_err(run: RunData) -> float | None:
    return run.test_top1 if run.test_top1 is not None else run.top1


def final_train_err(run: RunData) -> float | None:
    for row in reversed(run.metrics):
        value = row.get("train/top1_err")
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return None


def _spread(values: list[float | None]) -> Spread | None:
    kept = tuple(v for v in values if v is not None)
    return Spread(kept) if kept else None


def _fmt(s: Spread | None) -> str:
    return "-" if s is None else str(s)


def _range(s: Spread | None) -> str:
    return "-" if s is None else f"{min(s.values):.2f}-{max(s.values):.2f}"


def _depth(key: str) -> int:
    match = re.search(r"(\d+)", key)
    return int(match.group(1)) if match else 0


def seeds_table(groups: dict[str, list[RunData]]) -> str:
    """Markdown: per network the final test and training errors over seeds, beside the paper's."""

    lines = [
        "| network | seeds | final test err (mean ± std) | min-max | final train err (mean ± std) | paper | Δ mean |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, runs in groups.items():
        test = _spread([final_test_err(r) for r in runs])
        train = _spread([final_train_err(r) for r in runs])
        ref = paper_result(key, paper_eval(runs[0].dataset, runs[0].eval_mode))
        paper = ref.top1 if ref is not None else None
        delta = f"{test.mean - paper:+.2f}" if test is not None and paper is not None else "-"
        paper_cell = "-" if paper is None else f"{paper:.2f} ({ref.source})"
        unfinished = sum(not r.final for r in runs)
        seeds = f"{len(runs)}" + (f" ({unfinished} unfinished)" if unfinished else "")
        lines.append(
            f"| {runs[0].model} | {seeds} | {_fmt(test)} | {_range(test)} | {_fmt(train)} | {paper_cell} | {delta} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Comparison:
    """One row of the verdict: a deeper network against the shallowest of its family."""

    deeper: str
    shallower: str
    measure: str  # "training" | "test"
    claim: str  # "higher" | "lower": what the paper says the deeper one ends with
    a: Spread | None
    b: Spread | None

    @property
    def margin(self) -> float | None:
        return None if self.a is None or self.b is None else self.a.mean - self.b.mean

    @property
    def spread(self) -> float | None:
        if self.a is None or self.b is None or self.a.std is None or self.b.std is None:
            return None
        return math.sqrt(self.a.std**2 / self.a.n + self.b.std**2 / self.b.n)

    @property
    def holds(self) -> bool | None:
        if self.margin is None:
            return None
        return self.margin > 0 if self.claim == "higher" else self.margin < 0

    @property
    def verdict(self) -> str:
        if self.holds is None:
            return "no data"
        if not self.holds:
            return "does not hold"
        if self.spread is None:
            return "holds (one seed: no spread)"
        return (
            "holds, clearly (margin > 2 spreads)"
            if abs(self.margin) > 2 * self.spread
            else "holds, within noise"
        )


def comparisons(groups: dict[str, list[RunData]]) -> list[Comparison]:
    """Each family's deeper networks against its shallowest, in training and test error."""
    rows = []
    for plain in (True, False):
        family = sorted((k for k, g in groups.items() if g[0].plain == plain), key=_depth)
        claim = "higher" if plain else "lower"
        for deeper in family[1:]:
            for measure, final in (("training", final_train_err), ("test", final_test_err)):
                rows.append(
                    Comparison(
                        groups[deeper][0].model,
                        groups[family[0]][0].model,
                        measure,
                        claim,
                        _spread([final(r) for r in groups[deeper]]),
                        _spread([final(r) for r in groups[family[0]]]),
                    )
                )
    return rows


def verdict_table(rows: list[Comparison]) -> str:
    lines = [
        "| deeper | shallower | final error | paper: deeper ends | deeper | shallower | margin ± spread | verdict |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for c in rows:
        margin = (
            "-"
            if c.margin is None
            else f"{c.margin:+.2f}" + (f" ± {c.spread:.2f}" if c.spread is not None else "")
        )
        lines.append(
            f"| {c.deeper} | {c.shallower} | {c.measure} | {c.claim} | {_fmt(c.a)} | {_fmt(c.b)} | {margin} | {c.verdict} |"
        )
    return "\n".join(lines)


def verdict_summary(rows: list[Comparison]) -> list[str]:
    """The two claims of Figure 6 in words, for each pair present."""
    claims = {
        ("higher", "training"): "Degradation ({deeper} ends with higher training error than {shallower})",
        ("lower", "test"): "Residual learning ({deeper} ends with lower test error than {shallower})",
    }
    out = []
    for c in rows:
        if (claim := claims.get((c.claim, c.measure))) is None:
            continue
        margin = f", margin {c.margin:+.2f} points" if c.margin is not None else ""
        spread = f" ± {c.spread:.2f}" if c.spread is not None else ""
        out.append(f"- {claim.format(deeper=c.deeper, shallower=c.shallower)}: {c.verdict}{margin}{spread}.")
    return out


def mean_curve(
    runs: list[RunData], key: str, x: str = "step"
) -> tuple[list[float], list[float], list[float], list[float]]:
    """(xs, mean, min, max) of ``key`` over the runs, at the x values every run has."""
    series = []
    for run in runs:
        points = {}
        for row in run.metrics:
            xv, yv = row.get(x), row.get(key)
            if isinstance(xv, (int, float)) and isinstance(yv, (int, float)) and math.isfinite(yv):
                points[float(xv)] = float(yv)
        series.append(points)
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    values = [[s[v] for s in series] for v in common]
    return common, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot_seed_curves(groups: dict[str, list[RunData]], out: str | Path, x: str = "step") -> Path:
    """Figure 6 with seeds: per network the mean curve and its min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    keys = list(groups)
    panels = [
        p for p in ([k for k in keys if groups[k][0].plain], [k for k in keys if not groups[k][0].plain]) if p
    ]
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(PANEL_SIZE_IN[0] * len(panels), PANEL_SIZE_IN[1]),
        dpi=DPI,
        sharey=True,
        squeeze=False,
    )
    colours = plt.get_cmap("tab10").colors
    last = max((r.metrics[-1].get(x, 0) or 0 for g in groups.values() for r in g if r.metrics), default=0)
    scale = 1e4 if x == "step" and last >= 1e4 else 1
    top = 0.0
    for ax, panel in zip(axes[0], panels, strict=True):
        for key in panel:
            runs = groups[key]
            colour = colours[keys.index(key) % len(colours)]
            for metric, style, alpha in (
                ("train/top1_err", dict(lw=1.0, ls="--"), 0.10),
                ("val/top1_err", dict(lw=2.2), 0.20),
            ):
                xs, mean, lo, hi = mean_curve(runs, metric, x)
                if not xs:
                    continue
                xs = [v / scale for v in xs]
                top = max(top, *hi)
                label = f"{runs[0].model} ({len(runs)} seeds)" if metric == "val/top1_err" else None
                ax.plot(xs, mean, color=colour, label=label, **style)
                ax.fill_between(xs, lo, hi, color=colour, alpha=alpha, lw=0)
        ax.set_title(("plain" if groups[panel[0]][0].plain else "ResNet") + " networks")
        ax.set_xlabel("iter. (1e4)" if scale == 1e4 else "iterations" if x == "step" else "epochs")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(
                fontsize="small", title="dashed: train, bold: test; band: min-max", title_fontsize="small"
            )
    axes[0][0].set_ylabel("error (%)")
    axes[0][0].set_ylim(0, top * 1.05 if top > 0 else 100)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def seeds_markdown(runs: list[RunData], png_name: str) -> list[str]:
    """The report's lines for several seeds: table, verdict, figure."""
    groups = seed_groups(runs)
    rows = comparisons(groups)
    held = any(r.held_out and r.test_top1 is None for r in runs)
    lines: list[str] = [
        "## Several seeds per network",
        "",
        seeds_table(groups),
        "",
        "Errors in %, over seeds: mean ± sample std, min-max. Test error: the CIFAR-10 test set "
        "(summary.json's test_top1_err, or the final validation when validation is the test set)"
        + ("; some runs only scored held-out training images, so their 'test' is validation" if held else "")
        + ". Training error: the last epoch's running error on augmented batches. Δ = mean − paper.",
        "",
    ]
    if rows:
        lines += [
            "## Verdict",
            "",
            *verdict_summary(rows),
            "",
            verdict_table(rows),
            "",
            "Margin = mean(deeper) − mean(shallower), in points; spread = sqrt(s1²/n1 + s2²/n2), the standard "
            "error of that difference over seeds. The paper (Fig. 6) says deeper plain networks end *higher* in "
            "training and test error, deeper ResNets *lower*.",
            "",
        ]
    lines += [f"![mean training (dashed) and test (bold) error over seeds, min-max bands]({png_name})", ""]
    return lines
