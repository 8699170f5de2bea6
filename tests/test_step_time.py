"""Where a step's time goes: the ``perf/*`` arithmetic, MFU, the summary's line, the stall note
that names itself, and the keys a real ``--no-ray`` run writes to metrics.jsonl and W&B.

Nothing here asserts speed: sleeps make the parts large enough to add up, and the checks are
on sums, ranges and what is present.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_overrides, train_one_process

from pipeline.config import load_config
from pipeline.tracking.tracker import OPTIONAL_METRICS, PERF_METRICS
from pipeline.train.step_time import (
    StepClock,
    Window,
    describe_time,
    model_flops_utilisation,
    peak_flops,
    peak_precision,
)

CPU = torch.device("cpu")


def _steps(clock: StepClock, n: int, wait_s: float = 0.01, work_s: float = 0.02) -> None:
    """``n`` steps of a loader that sleeps ``wait_s`` and a step that sleeps ``work_s``, batch 4."""

    def slow_batches():
        while True:
            time.sleep(wait_s)
            yield "batch"

    batches = slow_batches()
    for _ in range(n):
        clock.next_batch(batches)
        clock.step_begins()
        time.sleep(work_s)
        clock.step_ends(4, 32)


def _parts_add_up(perf: dict[str, float], wall: float, slack: float = 0.05) -> None:
    """Data wait + step work + checkpoint block = the window's time, but for the loop's own
    bookkeeping between the timed parts (the lr, logging): at most ``slack`` of it (+ 20 ms)."""
    parts = perf["perf/data_wait_s"] + perf["perf/compute_s"] + perf["perf/checkpoint_block_s"]
    assert parts <= wall + 1e-6
    assert wall - parts <= slack * wall + 0.02, (parts, wall)
    for key in ("perf/data_stall_pct", "perf/checkpoint_stall_pct"):
        assert 0.0 <= perf[key] <= 100.0


def test_parts_of_a_window_add_up_to_its_time():
    clock = StepClock(CPU)
    clock.start()
    _steps(clock, 3)
    with clock.blocked():  # a mid-epoch save, inside the running steps
        time.sleep(0.01)
    interval = clock.read("interval")
    _steps(clock, 2)
    clock.stop()
    epoch = clock.read("epoch")
    with clock.blocked():  # the epoch-end save, after the record: in the next windows
        time.sleep(0.01)
    run = clock.read("run")

    for perf, steps in ((interval, 3), (epoch, 5), (run, 5)):
        wall = perf["perf/step_s"] * steps
        _parts_add_up(perf, wall)
        assert perf["perf/img_per_s_per_worker"] == pytest.approx(4 * steps / wall)
        assert perf["perf/data_stall_pct"] == pytest.approx(100 * perf["perf/data_wait_s"] / wall)
        assert "perf/mfu" not in perf and "perf/peak_mem_gb" not in perf  # on a CPU: absent
    assert epoch["perf/checkpoint_block_s"] == pytest.approx(interval["perf/checkpoint_block_s"])
    # The run's window holds the epoch's and the save made after the epoch's record.
    assert run["perf/checkpoint_block_s"] > epoch["perf/checkpoint_block_s"]
    assert run["perf/data_wait_s"] == pytest.approx(epoch["perf/data_wait_s"])
    assert run["perf/step_s"] * 5 == pytest.approx(
        epoch["perf/step_s"] * 5 + run["perf/checkpoint_block_s"] - epoch["perf/checkpoint_block_s"]
    )
    nxt = clock.read("epoch")  # the next epoch's window starts with that save
    assert nxt["perf/checkpoint_block_s"] == pytest.approx(
        run["perf/checkpoint_block_s"] - epoch["perf/checkpoint_block_s"]
    )


def test_mfu_from_a_device_name_and_a_step_time_is_the_hand_computation():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12  # not the SXM part's
    assert peak_flops("NVIDIA H200", "fp16") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "tf32") == 156e12
    assert peak_flops("NVIDIA L4", "bf16") == 121e12
    assert peak_flops("Tesla T4", "fp16") is None  # not in the table: no MFU rather than a wrong one
    assert [peak_precision(a) for a in ("bf16", "fp16", "none")] == ["bf16", "fp16", "tf32"]

    # ResNet-50 at 224: 4.1 G multiply-adds; 512 images in 2 s on one worker of an A100 in bf16.
    macs, peak = 4_100_000_000, peak_flops("NVIDIA A100-SXM4-80GB", "bf16")
    hand = 4.1e9 * 2 * 3 * (512 / 2.0) / 312e12
    assert model_flops_utilisation(macs, 256.0, peak) == pytest.approx(hand)
    clock = StepClock(CPU, macs_at={224: macs}.__getitem__, peak=peak)
    perf = clock.figures(Window(wall_s=2.0, steps=4, images=512, macs=512 * macs))
    assert perf["perf/mfu"] == pytest.approx(hand)
    assert perf["perf/step_s"] == pytest.approx(0.5)
    assert "perf/mfu" not in StepClock(CPU).figures(Window(wall_s=2.0, steps=4, images=512))


def test_summary_line_says_where_the_time_went():
    on_cpu = {"data_stall_pct": 3.14, "checkpoint_stall_pct": 0.42, "mfu": None, "device_name": "cpu"}
    assert describe_time(on_cpu) == "data stall 3.1 %, checkpoint stall 0.4 %, MFU n/a on CPU"
    on_h100 = {**on_cpu, "mfu": 0.4123, "device_name": "NVIDIA H100 80GB HBM3"}
    assert describe_time(on_h100).endswith("MFU 41.2 % (NVIDIA H100 80GB HBM3)")
    assert describe_time({**on_cpu, "device_name": "Tesla T4"}).endswith(
        "MFU n/a (no peak known for Tesla T4)"
    )
    assert describe_time({}) == "data stall -, checkpoint stall -, MFU n/a on CPU"  # an older summary.json


# ---------------------------------------------------------------- the stall note


def _fake_run(device: str = "cpu", **data: object) -> SimpleNamespace:
    cfg = load_config(None, [f"data.{k}={v}" for k, v in data.items()])
    return SimpleNamespace(cfg=cfg, ctx=SimpleNamespace(device=torch.device(device), is_main=True))


def test_the_likely_cause_names_the_setting_to_change():
    from pipeline.train.stall import likely_cause

    threads = likely_cause(_fake_run(num_threads=2), 2, None)
    assert "2 thread(s)" in threads and "data.num_threads" in threads
    derived = likely_cause(_fake_run(), 1, None)
    assert "derived from cluster.cpus_per_worker" in derived
    decoder = likely_cause(_fake_run("cuda", decoder="cpu"), 4, None)
    assert "data.decoder=cpu" in decoder and "data.decoder=auto" in decoder
    fetching = likely_cause(
        _fake_run(), 4, {"gets": 12, "retries": 3, "throttled": 2, "wait_s": 1.0, "bytes": 9}
    )
    assert "12 GETs" in fetching and "2 refused with 503" in fetching and "data.cache_fetchers" in fetching
    filled = likely_cause(
        _fake_run(), 4, {"gets": 0, "retries": 0, "throttled": 0, "wait_s": 0.0, "bytes": 0}
    )
    assert "data.num_threads" in filled  # a full cache is not the cause


class _Loader:
    """Batches held in memory (next() costs nothing), or the same behind a sleep per batch."""

    def __init__(self, batches: list, sleep_s: float = 0.0):
        self.batches, self.sleep_s = batches, sleep_s

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, start: int = 0):
        for batch in self.batches:  # all of them whatever ``start``: the test resumes mid-epoch
            time.sleep(self.sleep_s)
            yield batch


@pytest.fixture(scope="module")
def cpu_run(tiny_imagenet, tmp_path_factory):
    from pipeline.train.distributed import init_context
    from pipeline.train.setup import setup_run

    overrides = tiny_overrides(tiny_imagenet, tmp_path_factory.mktemp("stall"), "stall")
    overrides += ["cluster.num_workers=1", "log_every_n_steps=1000", "tracking.log_every_n_steps=1000"]
    run = setup_run(load_config(None, overrides), init_context(False, use_gpu=False))
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(16, 3, 48, 48, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(4)
    ]
    return run, batches


@pytest.mark.parametrize("sleep_s, said", [(0.2, 1), (0.0, 0)])
def test_a_data_stall_is_named_once_per_run_and_only_when_there_is_one(cpu_run, capsys, sleep_s, said):
    import dataclasses

    from pipeline.train.loop import train_one_epoch
    from pipeline.train.setup import TrainingProgress
    from pipeline.train.stall import StallNote

    run, batches = cpu_run
    run.data = dataclasses.replace(run.data, train=_Loader(batches, sleep_s))
    quiet = SimpleNamespace(steps=lambda metrics, step, console, track: None)
    clock, note = StepClock.for_run(run), StallNote.for_run(run)
    progress, stalls = TrainingProgress(), []
    for epoch in range(2):
        # 4 of the 8 steps of the epoch: the run's config says 8, the loader holds 4.
        progress = dataclasses.replace(progress, step=epoch * 8 + 4)
        metrics, progress = train_one_epoch(run, epoch, progress, quiet, clock)
        stalls.append(metrics["perf/data_stall_pct"])
        note.check(epoch, metrics)
    out = capsys.readouterr().out
    assert out.count("warning: data stall") == said, (stalls, out)
    if said:
        assert all(s > 10 for s in stalls)  # over the threshold both times, said once
        assert "data.num_threads" in out and "perf/data_stall_pct" in out
    else:
        assert all(s < 10 for s in stalls)


# ---------------------------------------------------------------- a real run's keys


@pytest.mark.slow
def test_a_no_ray_run_logs_perf_keys_to_metrics_wandb_and_the_summary(tiny_imagenet, tmp_path):
    from pipeline.tracking.offline import read_wandb_history

    proc = train_one_process(
        tiny_imagenet,
        tmp_path,
        "perf",
        "schedule.epochs=1",
        "tracking.log_every_n_steps=2",
        "checkpoint.every_n_steps=4",  # a mid-epoch save: a checkpoint block inside the epoch
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    on_cpu = set(PERF_METRICS) - set(OPTIONAL_METRICS)  # no MFU, no GPU memory
    (record,) = [json.loads(line) for line in (tmp_path / "perf" / "metrics.jsonl").read_text().splitlines()]
    assert on_cpu <= set(record) and "perf/mfu" not in record and "perf/peak_mem_gb" not in record
    assert record["perf/checkpoint_block_s"] > 0
    _parts_add_up(record, record["perf/step_s"] * 8, slack=0.2)  # W&B rows and console lines too
    assert record["data_wait_frac"] == pytest.approx(record["perf/data_wait_s"] / record["epoch_time_s"])

    summary = json.loads((tmp_path / "perf" / "summary.json").read_text())
    assert summary["device_name"] == "cpu" and summary["mfu"] is None and summary["peak_mem_gb"] is None
    assert 0 <= summary["data_stall_pct"] <= 100 and 0 < summary["checkpoint_stall_pct"] <= 100
    block = proc.stdout[proc.stdout.index("== summary ==") :]
    assert f"  {'time':<14} {describe_time(summary)}" in block and "MFU n/a on CPU" in block

    (run_file,) = Path(summary["wandb_dir"]).glob("*.wandb")
    rows = read_wandb_history(run_file)
    step_rows = [r for r in rows if "train/step_loss" in r]
    epoch_rows = [r for r in rows if "train/loss" in r]
    assert len(step_rows) == 4 and len(epoch_rows) == 1  # 8 steps, a row every 2
    assert all(on_cpu <= set(r) for r in step_rows + epoch_rows)
    assert epoch_rows[0]["perf/data_stall_pct"] == pytest.approx(record["perf/data_stall_pct"])
