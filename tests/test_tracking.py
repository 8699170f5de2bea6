"""W&B tracking without a network: offline runs read back from their ``.wandb`` files.

Every test runs wandb with a throw-away HOME, netrc and config folder, and no API key, so
nothing on this machine (or the network) is touched.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from pipeline.config import TrackingConfig
from pipeline.tracking.offline import read_wandb_history, read_wandb_records
from pipeline.tracking.tracker import Tracker, TrackingWarning

pytest.importorskip("wandb")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"name": "t", "model": {"name": "cifar_resnet20"}, "optim": {"lr": 0.1}}


def _isolate(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("WANDB__DISABLE_STATS", "true")  # no system-metrics sampler on 2 shared cores


def _teardown_wandb() -> None:
    import wandb

    # A fresh wandb service per test: it re-reads the (patched) environment on start.
    wandb.teardown()


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _isolate(monkeypatch, tmp_path / "home")
    _teardown_wandb()
    yield tmp_path
    _teardown_wandb()


def _wandb_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/*run-*/run-*.wandb"))


def _epoch_rows(history: list[dict]) -> list[dict]:
    return [row for row in history if "epoch" in row]


def _log_epochs(tracker: Tracker, epochs: range, steps_per_epoch: int = 10) -> None:
    for epoch in epochs:
        for step in range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1):
            if step % 5 == 0:
                tracker.log({"train/step_loss": 2.0 / step, "lr": 0.1, "img_per_s": 1000.0}, step=step)
        step = (epoch + 1) * steps_per_epoch
        tracker.log(
            {
                "epoch": epoch + 1,
                "step": step,
                "lr": 0.1,
                "train/loss": 2.0 - 0.1 * epoch,
                "train/top1_err": 60.0 - epoch,
                "train/top5_err": 20.0 - epoch,
                "val/top1_err": 65.0 - 2 * epoch,
                "val/top5_err": 25.0 - epoch,
                "img_per_s": 1000.0,
                "epoch_time_s": 1.5,
                "data_wait_frac": 0.1,
            },
            step=step,
        )


# ---------------------------------------------------------------- offline run, read back


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("offline")
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, tmp / "home")
        _teardown_wandb()
        cfg = TrackingConfig(mode="offline", project="p", group="degradation-cifar10", tags=("cifar", "test"))
        tracker = Tracker.create(
            cfg, run_name="resnet20", run_dir=tmp / "run", config=CONFIG, run_id=None, is_main=True
        )
        _log_epochs(tracker, range(3))
        # One row wider than a 32 KiB block (split FIRST/MIDDLE/LAST) and enough rows before it
        # to cross block boundaries: the reader's framing is checked against wandb's own writer.
        tracker.log({f"wide/k{i:04d}": float(i) for i in range(2500)}, step=1000)
        tracker.summary({"final/center/top1_err": 61.0, "final/center/top5_err": 23.0})
        tracker.finish()
        _teardown_wandb()
    return tracker, tmp / "run"


def test_offline_run_holds_logged_history(offline_run):
    tracker, run_dir = offline_run
    assert tracker.mode == "offline" and tracker.run_id
    files = _wandb_files(run_dir)
    assert len(files) == 1 and files[0].name == f"run-{tracker.run_id}.wandb"
    assert Path(tracker.wandb_dir) == files[0].parent

    history = read_wandb_history(files[0])
    epochs = _epoch_rows(history)
    assert [row["epoch"] for row in epochs] == [1, 2, 3]
    assert [row["_step"] for row in epochs] == [10, 20, 30]  # step = global iteration
    assert [row["val/top1_err"] for row in epochs] == [65.0, 63.0, 61.0]
    assert [row["train/top5_err"] for row in epochs] == [20.0, 19.0, 18.0]
    assert all({"lr", "img_per_s", "epoch_time_s", "data_wait_frac", "train/loss"} <= set(r) for r in epochs)
    step_rows = [row for row in history if "train/step_loss" in row]
    assert [row["_step"] for row in step_rows] == [5, 10, 15, 20, 25, 30]
    assert step_rows[0]["train/step_loss"] == pytest.approx(0.4)
    wide = history[-1]
    assert wide["_step"] == 1000 and wide["wide/k2499"] == 2499.0


def test_offline_run_records_run_metadata_and_metric_definitions(offline_run):
    tracker, run_dir = offline_run
    records = list(read_wandb_records(_wandb_files(run_dir)[0]))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds.count("run") == 1 and "exit" in kinds

    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id == tracker.run_id
    assert (run.project, run.run_group, run.display_name) == ("p", "degradation-cifar10", "resnet20")
    assert list(run.tags) == ["cifar", "test"]
    config = {item.key: item.value_json for item in run.config.update}
    assert '"cifar_resnet20"' in config["model"]

    metrics = {
        (m.metric.name or m.metric.glob_name): m.metric
        for m in records
        if m.WhichOneof("record_type") == "metric"
    }
    for name in ("val/top1_err", "val/top5_err", "train/top1_err", "epoch_time_s", "val/loss"):
        assert metrics[name].step_metric == "epoch", name
    assert metrics["val/top1_err"].summary.min and metrics["val/top1_err"].summary.last
    assert metrics["step"].options.hidden
    assert "train/step_loss" not in metrics and "lr" not in metrics  # charted against the iteration

    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(
                {item.key or "/".join(item.nested_key): item.value_json for item in r.summary.update}
            )
    assert summary["final/center/top1_err"] == "61.0"
    assert '"min":61' in summary["val/top1_err"]  # the best validation error


def test_reader_rejects_corrupt_records(offline_run, tmp_path: Path):
    _, run_dir = offline_run
    good = _wandb_files(run_dir)[0].read_bytes()
    data = bytearray(good)
    data[200] ^= 0xFF
    bad = tmp_path / "bad.wandb"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        list(read_wandb_records(bad))
    (tmp_path / "not.wandb").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not a .wandb file"):
        list(read_wandb_records(tmp_path / "not.wandb"))
    # A run killed mid-write leaves a truncated tail: read what is whole, quietly.
    (tmp_path / "cut.wandb").write_bytes(good[: len(good) // 2])
    whole = len(list(read_wandb_records(_wandb_files(run_dir)[0])))
    assert 0 < len(list(read_wandb_records(tmp_path / "cut.wandb"))) < whole


# ---------------------------------------------------------------- resume, disabled, fallback


def test_restart_logs_into_the_same_run(wandb_env: Path):
    cfg = TrackingConfig(mode="offline", project="p")
    run_dir = wandb_env / "run"
    first = Tracker.create(cfg, run_name="r", run_dir=run_dir, config=CONFIG, run_id=None, is_main=True)
    _log_epochs(first, range(2))
    first.finish()  # a crash or preemption after epoch 2; the checkpoint keeps first.run_id

    second = Tracker.create(
        cfg, run_name="r", run_dir=run_dir, config=CONFIG, run_id=first.run_id, is_main=True
    )
    assert second.run_id == first.run_id and second.mode == "offline"
    _log_epochs(second, range(2, 4))
    second.finish()

    files = _wandb_files(run_dir)
    assert len(files) == 2 and {f.name for f in files} == {f"run-{first.run_id}.wandb"}
    run_ids = [
        r.run.run_id for f in files for r in read_wandb_records(f) if r.WhichOneof("record_type") == "run"
    ]
    assert run_ids == [first.run_id, first.run_id]
    epochs = [row["epoch"] for f in files for row in _epoch_rows(read_wandb_history(f))]
    assert epochs == [1, 2, 3, 4]


def test_disabled_and_non_main_write_nothing_and_never_import_wandb(tmp_path: Path):
    script = f"""
import sys, pathlib
from pipeline.config import TrackingConfig
from pipeline.tracking.tracker import Tracker
run_dir = pathlib.Path({str(tmp_path / "run")!r})
for cfg, is_main in ((TrackingConfig(mode="disabled"), True), (TrackingConfig(mode="online"), False)):
    t = Tracker.create(cfg, run_name="r", run_dir=run_dir, config={{}}, run_id="keepme", is_main=is_main)
    t.log({{"epoch": 1, "val/top1_err": 50.0}}, step=10)
    t.summary({{"a": 1}})
    t.finish()
    assert (t.mode, t.wandb_dir, t.run_id) == ("disabled", None, "keepme"), (t.mode, t.wandb_dir, t.run_id)
assert "wandb" not in sys.modules
print("ok")
"""
    env = {**os.environ, "WANDB_MODE": "offline"}  # a machine-wide safety net does not re-enable "disabled"
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert not (tmp_path / "run").exists()


def test_wandb_mode_environment_variable_wins(wandb_env: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = Tracker.create(
        TrackingConfig(mode="offline"),
        run_name="r",
        run_dir=wandb_env / "run",
        config={},
        run_id=None,
        is_main=True,
    )
    assert tracker.mode == "disabled" and tracker.wandb_dir is None
    assert not (wandb_env / "run").exists()


def _fallback(
    run_dir: Path, run_id: str | None = None
) -> tuple[Tracker, list[warnings.WarningMessage], float]:
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker.create(
            TrackingConfig(mode="online", project="p"),
            run_name="r",
            run_dir=run_dir,
            config=CONFIG,
            run_id=run_id,
            is_main=True,
        )
    elapsed = time.monotonic() - start
    _log_epochs(tracker, range(1))
    tracker.finish()
    return tracker, [w for w in caught if issubclass(w.category, TrackingWarning)], elapsed


def test_online_without_key_falls_back_to_offline_with_one_warning(wandb_env: Path):
    tracker, caught, elapsed = _fallback(wandb_env / "run")
    assert tracker.mode == "offline"
    assert len(caught) == 1 and "no W&B API key" in str(caught[0].message)
    assert "wandb sync" in str(caught[0].message)
    assert elapsed < 30  # never a prompt, never a network wait
    assert [r["epoch"] for r in _epoch_rows(read_wandb_history(_wandb_files(wandb_env / "run")[0]))] == [1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_online_with_unreachable_server_falls_back_within_the_init_timeout(
    wandb_env: Path, monkeypatch: pytest.MonkeyPatch
):
    fake_key = "f" * 40
    monkeypatch.setenv("WANDB_API_KEY", fake_key)
    # A closed port on this machine: "no network" without touching one.
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    tracker, caught, elapsed = _fallback(wandb_env / "run", run_id="keepid01")
    assert tracker.mode == "offline" and tracker.run_id == "keepid01"
    assert len(caught) == 1 and "wandb.init failed" in str(caught[0].message)
    assert elapsed < 30
    # The failed online attempt leaves wandb's own run-*-keepid01 folder (`wandb sync` skips
    # online runs by default); the data went to the offline run.
    files = sorted((wandb_env / "run").glob("wandb/offline-run-*/*.wandb"))
    assert [f.name for f in files] == ["run-keepid01.wandb"]
    assert [r["epoch"] for r in _epoch_rows(read_wandb_history(files[0]))] == [1]
    # The key is read by wandb from the environment only; it lands in no file.
    for path in (wandb_env / "run").rglob("*"):
        if path.is_file():
            assert fake_key.encode() not in path.read_bytes(), path


def test_a_failing_wandb_call_warns_once_and_training_goes_on():
    class BrokenRun:
        calls = 0

        def log(self, row, step):
            BrokenRun.calls += 1
            raise ConnectionError("service died")

    tracker = Tracker(BrokenRun(), mode="offline", run_id="x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            tracker.log({"lr": 0.1}, step=step)
        tracker.summary({"a": 1})
        tracker.finish()
    assert BrokenRun.calls == 1
    assert [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)] == [
        "W&B: log failed (ConnectionError: service died); tracking is off for the rest of this run"
    ]
