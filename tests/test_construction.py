"""The construction as an experiment: the training error in eval mode it measures
(``train_eval/*``), the sweep's seeds in ``model.init_from``, ``make construction`` end to end,
and its report and W&B dashboard. Building the start is ``test_construction_deepen``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import run_pipeline, tune_make_env

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- what the runs measure, how they are seeded


def test_sweep_fills_in_the_seed_of_each_trial():
    from pipeline.driver.sweep import plan

    specs = plan(["configs/cifar10/resnet20.yaml"], [0, 3], ["model.init_from=/runs/start-seed{seed}"])
    assert [s.cfg.model.init_from for s in specs] == ["/runs/start-seed0", "/runs/start-seed3"]


# ---------------------------------------------------------------- make construction, end to end


def _make_construction(data: Path, storage: Path, report: Path, ray_tmp: str) -> subprocess.CompletedProcess:
    overrides = [
        "schedule.max_iters=4",  # 20 images, batch 8: 2 iterations per epoch, 2 epochs
        "optim.batch_size=8",
        "cluster.use_gpu=false",
        "tracking.mode=offline",
        f"checkpoint.storage_path={storage}",
    ]
    env = tune_make_env(ray_tmp)
    return subprocess.run(
        [
            "make", "--no-print-directory", "-C", str(ROOT), "-o", ".venv/.installed", "construction",
            "SEEDS=2", f"DATA={data}", f"CONSTRUCTION_ARGS={' '.join(overrides)}",
            "CONSTRUCTION_SWEEP_ARGS=--cpus-per-trial 1", f"CONSTRUCTION_REPORT={report}", f"PY={sys.executable}",
        ],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.ray
def test_make_construction_end_to_end_on_generated_cifar(tmp_path, request):
    """`make construction SEEDS=2` at a tiny budget: 4 shallower runs, 4 deeper nets built from them,
    12 runs from there as Ray Tune trials, the report with its verdict from the runs' numbers, and
    a re-run that has nothing left to do. About 4 minutes on the 2-core development machine."""
    import statistics

    from PIL import Image

    from pipeline.construction.report import final_train_eval_err
    from pipeline.report.runs import load_run

    data = tmp_path / "cifar"
    from pipeline.data.prep.synth_cifar import write_synthetic_cifar

    write_synthetic_cifar(data, train_per_class=2, test_per_class=1, seed=0)
    storage, report = tmp_path / "runs", tmp_path / "report"
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    result = _make_construction(data, storage, report, ray_tmp)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    for family, (small, big) in {"plain": ("plain20", "plain56"), "resnet": ("resnet20", "resnet56")}.items():
        for seed in (0, 1):
            start = storage / f"construction-{big}-start-seed{seed}"
            record = json.loads((start / "deepened.json").read_text())
            assert record["source_checkpoint"] == str(
                storage / f"construction-{small}-seed{seed}" / "checkpoint_epoch0002"
            )
            assert all(c["max_abs_logit_diff"] == 0.0 for c in record["checks"])
            built = storage / f"construction-{big}-constructed-seed{seed}"
            config = json.loads(json.dumps(__import__("yaml").safe_load((built / "config.yaml").read_text())))
            assert config["model"]["init_from"] == str(start) and config["seed"] == seed
            continued = __import__("yaml").safe_load(
                (storage / f"construction-{small}-continued-seed{seed}" / "config.yaml").read_text()
            )
            assert continued["model"]["init_from"] == str(storage / f"construction-{small}-seed{seed}")
            for role in ("constructed", "scratch"):
                assert (
                    json.loads(
                        (storage / f"construction-{big}-{role}-seed{seed}" / "summary.json").read_text()
                    )["steps"]
                    == 4
                )

        # The verdict says what the runs' own numbers say.
        def mean(name: str) -> float:
            return statistics.fmean(
                final_train_eval_err(load_run(storage / f"{name}-seed{s}")) for s in (0, 1)
            )

        shallow, constructed = mean(f"construction-{small}"), mean(f"construction-{big}-constructed")
        scratch = mean(f"construction-{big}-scratch")
        markdown = (report / "report.md").read_text()
        key = "plain" if family == "plain" else "residual"
        section = markdown.split(f"## {key}: cifar_{big} from cifar_{small}")[1].split("## ")[0]
        assert ("at or below" if constructed <= shallow else "above") in section.split(";")[0]
        assert f"margin {constructed - shallow:+.2f}" in section
        assert f"margin {scratch - shallow:+.2f}" in section
        assert "| deeper, from the construction | cifar_" + big + " | 2 |" in section
        with Image.open(report / f"construction-cifar-{key}.png") as png:
            assert png.size == (600, 450)
    assert "python -m pipeline dashboard --kind construction" in result.stdout

    again = _make_construction(data, storage, report, ray_tmp)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert again.stdout.count("finished already:") == 16 and again.stdout.count("built already:") == 4


# ---------------------------------------------------------------- its W&B dashboard and its report


def test_construction_dashboard_names_only_logged_keys_and_one_runset_per_role():
    pytest.importorskip("wandb_workspaces")
    from pipeline.tracking import dashboard

    data = dashboard.payload(dashboard.build_view("construction", "me", "resnet-pipeline"))
    assert dashboard.unknown_keys(data["spec"]) == []
    assert dashboard.view_keys(data["spec"]).history == {"train_eval/top1_err"}
    grids = [b for b in data["spec"]["blocks"] if b["type"] == "panel-grid"]
    assert len(grids) == 2
    for grid in grids:
        tags = [rs["filters"]["filters"][2]["value"] for rs in grid["metadata"]["runSets"]]
        assert tags == [[f"construction-{r}"] for r in ("constructed", "scratch", "continued", "shallow")]
        assert all(
            rs["filters"]["filters"][0]["value"] == ["construction-cifar10"]
            for rs in grid["metadata"]["runSets"]
        )


def _fake_run(
    root: Path, name: str, model: str, init_from: str | None, train_eval: list[float], seed: int
) -> Path:
    import yaml

    run = root / name
    run.mkdir(parents=True)
    config = {
        "name": name,
        "seed": seed,
        "model": {"name": model, "init_from": init_from},
        "data": {"dataset": "cifar10"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [
        {
            "epoch": i + 1,
            "step": 10 * (i + 1),
            "train/top1_err": e + 5,
            "train_eval/top1_err": e,
            "val/top1_err": e + 10,
        }
        for i, e in enumerate(train_eval)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"name": name, "model": model, "eval_mode": "center", "val_top1_err": train_eval[-1] + 10}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.mark.parametrize("constructed_end, verdict", [(9.0, "at or below"), (14.0, "above")])
def test_construction_report_roles_from_the_configs_and_the_verdict_from_the_numbers(
    tmp_path, constructed_end, verdict
):
    runs = []
    for seed, jitter in ((0, 0.0), (1, 1.0)):
        runs += [
            _fake_run(tmp_path, f"a{seed}", "cifar_plain20", None, [30, 12 + jitter], seed),
            _fake_run(tmp_path, f"b{seed}", "cifar_plain56", "/x", [20, constructed_end + jitter], seed),
            _fake_run(tmp_path, f"c{seed}", "cifar_plain56", None, [50, 25 + jitter], seed),
            _fake_run(tmp_path, f"d{seed}", "cifar_plain20", "/y", [15, 11 + jitter], seed),
        ]
    out = tmp_path / "report"
    result = run_pipeline("report", "--kind", "construction", "--runs", *map(str, runs), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    markdown = (out / "report.md").read_text()
    (line,) = [x for x in markdown.splitlines() if x.startswith("**Verdict:**")]
    margin = constructed_end - 12.0
    assert (
        f"ends at {constructed_end + 0.5:.2f} ± 0.71% training error (eval mode), {verdict} cifar_plain20's 12.50 ± 0.71%"
        in line
    )
    assert (
        f"(margin {margin:+.2f} ± 0.71 points)" in line
        and "from scratch ends at 25.50 ± 0.71%, above it" in line
    )
    assert (
        "| shallower, continued | cifar_plain20 | 2 | 11.50 ± 0.71 | 16.50 ± 0.71 | 21.50 ± 0.71 |"
        in markdown
    )
    assert (out / "construction-cifar-plain.png").is_file()
