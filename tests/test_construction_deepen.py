"""The construction's start: ``pipeline deepen`` builds the deeper net from a trained shallower
one (copied layers, identity blocks, logits equal in eval mode), and ``model.init_from`` starts
training from it (weights only, step 0). The experiment around them is ``test_construction``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_pipeline
from torch import nn

from pipeline.config import load_config, to_dict
from pipeline.construction.deepen import ConstructionError, deepen_into, max_logit_difference
from pipeline.models import create_model
from pipeline.train import checkpoint as ckpt
from pipeline.train.setup import TrainingProgress

CPU = torch.device("cpu")


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every BN away from its initial identity, as training would (so a copy that skips a
    tensor, or a BN left in its initial state, shows in the logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
    return model


@pytest.mark.parametrize(
    "shallow, deep, kwargs, size",
    [
        ("cifar_plain20", "cifar_plain56", {}, 32),
        ("cifar_resnet20", "cifar_resnet56", {}, 32),
        ("cifar_plain20", "cifar_plain32", {}, 32),
        ("plain18", "plain34", {}, 64),
        ("resnet18", "resnet34", {}, 64),
        ("resnet18", "resnet34", {"shortcut": "C"}, 64),  # the added blocks' projections become identities
    ],
)
def test_deepened_logits_equal_the_shallower_ones_in_eval_mode(shallow, deep, kwargs, size):
    torch.manual_seed(0)
    small = trained_like(create_model(shallow, **kwargs))
    big = create_model(deep, **kwargs)
    fresh = max_logit_difference(small, create_model(deep, **kwargs), [torch.randn(4, 3, size, size)], CPU)
    built = deepen_into(small, big, (shallow, deep))
    assert built.copied == len(small.state_dict()) and built.added_blocks
    x = torch.randn(6, 3, size, size).clamp_min(-3)
    diff, scale, n = max_logit_difference(small, big, [x], CPU)
    assert n == 6 and scale > 0
    assert diff <= 1e-5 * scale  # measured: exactly 0 for every pair on this CPU
    assert fresh[0] > 1e-3 * fresh[1]  # without the construction the logits do differ: the test can fail
    # Every block of the shallower net sits where it was, with its weights.
    deep_state = big.state_dict()
    for key, value in small.state_dict().items():
        assert torch.equal(deep_state[key], value), key


def test_an_added_residual_block_trains_from_the_first_step():
    """The residual construction zeroes only the last BN of the branch: its gradient is not zero."""
    small, big = trained_like(create_model("cifar_resnet20")), create_model("cifar_resnet32")
    deepen_into(small, big)
    big.train()
    big(torch.randn(8, 3, 32, 32)).sum().backward()
    added = big.layer1[3]
    assert added.bn2.weight.abs().max() == 0 and added.bn2.weight.grad.abs().max() > 0


@pytest.mark.parametrize(
    "shallow, deep, message",
    [
        (("cifar_plain20", {}), ("cifar_resnet56", {}), "plain and cifar_resnet56 is residual"),
        (("cifar_resnet56", {}), ("cifar_resnet20", {}), "not deeper"),
        (("cifar_resnet20", {}), ("cifar_resnet20", {}), "not deeper"),
        (("plain34", {}), ("plain18", {}), "not deeper"),
        (("resnet18", {}), ("resnet50", {}), "different width schedule"),
        (("cifar_resnet20", {}), ("resnet34", {}), "different dataset family"),
        (("resnet18", {}), ("resnet34", {"shortcut": "A"}), "has no identity form"),
        (("cifar_resnet20", {"num_classes": 100}), ("cifar_resnet56", {}), "different width schedule"),
    ],
)
def test_pairs_without_a_construction_are_refused_with_the_reason(shallow, deep, message):
    small, big = create_model(shallow[0], **shallow[1]), create_model(deep[0], **deep[1])
    before = {k: v.clone() for k, v in big.state_dict().items()}
    with pytest.raises(ConstructionError, match=message):
        deepen_into(small, big, (shallow[0], deep[0]))
    assert all(torch.equal(before[k], v) for k, v in big.state_dict().items())  # nothing half-done


# ---------------------------------------------------------------- the commands on a generated CIFAR-10


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar") / "data"
    from pipeline.data.prep.synth_cifar import write_synthetic_cifar

    write_synthetic_cifar(root, train_per_class=3, test_per_class=2, seed=0)
    return root


def _overrides(cifar: Path, storage: Path) -> list[str]:
    return [
        f"data.root={cifar}",
        "optim.batch_size=10",  # 30 training images: 3 steps per epoch
        "schedule.max_iters=6",
        "cluster.use_gpu=false",
        "tracking.mode=disabled",
        f"checkpoint.storage_path={storage}",
    ]


def _shallow_checkpoint(tmp_path: Path, cifar: Path, model: str = "cifar_resnet20") -> Path:
    """A 'trained' shallower checkpoint (BN moved away from init) at epoch 7, step 21."""
    cfg = load_config("configs/cifar10/resnet20.yaml", [*_overrides(cifar, tmp_path), f"model.name={model}"])
    net = trained_like(create_model(model))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    progress = TrainingProgress(epoch=7, step=21)
    out = tmp_path / "shallow" / "checkpoint_epoch0007"
    ckpt.save(out, model=net, optimizer=opt, scaler=None, progress=progress, config=to_dict(cfg))
    return out


@pytest.mark.slow  # six commands, one after the other
def test_deepen_command_checks_the_logits_and_writes_a_checkpoint_at_step_0(tmp_path, cifar):
    shallow = _shallow_checkpoint(tmp_path, cifar)
    out = tmp_path / "deep"
    result = run_pipeline(
        "deepen", "--checkpoint", str(shallow.parent), "--config", "configs/cifar10/resnet56.yaml",
        "--out", str(out), *_overrides(cifar, tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "18 identity blocks added" in result.stdout
    assert "on 30 training images (no augmentation): largest difference 0 " in result.stdout
    assert "on 20 test images: largest difference 0 " in result.stdout
    state = ckpt.read(out)
    assert (state["epoch"], state["step"], state["config"]["model"]["name"]) == (0, 0, "cifar_resnet56")
    record = json.loads((out / "deepened.json").read_text())
    assert record["source_checkpoint"] == str(shallow) and record["shallower_model"] == "cifar_resnet20"
    assert [c["max_abs_logit_diff"] for c in record["checks"]] == [0.0, 0.0]

    # It evaluates like any checkpoint, and scores what the shallower net scores.
    scores = {}
    for name, folder, config in (("deep", out, "resnet56"), ("shallow", shallow, "resnet20")):
        ev = run_pipeline(
            "eval", "--config", f"configs/cifar10/{config}.yaml", "--checkpoint", str(folder), "--no-ray",
            "--out", str(tmp_path / f"{name}.json"), *_overrides(cifar, tmp_path),
        )  # fmt: skip
        assert ev.returncode == 0, ev.stderr[-3000:]
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert scores["deep"]["top1_err"] == scores["shallow"]["top1_err"]
    assert scores["deep"]["loss"] == pytest.approx(scores["shallow"]["loss"], rel=1e-5)

    # It resumes like any checkpoint: epoch 0, step 0, the deeper config.
    resumed = run_pipeline(
        "train", "--no-ray", "--config", "configs/cifar10/resnet56.yaml", *_overrides(cifar, tmp_path),
        "name=resumed", f"resume_from={out}", "schedule.max_iters=3",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"restored from checkpoint {out}: epoch 0, step 0" in resumed.stdout
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["steps"] == 3

    # A second deepen into the same folder is refused; so is a pair without a construction.
    again = run_pipeline(
        "deepen", "--checkpoint", str(shallow), "--config", "configs/cifar10/resnet56.yaml", "--out", str(out),
        "--inputs", "generated", *_overrides(cifar, tmp_path),
    )  # fmt: skip
    assert again.returncode == 2 and "exists; remove it" in again.stderr
    refused = run_pipeline(
        "deepen", "--checkpoint", str(shallow), "--config", "configs/cifar10/plain56.yaml",
        "--out", str(tmp_path / "never"), "--inputs", "generated", *_overrides(cifar, tmp_path),
    )  # fmt: skip
    assert refused.returncode == 2 and "residual and cifar_plain56 is plain" in refused.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.slow  # a whole command or several processes: the full suite's tier
def test_deepen_without_the_dataset_says_so_or_compares_on_generated_inputs(tmp_path, cifar):
    shallow = _shallow_checkpoint(tmp_path, cifar, "cifar_plain20")
    args = ["deepen", "--checkpoint", str(shallow), "--config", "configs/cifar10/plain32.yaml"]
    missing = run_pipeline(*args, "--out", str(tmp_path / "a"), f"data.root={tmp_path / 'nowhere'}")
    assert missing.returncode == 2 and "--inputs generated" in missing.stderr
    made = run_pipeline(*args, "--out", str(tmp_path / "b"), "--inputs", "generated", "--sample", "16")
    assert made.returncode == 0, made.stderr[-2000:]
    assert "on 16 generated 32x32 inputs: largest difference 0 " in made.stdout


@pytest.mark.slow  # trains twice (one process, --no-ray): not in make test-fast
def test_train_init_from_loads_weights_only_starts_at_step_0_and_resumes_its_own(tmp_path, cifar):
    from pipeline.train.init_from import load_initial_weights

    shallow = _shallow_checkpoint(tmp_path, cifar)  # epoch 7, step 21 in the checkpoint
    # Weights only, into a fresh model: every tensor equal to the checkpoint's.
    cfg = load_config(
        "configs/cifar10/resnet20.yaml", [*_overrides(cifar, tmp_path), f"model.init_from={shallow}"]
    )
    model = create_model("cifar_resnet20")
    load_initial_weights(model, cfg, is_main=True)
    saved = ckpt.read(shallow)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())

    args = ["train", "--no-ray", "--config", "configs/cifar10/resnet20.yaml", *_overrides(cifar, tmp_path),
            "name=continued", f"model.init_from={shallow.parent}"]  # fmt: skip
    first = run_pipeline(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"initial weights from {shallow} (weights only" in first.stdout
    rows = [json.loads(x) for x in (tmp_path / "continued" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 3), (2, 6)]  # the schedule from step 0, not 21
    assert rows[0]["lr"] == pytest.approx(0.1)
    summary = json.loads((tmp_path / "continued" / "summary.json").read_text())
    assert summary["steps"] == 6
    # The training error in eval mode is logged per epoch, and it is what scoring the training
    # images with the saved weights gives.
    final = ckpt.read(tmp_path / "continued" / "checkpoint_epoch0002")
    net = create_model("cifar_resnet20")
    ckpt.restore_model(final, net)
    from pipeline.data.cifar import build_cifar_loaders
    from pipeline.train.evaluate import evaluate

    loaders = build_cifar_loaders(
        cifar, cfg.data, global_batch=10, rank=0, world_size=1, device=CPU, seed=0, eval_batch_size=7
    )
    mine = evaluate(net, loaders.train.unaugmented(7).epoch(0), mode="center", device=CPU)
    assert mine["val/images"] == 30
    assert rows[-1]["train_eval/top1_err"] == pytest.approx(mine["val/top1_err"])
    assert rows[-1]["train_eval/loss"] == pytest.approx(mine["val/loss"], rel=1e-4)

    # Started again, the run resumes from its own checkpoint, not from init_from.
    (tmp_path / "continued" / "summary.json").unlink()
    again = run_pipeline(*args, "schedule.max_iters=9")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "restored from checkpoint" in again.stdout and "initial weights from" not in again.stdout
    rows = [json.loads(x) for x in (tmp_path / "continued" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 9]


@pytest.mark.slow  # a whole command or several processes: the full suite's tier
def test_init_from_that_is_missing_or_does_not_fit_stops_before_training(tmp_path, cifar):
    shallow = _shallow_checkpoint(tmp_path, cifar)
    base = ["train", "--no-ray", "--config", "configs/cifar10/resnet56.yaml", *_overrides(cifar, tmp_path)]
    missing = run_pipeline(*base, f"model.init_from={tmp_path / 'nope'}")
    assert missing.returncode == 2 and f"model.init_from={str(tmp_path / 'nope')!r}" in missing.stderr
    wrong = run_pipeline(*base, f"model.init_from={shallow}")
    assert wrong.returncode == 2 and "holds weights of 'cifar_resnet20' that do not fit" in wrong.stderr
