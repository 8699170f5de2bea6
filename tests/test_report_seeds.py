"""The report for several seeds: mean curves with min-max bands, mean ± std over seeds, the verdict."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import yaml
from PIL import Image

from pipeline.report.runs import load_run
from pipeline.report.seeds import comparisons, mean_curve, seed_groups
from pipeline.report.single import main


def seed_run(
    root: Path,
    name: str,
    model: str,
    train: list[float],
    val: list[float],
    *,
    test: float | None = None,
    val_split: int = 0,
    seed: int = 0,
) -> Path:
    """A run folder as the training loop writes it, with the given training and validation errors."""
    run = root / name
    run.mkdir(parents=True)
    config = {
        "name": name,
        "seed": seed,
        "data": {"dataset": "cifar10", "val_split": val_split},
        "model": {"name": model},
        "eval": {"mode": "center", "final_mode": "center"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [
        {"epoch": e + 1, "step": 100 * (e + 1), "train/top1_err": t, "val/top1_err": v}
        for e, (t, v) in enumerate(zip(train, val, strict=True))
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"model": model, "eval_mode": "center", "val_top1_err": val[-1], "val_top5_err": 0.5}
    if test is not None:
        summary |= {"test_top1_err": test, "test_top5_err": 0.4}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


# Final (training, test) errors per seed: plain-56 trains worse than plain-20, ResNet-56 tests better.
FINALS = {
    "cifar_plain20": [(10.0, 12.0), (12.0, 13.0), (11.0, 12.5)],
    "cifar_plain56": [(15.0, 16.0), (17.0, 17.5), (16.0, 16.0)],
    "cifar_resnet20": [(5.0, 9.0), (6.0, 8.5), (5.5, 9.5)],
    "cifar_resnet56": [(3.0, 7.0), (3.5, 7.5), (4.0, 6.5)],
}


def _runs(root: Path, finals=FINALS) -> list[Path]:
    dirs = []
    for model, per_seed in finals.items():
        for seed, (train, test) in enumerate(per_seed):
            dirs.append(
                seed_run(
                    root, f"{model}-seed{seed}", model, [60.0, 30.0, train], [65.0, 35.0, test], seed=seed
                )
            )
    return dirs


def _table(markdown: str, header: str) -> dict[str, list[str]]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0] if header.startswith("| network") else (cells[0], cells[2])] = cells
    return rows


def test_seed_report_table_verdict_and_figure(tmp_path: Path, capsys):
    out = tmp_path / "report"
    assert main(["--runs", *map(str, _runs(tmp_path / "runs")), "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    assert markdown in capsys.readouterr().out
    with Image.open(out / "curves.png") as png:
        assert png.size == (1200, 450)

    table = _table(markdown, "| network |")
    for model, per_seed in FINALS.items():
        train, test = [t for t, _ in per_seed], [v for _, v in per_seed]
        row = table[model]
        assert row[1] == "3"
        assert row[2] == f"{statistics.fmean(test):.2f} ± {statistics.stdev(test):.2f}"
        assert row[3] == f"{min(test):.2f}-{max(test):.2f}"
        assert row[4] == f"{statistics.fmean(train):.2f} ± {statistics.stdev(train):.2f}"
    assert table["cifar_resnet20"][5:] == ["8.75 (Table 6)", f"{9.0 - 8.75:+.2f}"]
    assert table["cifar_resnet56"][5:] == ["6.97 (Table 6)", f"{7.0 - 6.97:+.2f}"]
    assert table["cifar_plain56"][5:] == ["-", "-"]

    verdict = _table(markdown, "| deeper |")
    plain = verdict[("cifar_plain56", "training")]
    margin = statistics.fmean([15, 17, 16]) - statistics.fmean([10, 12, 11])
    spread = math.sqrt(statistics.variance([15, 17, 16]) / 3 + statistics.variance([10, 12, 11]) / 3)
    assert plain[3] == "higher" and plain[6] == f"{margin:+.2f} ± {spread:.2f}"
    assert plain[7] == "holds, clearly (margin > 2 spreads)"
    resnet = verdict[("cifar_resnet56", "test")]
    assert resnet[3] == "lower" and resnet[6].startswith(f"{7.0 - 9.0:+.2f} ± ")
    assert resnet[7].startswith("holds")
    assert (
        "- Degradation (cifar_plain56 ends with higher training error than cifar_plain20): holds, clearly"
        in markdown
    )
    assert (
        "- Residual learning (cifar_resnet56 ends with lower test error than cifar_resnet20): holds"
        in markdown
    )
    assert "## Each run" in markdown and "| cifar_plain20-seed2 |" in markdown


def test_verdict_says_when_a_claim_fails_or_is_noise(tmp_path: Path):
    finals = {
        "cifar_plain20": [(10.0, 12.0), (14.0, 13.0)],
        "cifar_plain56": [(9.0, 16.0), (11.0, 17.5)],  # deeper trains *better*: no degradation here
        "cifar_resnet20": [(5.0, 9.0), (6.0, 7.0)],
        "cifar_resnet56": [(3.0, 8.5), (3.5, 7.0)],  # lower by 0.25, spread ~1: noise
    }
    runs = [load_run(p) for p in _runs(tmp_path / "runs", finals)]
    rows = {(c.deeper, c.measure): c for c in comparisons(seed_groups(runs))}
    assert rows[("cifar_plain56", "training")].verdict == "does not hold"
    assert rows[("cifar_plain56", "training")].margin == statistics.fmean([9, 11]) - statistics.fmean(
        [10, 14]
    )
    assert rows[("cifar_resnet56", "test")].verdict == "holds, within noise"
    assert len(rows) == 4  # one deeper network per family, training and test error


def test_mean_curve_and_band_over_common_steps(tmp_path: Path):
    a = seed_run(tmp_path, "a", "cifar_resnet20", [50.0, 40.0, 30.0], [55.0, 45.0, 35.0])
    b = seed_run(tmp_path, "b", "cifar_resnet20", [60.0, 20.0], [65.0, 25.0], seed=1)  # stopped early
    xs, mean, lo, hi = mean_curve([load_run(a), load_run(b)], "train/top1_err")
    assert xs == [100.0, 200.0] and mean == [55.0, 30.0] and lo == [50.0, 20.0] and hi == [60.0, 40.0]


def test_separate_test_set_is_what_seeds_and_runs_are_scored_on(tmp_path: Path):
    """With data.val_split the summary holds a test-set score: the report compares that with the paper."""
    dirs = [
        seed_run(
            tmp_path / "runs", f"r20-{s}", "cifar_resnet20", [50.0, 9.0], [50.0, 11.0], test=t, val_split=5000
        )
        for s, t in enumerate((8.0, 9.0))
    ]
    out = tmp_path / "report"
    assert main(["--runs", *map(str, dirs), "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    assert (
        _table(markdown, "| network |")["cifar_resnet20"][2] == f"8.50 ± {statistics.stdev([8.0, 9.0]):.2f}"
    )
    run_row = next(line for line in markdown.splitlines() if line.startswith("| r20-0 |"))
    assert "| center, test (5000 held out for val) | 8.00 | 0.40 | 8.75 |" in run_row
