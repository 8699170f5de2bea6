"""The training loop: no host sync in a step or an evaluation batch, bf16 on the CPU, the non-finite guard.

Nothing in a training step or an evaluation batch waits for the device.

On a GPU, every ``.item()``, ``.tolist()``, ``.cpu()`` or Python truth test of a tensor blocks
the host until the queued kernels finish. On the CPU they cost nothing, so the test counts them:
an epoch of 8 steps and one of 4 must make the same number (those at the epoch's end), and so
must an evaluation of 16 images and one of 4.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from conftest import tiny_overrides, train_one_process

from pipeline.config import load_config, to_dict
from pipeline.train.distributed import init_context
from pipeline.train.evaluate import evaluate
from pipeline.train.loop import train_one_epoch
from pipeline.train.setup import TrainingProgress, setup_run


def test_steps_and_evaluation_batches_make_no_host_sync(tiny_imagenet, tmp_path, count_syncs):
    cfg = load_config(
        None,
        tiny_overrides(tiny_imagenet, tmp_path, "nosync")
        + ["cluster.num_workers=1", "log_every_n_steps=1000", "tracking.log_every_n_steps=1000"],
    )
    run = setup_run(cfg, init_context(False, use_gpu=False))
    steps = run.derived.iters_per_epoch  # 128 images / 16 = 8

    def syncs_of(fn) -> Counter[str]:
        count_syncs.clear()
        fn()
        return Counter(count_syncs)

    class Quiet:  # where the metrics would go (RunOutputs); only the epoch's last step is due here
        def steps(self, metrics, step, console, track):
            pass

    quiet = Quiet()

    whole = syncs_of(lambda: train_one_epoch(run, 0, TrainingProgress(), quiet))
    half = syncs_of(
        lambda: train_one_epoch(run, 1, TrainingProgress(epoch=1, step=steps + steps // 2), quiet)
    )
    assert sum(whole.values()) > 0  # the epoch's end reads its sums: the counting works
    assert whole == half, (whole, half)  # 8 steps or 4: the same reads, none per step

    def score(images: int) -> None:
        batches = [(torch.randn(4, 3, 48, 48), torch.randint(0, 4, (4,))) for _ in range(images // 4)]
        evaluate(run.network, batches, mode="center", device=torch.device("cpu"))

    assert syncs_of(lambda: score(16)) == syncs_of(lambda: score(4))


@pytest.mark.slow
def test_bf16_autocast_training_on_cpu(tiny_imagenet, tmp_path):
    from pipeline.train.loop import train_worker

    cfg = load_config(
        None,
        tiny_overrides(tiny_imagenet, tmp_path, "bf16")
        + [
            "cluster.num_workers=1",
            "schedule.epochs=1",
            "precision.amp=bf16",
            "precision.channels_last=true",
            "eval.final_mode=center",
            "optim.no_wd_bn_bias=true",
        ],
    )
    summary = train_worker(to_dict(cfg))
    record = json.loads((tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()[0])
    assert torch.isfinite(torch.tensor(record["train/loss"]))
    assert summary["val_images"] == 16


@pytest.mark.slow
def test_non_finite_loss_stops_with_step_and_lr(tiny_imagenet, tmp_path):
    proc = train_one_process(
        tiny_imagenet, tmp_path, "nan", "optim.lr=1e12", "model.zero_init_residual=false", "schedule.epochs=3"
    )
    assert proc.returncode == 1
    assert re.search(r"non-finite loss \(nan\) at epoch 0 step \d+ with lr [0-9.]+e\+1[12]", proc.stderr), (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr
