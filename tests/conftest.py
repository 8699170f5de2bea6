"""Shared fixtures: small generated datasets (real JPEG / CIFAR archive formats) and one local Ray."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Keep W&B and Ray quiet and offline in every test, whatever the developer's shell says.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)
# One torch (OpenMP) thread per process, here and in every command a test starts: `make test`
# runs two test processes on two cores, and pools sized to every core then spin at barriers
# for each other's descheduled threads (two 3-epoch CPU runs side by side took 20 s with the
# default pools, 10.6 s with one thread each; one run alone 8.9 s against 9.7 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")


ROOT = Path(__file__).resolve().parents[1]
# cluster/localnodes.py (the cluster tests' and the drill's harness), cluster/drill_checks.py, ...
sys.path.insert(0, str(ROOT / "cluster"))


# The test tiers (pyproject's markers; `make test-fast` runs what has none of them). Files whose
# every test starts several Ray nodes or a cluster job are `cluster`; a test that takes the
# test file's Ray (`local_ray`) is `ray`; `slow` is marked on the tests themselves.
CLUSTER_FILES = {"test_cluster_e2e.py", "test_cluster_paths.py", "test_drill.py"}
NODE_FILES = CLUSTER_FILES | {"test_localnodes.py"}  # these start nodes with cluster/localnodes.py


# The upper bound of a slow or multi-node test that sets none itself (`pytest.mark.timeout`);
# the rest have pyproject's `timeout` (300 s). A hang then fails that test by name instead of
# spending CI's whole budget; the bound is about 3x such a test's time on an idle machine.
SLOW_TIMEOUT_S = 900


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in CLUSTER_FILES:
            item.add_marker(pytest.mark.cluster)
        if "local_ray" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
        # Under pytest-xdist (`make test` runs two processes): a file's tests stay in one process
        # (its module fixtures are built once), and the files that start Ray nodes share one
        # group, so two clusters of nodes (a drill starts five) never run at once.
        group = "nodes" if item.path.name in NODE_FILES else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))
        slow = item.get_closest_marker("slow") or item.get_closest_marker("cluster")
        if slow and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
    items.sort(key=_heaviest_group_first(items))


def _heaviest_group_first(items: list[pytest.Item]):
    """A sort key that puts the xdist groups with the most end-to-end tests (slow, ray or
    cluster: tens of seconds each) first, keeping each group's order. `make test` hands out groups
    in this order (``--no-loadscope-reorder``), so both processes end on short unit-test files
    instead of one of them running a multi-minute file alone at the end (a minute of one idle
    core in a fresh-clone CI run, when groups went by their number of tests)."""

    def group(item: pytest.Item) -> str:
        return item.get_closest_marker("xdist_group").args[0]

    heavy: dict[str, int] = {}
    for item in items:
        e2e = any(item.get_closest_marker(m) for m in ("slow", "ray", "cluster"))
        heavy[group(item)] = heavy.get(group(item), 0) + int(e2e)
    return lambda item: -heavy[group(item)]


def run_pipeline(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` from the repository root, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory) -> Path:
    """4 classes x 32 train / 4 val JPEGs in the ImageNet folder layout."""
    from pipeline.data.prep.synth import write_synthetic_imagenet

    root = tmp_path_factory.mktemp("tiny-imagenet") / "data"
    write_synthetic_imagenet(root, classes=4, train_per_class=32, val_per_class=4, seed=0)
    return root


@pytest.fixture(scope="module")
def local_ray():
    """One 2-CPU local Ray for a test file's tests (starting Ray costs seconds), with its dashboard
    as the CLI's own local Ray has. Per file, not per session: three files use it, and an idle Ray
    with its dashboard takes about 4 CPU-seconds a minute (measured), which a session-long one
    spent beside every later test of its process. Ray Train's placement group cleaner asks the state API (a
    dashboard module) whether the run's controller lives; a Ray without a dashboard sends that
    query to 127.0.0.1:8265, where another test's cluster may answer that it knows no such
    actor, and the cleaner then removed a running group's placement group."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=True)
    yield ray
    ray.shutdown()


def train_one_process(data_root: Path, storage: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    """``python -m pipeline train --config configs/demo.yaml --no-ray`` on one process, with
    ``tiny_overrides`` and then ``extra``."""
    return run_pipeline(
        "train", "--config", "configs/demo.yaml", "--no-ray",
        *tiny_overrides(data_root, storage, name), "cluster.num_workers=1", *extra,
    )  # fmt: skip


def tiny_overrides(data_root: Path, storage: Path, name: str = "tiny") -> list[str]:
    """A config small enough to train in seconds on two CPU cores."""
    return [
        f"name={name}",
        f"data.root={data_root}",
        "data.crop_size=48",
        "data.scale_min=52",
        "data.scale_max=64",
        "data.val_resize=52",
        "model.name=resnet18",
        "model.num_classes=4",
        "optim.batch_size=16",
        "optim.scale_lr=false",
        "optim.lr=0.01",
        "model.zero_init_residual=true",  # smooth, monotone early training on tiny data
        "schedule.kind=constant",
        "schedule.epochs=4",
        "eval.mode=center",
        "eval.final_mode=tencrop",
        "cluster.num_workers=2",
        "cluster.use_gpu=false",
        "tracking.mode=offline",
        "log_every_n_steps=2",
        f"checkpoint.storage_path={storage}",
    ]


@contextlib.contextmanager
def moto_s3(*buckets: str) -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 holding ``buckets``, and the AWS environment that points
    every client (pyarrow, DALI, boto3, subprocesses given it) at it; set in this process too."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
            mp.delenv("AWS_PROFILE", raising=False)
            import pyarrow.fs

            for bucket in buckets:
                fs, _ = pyarrow.fs.FileSystem.from_uri(f"s3://{bucket}?allow_bucket_creation=true")
                fs.create_dir(bucket)
            yield env
    finally:
        server.stop()


@pytest.fixture
def recorded_trainer(monkeypatch) -> dict:
    """``run_on_ray`` without Ray: the ``TorchTrainer`` it builds records its arguments (returned
    here) and ``fit()`` returns "fitted"; no cluster is inspected (a one-node CPU plan)."""
    import ray
    import ray.train.torch

    from pipeline.driver import ray_runner
    from pipeline.driver.cluster_check import WorkerPlan

    built: dict = {}

    class RecordingTrainer:
        def __init__(self, worker, **kwargs):
            built.update(kwargs)

        def fit(self):
            return "fitted"

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", RecordingTrainer)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # as if joined: start no Ray here
    plan = WorkerPlan(False, {"CPU": 1}, "cluster.use_gpu=false", "1 worker fits")
    monkeypatch.setattr(ray_runner, "check_cluster", lambda cfg, address: plan)
    # run_on_ray sets these in os.environ; monkeypatch puts them back as they were afterwards.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "900")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    return built


def tune_make_env(ray_tmp: str) -> dict[str, str]:
    """The environment of a `make degradation` / `make construction` run in a test: W&B offline,
    the test's own Ray session folder (short: socket paths are at most 107 bytes), a small object
    store, and no key or Ray address from the developer's shell."""
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB__DISABLE_STATS": "true",
        "RAY_TMPDIR": ray_tmp,
        "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.0125",  # ~300 MB on a 24 GiB machine
    }
    for key in ("WANDB_API_KEY", "RAY_ADDRESS"):
        env.pop(key, None)
    return env


# ---------------------------------------------------------------- the sharded layout's data (tests/shard_data.py)
# Module-scoped: test_data_shards (writing) and test_data_shard_feed (reading) each build their own.


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A small synthetic ImageNet in the folder layout, the source of the shards."""
    from shard_data import write_source

    return write_source(tmp_path_factory.mktemp("shards") / "src")


@pytest.fixture(scope="module")
def sharded(src, tmp_path_factory) -> Path:
    """``src`` written as shards (``data shard``) with its manifest."""
    from shard_data import write_sharded

    return write_sharded(src, tmp_path_factory.mktemp("shards") / "out")


@pytest.fixture(scope="module")
def s3():
    """The S3 latency server (moto behind ``pipeline.bench.s3_latency``); a module may define its own."""
    from shard_data import latency_s3

    with latency_s3() as server:
        yield server


# The Tensor methods that make the host wait for the device (a read back).
SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@pytest.fixture
def count_syncs(monkeypatch):
    """Counts of the host-synchronising Tensor methods called while the fixture is active."""
    from collections import Counter

    import torch

    counts: Counter[str] = Counter()
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts
