"""The construction's report: what the solver does from the constructed solution.

    python -m pipeline report --kind construction --runs $(python -m pipeline construction --list ...) --out DIR

Each run's role comes from its own config, not from its name: within a family (plain or
residual, CIFAR or ImageNet) the shallowest network trained without ``model.init_from`` is the
*shallower net* (stage 1), the same network with ``init_from`` is it *continued*, a deeper one
with ``init_from`` is *from the construction*, a deeper one without is *from scratch*.

Per family, into ``--out``:

- ``construction-<family>.png``: the training error in eval mode (``train_eval/top1_err``, the
  training images without augmentation, BN in eval mode: the quantity the paper's argument is
  about) of the three runs against iterations, mean over seeds with a min-max band, their
  running training error (``train/top1_err``, augmented batches, BN in training mode) thin and
  dashed, and the shallower net's final training error (eval mode) as a horizontal line;
- in ``report.md``: a table of the final training errors (eval mode and running) and test
  errors, mean ± sample std over seeds; and a one-sentence verdict computed from the means:
  does the deeper net from the construction end at or below the shallower net's training
  error, and does the one from scratch end above it (margins with their spread, the standard
  error of a difference of means, sqrt(s1²/n1 + s2²/n2)).

A run without ``train_eval/top1_err`` (``eval.train_eval: false``) falls back to its running
training error, and the table says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.report.runs import DPI, PANEL_SIZE_IN, RunData, load_run
from pipeline.report.seeds import Spread, final_test_err, final_train_err, mean_curve
from pipeline.store.rundir import RunDir

ROLES = ("shallow", "constructed", "scratch", "continued")
ROLE_LABELS = {
    "shallow": "shallower net (trained first)",
    "constructed": "deeper, from the construction",
    "scratch": "deeper, from scratch",
    "continued": "shallower, continued",
}
EVAL_KEY, RUNNING_KEY = "train_eval/top1_err", "train/top1_err"


@dataclass
class Family:
    """The runs of one family by role."""

    key: str  # e.g. "cifar-plain"
    title: str  # e.g. "plain: cifar_plain56 from cifar_plain20"
    shallow_model: str
    deep_model: str | None
    roles: dict[str, list[RunData]]


def _last(run: RunData, key: str) -> float | None:
    for row in reversed(run.metrics):
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return None


def final_train_eval_err(run: RunData) -> float | None:
    """The last epoch's training error in eval mode, else (not measured) the running one."""
    value = _last(run, EVAL_KEY)
    return value if value is not None else final_train_err(run)


def group_runs(run_dirs: list[Path | str]) -> list[Family]:
    """Load the runs and sort them into families and roles (from their configs)."""
    from pipeline.models import model_spec

    placed: dict[str, list[tuple[int, bool, RunData]]] = {}
    for path in run_dirs:
        run = load_run(path)
        config = RunDir(str(path)).read_config()
        spec = model_spec(run.model)
        key = f"{spec.family}-{'plain' if spec.plain else 'residual'}"
        init_from = (config.get("model") or {}).get("init_from")
        placed.setdefault(key, []).append((spec.depth, bool(init_from), run))
    families = []
    for key, entries in placed.items():
        shallowest = min(d for d, _, _ in entries)
        roles: dict[str, list[RunData]] = {r: [] for r in ROLES}
        for depth, initialised, run in entries:
            if depth == shallowest:
                roles["continued" if initialised else "shallow"].append(run)
            else:
                roles["constructed" if initialised else "scratch"].append(run)
        shallow_model = next(r.model for d, _, r in entries if d == shallowest)
        deep = sorted((d, r.model) for d, _, r in entries if d != shallowest)
        deep_model = deep[-1][1] if deep else None
        title = f"{key.split('-')[1]}: {deep_model} from {shallow_model}" if deep_model else key
        families.append(Family(key, title, shallow_model, deep_model, roles))
    return families


def _spread(runs: list[RunData], value) -> Spread | None:
    kept = tuple(v for v in (value(r) for r in runs) if v is not None)
    return Spread(kept) if kept else None


def _se(a: Spread, b: Spread) -> float | None:
    if a.std is None or b.std is None:
        return None
    return math.sqrt(a.std**2 / a.n + b.std**2 / b.n)


def _margin(a: Spread, b: Spread) -> str:
    se = _se(a, b)
    return f"margin {a.mean - b.mean:+.2f}" + (f" ± {se:.2f}" if se is not None else "") + " points"


def verdict(family: Family) -> str:
    """One sentence from the numbers: the constructed net against the shallower one, and the one from scratch."""
    shallow = _spread(family.roles["shallow"], final_train_eval_err)
    built = _spread(family.roles["constructed"], final_train_eval_err)
    scratch = _spread(family.roles["scratch"], final_train_eval_err)
    if shallow is None or (built is None and scratch is None):
        return f"{family.title}: not enough finished runs for a verdict (the shallower net and a deeper one are needed)."
    parts = []
    if built is not None:
        holds = built.mean <= shallow.mean
        parts.append(
            f"{family.deep_model} from the construction ends at {built}% training error (eval mode), "
            f"{'at or below' if holds else 'above'} {family.shallow_model}'s {shallow}% ({_margin(built, shallow)})"
        )
    if scratch is not None:
        above = scratch.mean > shallow.mean
        parts.append(
            f"{family.deep_model} from scratch ends at {scratch}%, {'above' if above else 'at or below'} it "
            f"({_margin(scratch, shallow)})"
        )
    claim = []
    if built is not None:
        claim.append("the constructed solution keeps its training error" if built.mean <= shallow.mean
                     else "the solver moved away from the constructed solution to a higher training error")  # fmt: skip
    if scratch is not None:
        claim.append("training from scratch shows the degradation" if scratch.mean > shallow.mean
                     else "training from scratch shows no degradation here")  # fmt: skip
    return f"{'; '.join(parts)}: {' and '.join(claim)}."


def table(family: Family) -> str:
    lines = [
        "| run | network | seeds | final train err, eval mode | final train err, running | final test err |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for role in ROLES:
        runs = family.roles[role]
        if not runs:
            continue
        measured = all(_last(r, EVAL_KEY) is not None for r in runs)
        cells = [
            _spread(runs, final_train_eval_err),
            _spread(runs, final_train_err),
            _spread(runs, final_test_err),
        ]
        text = ["-" if c is None else str(c) for c in cells]
        if not measured:
            text[0] += " (running: not measured)"
        unfinished = sum(not r.final for r in runs)
        seeds = f"{len(runs)}" + (f" ({unfinished} unfinished)" if unfinished else "")
        lines.append(f"| {ROLE_LABELS[role]} | {runs[0].model} | {seeds} | {' | '.join(text)} |")
    return "\n".join(lines)


def plot_family(family: Family, out: Path) -> Path:
    """The three runs' training-error curves and the shallower net's final training error as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=PANEL_SIZE_IN, dpi=DPI)
    colours = {"constructed": "tab:green", "scratch": "tab:red", "continued": "tab:blue"}
    top = 0.0
    for role in ("constructed", "scratch", "continued"):
        runs = family.roles[role]
        if not runs:
            continue
        for key, style, alpha in ((EVAL_KEY, dict(lw=2.0), 0.2), (RUNNING_KEY, dict(lw=0.9, ls="--"), 0.08)):
            xs, mean, lo, hi = mean_curve(runs, key, "step")
            if not xs:
                continue
            top = max(top, *hi)
            seeds = f"{len(runs)} seed" + ("s" if len(runs) > 1 else "")
            label = f"{ROLE_LABELS[role]} ({runs[0].model}, {seeds})" if key == EVAL_KEY else None
            ax.plot(xs, mean, color=colours[role], label=label, **style)
            ax.fill_between(xs, lo, hi, color=colours[role], alpha=alpha, lw=0)
    shallow = _spread(family.roles["shallow"], final_train_eval_err)
    if shallow is not None:
        top = max(top, shallow.mean)
        ax.axhline(
            shallow.mean, color="black", lw=1.2, ls=":", label=f"{family.shallow_model}, final ({shallow}%)"
        )
    ax.set_title(family.title)
    ax.set_xlabel("iterations (each run from step 0)")
    ax.set_ylabel("training error (%)")
    ax.set_ylim(0, top * 1.08 if top > 0 else 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", title="bold: eval mode; dashed: running", title_fontsize="small")
    fig.tight_layout()
    path = out / f"construction-{family.key}.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def build_construction_report(run_dirs: list[Path], out: Path) -> str:
    """Write the figures and ``report.md`` into ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# The constructed solution (He et al. 2015, Sec. 1)", ""]
    families = group_runs(run_dirs)
    for family in families:
        png = plot_family(family, out)
        lines += [f"## {family.title}", "", f"**Verdict:** {verdict(family)}", "", table(family), ""]
        lines += [f"![training error of the three runs]({png.name})", ""]
    lines += [
        "Errors in %, mean ± sample std over seeds. Training error in eval mode: the training images without "
        "augmentation, BN in eval mode (`train_eval/top1_err`), the quantity the construction is about; running: "
        "the epoch's augmented batches in training mode (`train/top1_err`). Test error: the CIFAR-10 test set "
        "(or the final validation). Margin = mean(deeper) − mean(shallower), ± the standard error of that "
        "difference over seeds.",
        "",
    ]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text
