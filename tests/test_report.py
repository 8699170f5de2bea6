"""``python -m pipeline report``: curves PNG and the table against the paper, from fixture runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipeline.report.paper import PAPER_RESULTS, canonical_model, paper_eval, paper_result
from pipeline.report.runs import load_run
from pipeline.report.single import main


def write_run(
    root: Path,
    name: str,
    model: str,
    *,
    dataset: str = "cifar10",
    eval_mode: str | None = "center",
    final: tuple[float, float] | None = None,
    epochs: int = 4,
    steps_per_epoch: int = 5000,
    shortcut: str | None = None,
    val_split: int = 0,
) -> Path:
    """A run directory as the training loop writes it: config.yaml, metrics.jsonl, summary.json."""
    run = root / name
    run.mkdir(parents=True)
    config = {
        "name": name,
        "data": {"dataset": dataset, "val_split": val_split},
        "model": {"name": model, "shortcut": shortcut},
        "eval": {"mode": "center", "final_mode": eval_mode},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    for epoch in range(1, epochs + 1):
        rows.append(
            {
                "epoch": epoch,
                "step": epoch * steps_per_epoch,
                "lr": 0.1,
                "train/loss": 2.0 / epoch,
                "train/top1_err": 40.0 / epoch,
                "train/top5_err": 10.0 / epoch,
                "val/top1_err": 45.0 / epoch + 2,
                "val/top5_err": 12.0 / epoch,
            }
        )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if final is not None:
        summary = {
            "model": model,
            "eval_mode": eval_mode,
            "val_top1_err": final[0],
            "val_top5_err": final[1],
            "epochs": epochs,
            "wall_s": 1.0,
            "img_per_s": 100.0,
            "checkpoint": None,
            "wandb_dir": None,
        }
        (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def degradation_runs(tmp_path: Path) -> list[Path]:
    runs = tmp_path / "runs"
    return [
        write_run(runs, "plain-20", "cifar_plain20", final=(9.9, 0.4)),
        write_run(runs, "plain-56", "cifar_plain56", final=(13.2, 0.8)),
        write_run(runs, "resnet-20", "cifar_resnet20", final=(8.6, 0.3)),
        write_run(runs, "resnet-56", "cifar_resnet56", final=(7.0, 0.2)),
    ]


def _rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| run ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_report_writes_png_of_the_expected_size_and_the_table(degradation_runs, tmp_path: Path, capsys):
    out = tmp_path / "report"
    assert main(["--runs", *map(str, degradation_runs), "--out", str(out)]) == 0

    with Image.open(out / "curves.png") as png:
        assert png.format == "PNG"
        assert png.size == (1200, 450)  # plain and residual panels side by side
    printed = capsys.readouterr().out
    markdown = (out / "report.md").read_text()
    assert markdown in printed and "curves.png" in markdown

    rows = _rows(markdown)
    #        run | model | eval | top1 | top5 | paper1 | paper5 | d1 | d5 | paper
    assert rows["resnet-20"][1:9] == [
        "cifar_resnet20",
        "center, test",
        "8.60",
        "0.30",
        "8.75",
        "-",
        "-0.15",
        "-",
    ]
    assert rows["resnet-56"][5:8] == ["6.97", "-", "+0.03"]
    assert rows["resnet-56"][9] == "ResNet-56, Table 6"
    for plain in ("plain-20", "plain-56"):  # the paper shows plain nets in Fig. 6 only
        assert rows[plain][5:9] == ["-", "-", "-", "-"]
        assert "Fig. 6" in rows[plain][9]


def test_imagenet_runs_match_model_option_and_evaluation(tmp_path: Path):
    runs = tmp_path / "runs"
    dirs = [
        write_run(runs, "r34b", "resnet34", dataset="imagenet", eval_mode="tencrop", final=(24.0, 7.5)),
        write_run(
            runs, "r34a", "resnet34", dataset="imagenet", eval_mode="tencrop", final=(25.5, 8.0), shortcut="A"
        ),
        write_run(runs, "r50ms", "resnet50", dataset="imagenet", eval_mode="multiscale", final=(21.0, 5.5)),
        write_run(runs, "r50c", "resnet50", dataset="imagenet", eval_mode="center", final=(24.0, 7.0)),
        write_run(runs, "p34", "plain34", dataset="imagenet", eval_mode="tencrop", final=(29.0, 10.5)),
        write_run(runs, "r18", "resnet18_a", dataset="imagenet", eval_mode="tencrop", final=(28.0, 9.9)),
        write_run(
            runs, "r152", "resnet152", dataset="imagenet", eval_mode="tencrop", epochs=2
        ),  # still running
    ]
    out = tmp_path / "report"
    assert main(["--runs", *map(str, dirs), "--out", str(out), "--x", "epoch"]) == 0
    rows = _rows((out / "report.md").read_text())
    assert rows["r34b"][5:9] == ["24.52", "7.46", "-0.52", "+0.04"]
    assert rows["r34a"][5:7] == ["25.03", "7.76"]
    assert rows["r50ms"][5:7] == ["20.74", "5.25"] and "Table 4" in rows["r50ms"][9]
    assert rows["r50c"][5:7] == ["-", "-"]  # the paper has no single centre-crop numbers
    assert rows["p34"][5:7] == ["28.54", "10.02"]
    assert rows["r18"][5:7] == ["27.88", "-"] and "Table 2" in rows["r18"][9]
    # No summary.json yet: the last epoch's validation, flagged as such.
    assert rows["r152"][2] == "center (last epoch)" and rows["r152"][3] == "24.50"
    with Image.open(out / "curves.png") as png:
        assert png.size == (1200, 450)


def test_single_family_gets_one_panel(tmp_path: Path):
    run = write_run(tmp_path / "runs", "r20", "cifar_resnet20", final=(8.0, 0.3), val_split=5000)
    out = tmp_path / "report"
    assert main(["--runs", str(run), "--out", str(out)]) == 0
    with Image.open(out / "curves.png") as png:
        assert png.size == (600, 450)
    assert _rows((out / "report.md").read_text())["r20"][2] == "center, 5000 held out"


def test_bad_run_dir_is_an_error_not_a_traceback(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, shortcut, v1_5, key",
    [
        ("resnet34", None, None, "resnet34_b"),
        ("resnet34", "A", None, "resnet34_a"),
        ("resnet34_c", None, None, "resnet34_c"),
        ("resnet50", None, None, "resnet50_b"),
        ("resnet50_v1_5", None, None, "resnet50_b_v1_5"),
        ("resnet50", None, True, "resnet50_b_v1_5"),
        ("plain34", None, None, "plain34"),
        ("cifar_resnet110", None, None, "cifar_resnet110_a"),
        ("cifar_plain56", None, None, "cifar_plain56"),
        ("vgg16", None, None, "vgg16"),
    ],
)
def test_canonical_model(name, shortcut, v1_5, key):
    assert canonical_model(name, shortcut, v1_5) == key


def test_paper_table_is_unambiguous_and_holds_the_papers_numbers():
    keys = [(r.model, r.eval) for r in PAPER_RESULTS]
    assert len(keys) == len(set(keys))
    expected = {  # He et al. 2015: Tables 2/3 (10-crop), 4 (multi-scale), 6 (CIFAR-10 test)
        ("resnet34_b", "tencrop"): (24.52, 7.46),
        ("resnet50_b", "tencrop"): (22.85, 6.71),
        ("resnet101_b", "tencrop"): (21.75, 6.05),
        ("resnet152_b", "tencrop"): (21.43, 5.71),
        ("plain34", "tencrop"): (28.54, 10.02),
        ("plain18", "tencrop"): (27.94, None),
        ("resnet152_b", "multiscale"): (19.38, 4.49),
        ("cifar_resnet20_a", "test"): (8.75, None),
        ("cifar_resnet56_a", "test"): (6.97, None),
        ("cifar_resnet110_a", "test"): (6.43, None),
        ("cifar_resnet1202_a", "test"): (7.93, None),
    }
    for (model, evaluation), numbers in expected.items():
        row = paper_result(model, evaluation)
        assert row is not None and (row.top1, row.top5) == numbers, (model, evaluation)
    assert paper_eval("imagenet", "center") is None
    assert paper_eval("cifar10", "center") == "test"


def test_load_run_reads_summary_over_metrics(degradation_runs):
    run = load_run(degradation_runs[2])
    assert (run.name, run.model, run.model_key, run.top1, run.final) == (
        "resnet-20",
        "cifar_resnet20",
        "cifar_resnet20_a",
        8.6,
        True,
    )
    assert len(run.metrics) == 4 and not run.plain


def test_wandb_source_writes_run_dirs_the_report_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """--wandb against a stand-in for wandb.Api (the real one needs the network)."""
    wandb = pytest.importorskip("wandb")

    class FakeRun:
        name, id = "resnet-56", "abc123"
        config = {"name": "resnet-56", "data": {"dataset": "cifar10"}, "model": {"name": "cifar_resnet56"}}
        summary_metrics = {
            "final/center/top1_err": 7.1,
            "final/center/top5_err": 0.2,
            "val/top1_err": {"min": 7},
        }

        def scan_history(self):
            yield {"_step": 5, "train/step_loss": 1.0, "lr": 0.1, "epoch": 0.5}  # an every-N-steps row
            yield {"_step": 10, "step": 10, "epoch": 1, "train/top1_err": 50.0, "val/top1_err": 55.0}
            yield {"_step": 20, "epoch": 2, "train/top1_err": 40.0, "val/top1_err": 45.0}

    class FakeApi:
        def runs(self, path, filters=None):
            assert (path, filters) == ("team/proj", {"group": "degradation-cifar10"})
            return [FakeRun()]

    monkeypatch.setattr(wandb, "Api", FakeApi)
    out = tmp_path / "report"
    argv = ["--wandb", "team/proj", "--group", "degradation-cifar10", "--out", str(out)]
    assert main(argv) == 0
    run = load_run(out / "wandb-runs" / "resnet-56")
    assert [m["step"] for m in run.metrics] == [10, 20]
    assert (run.model_key, run.eval_mode, run.top1) == ("cifar_resnet56_a", "center", 7.1)
    assert _rows((out / "report.md").read_text())["resnet-56"][5] == "6.97"
