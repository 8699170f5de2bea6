"""Every YAML under configs/ loads, names a registered model, and follows the paper.

.venv/bin/python -m pytest -q tests/test_configs.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, load_config, read_config_tree
from pipeline.models import MODEL_NAMES, native_input_size

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL = sorted(p for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("_"))
# The paper's experiments: one file per run, each on top of its folder's base.yaml.
EXPERIMENTS = [p for p in ALL if p.parent.name in ("imagenet", "cifar10") and p.name != "base.yaml"]


def rel(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def test_the_paper_experiments_are_all_there() -> None:
    names = {rel(p) for p in EXPERIMENTS}
    imagenet = "plain18 plain34 resnet18 resnet34_a resnet34 resnet34_c resnet50 resnet101 resnet152"
    cifar = "resnet20 resnet32 resnet44 resnet56 resnet110 plain20 plain32 plain44 plain56"
    assert {f"imagenet/{n}.yaml" for n in imagenet.split()} <= names
    assert {f"cifar10/{n}.yaml" for n in cifar.split()} <= names


@pytest.mark.parametrize("path", ALL, ids=rel)
def test_config_loads_with_a_registered_model(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.model.name in MODEL_NAMES, f"{rel(path)}: model.name {cfg.model.name!r} is not registered"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=rel)
def test_experiment_is_named_grouped_and_fits_its_data(path: Path) -> None:
    cfg = load_config(path)
    folder = path.parent.name
    assert cfg.name == f"{folder}-{path.stem}"
    assert cfg.tracking.group and cfg.tracking.tags
    assert cfg.data.dataset == folder  # the folders are named after data.dataset
    expected_size, classes = (32, 10) if folder == "cifar10" else (224, 1000)
    assert native_input_size(cfg.model.name) == expected_size
    assert cfg.model.num_classes == classes


@pytest.mark.parametrize("path", EXPERIMENTS, ids=rel)
def test_experiment_holds_only_what_differs_from_its_base(path: Path) -> None:
    own = yaml.safe_load(path.read_text())
    assert own.pop("base") == "base.yaml"
    base = read_config_tree(path.parent / "base.yaml")

    def repeats(mine: dict, theirs: dict, prefix: str = "") -> list[str]:
        found = []
        for key, value in mine.items():
            if isinstance(value, dict) and isinstance(theirs.get(key), dict):
                found += repeats(value, theirs[key], f"{prefix}{key}.")
            elif key in theirs and theirs[key] == value:
                found.append(prefix + key)
        return found

    assert repeats(own, base) == [], f"{rel(path)} repeats values of its base"


def test_imagenet_protocol() -> None:
    cfg = load_config(CONFIGS / "imagenet" / "resnet50.yaml")
    assert (cfg.optim.batch_size, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (
        256,
        0.1,
        0.9,
        1e-4,
    )
    assert (cfg.schedule.kind, cfg.schedule.max_iters) == ("plateau", 600_000)
    assert (cfg.data.augment, cfg.data.scale_min, cfg.data.scale_max, cfg.data.crop_size) == (
        "paper",
        256,
        480,
        224,
    )
    assert (cfg.eval.final_mode, cfg.cluster.use_gpu) == ("tencrop", "auto")
    assert load_config(CONFIGS / "imagenet" / "resnet18.yaml").model.name == "resnet18_a"  # Table 2: option A


def test_cifar10_protocol() -> None:
    cfg = load_config(CONFIGS / "cifar10" / "resnet56.yaml")
    assert (cfg.data.dataset, cfg.data.root, cfg.data.val_split) == ("cifar10", "data/cifar10", 0)
    assert (cfg.optim.batch_size, cfg.optim.lr, cfg.optim.scale_lr) == (128, 0.1, False)
    assert cfg.schedule.kind == "step" and cfg.schedule.milestone_unit == "iter"
    assert (cfg.schedule.milestones, cfg.schedule.max_iters) == ((32_000, 48_000), 64_000)
    assert cfg.schedule.warmup_until_train_err is None
    # 64k iterations must fit in the epoch cap, with or without the 5k held-out split.
    assert cfg.schedule.epochs * ((50_000 - 5_000) // 128) >= 64_000
    warm = load_config(CONFIGS / "cifar10" / "resnet110.yaml").schedule
    assert (warm.warmup_until_train_err, warm.warmup_lr) == (80, 0.01)
