"""The commands README.md, cluster/README.md and docs/ show, run as their documents write them.

Each test quotes its command exactly as the document prints it (continuation lines joined) and
first checks that the document still prints it: a README command that changes fails here until
its test changes with it. The paths a document names (``/data/imagenet``, ``s3://my-bucket``,
``runs/...``) are mapped onto generated data in a temporary folder (and a local S3 server), and
size overrides are appended so the paper's networks take a few steps in seconds; nothing else
about the command changes. Commands the README runs with Ray run with Ray here: the first
starts a local Ray of its own, as on a laptop (``Ray: local``); the others run as in a shell on
a cluster's node, ``RAY_ADDRESS`` naming one running head that they share (``on_head``), which
spares each the seconds of CPU a local Ray's start and stop cost.

Commands that need a cluster of nodes are run as written by their own tests:
``make submit`` / ``make job-logs`` (tests/test_cluster_e2e.py), ``make degradation`` and the
``sweep`` it runs (tests/test_degradation.py), ``make drill`` (tests/test_drill.py).
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import moto_s3

ROOT = Path(__file__).resolve().parents[1]
DOCS = {
    name: ROOT / name
    for name in ("README.md", "cluster/README.md", "docs/wandb.md", "docs/cluster-checks.md")
}
VENV_BIN = Path(sys.executable).parent

# Appended to the ImageNet configs so ResNet-34/50 take two steps on 32 px crops in seconds.
TINY = [
    "data.crop_size=32",
    "data.scale_min=36",
    "data.scale_max=48",
    "data.val_resize=36",
    "model.num_classes=4",
    "optim.batch_size=16",
    "schedule.max_iters=2",
    "eval.scales=[36,48]",
    "tracking.mode=offline",
]

pytestmark = [pytest.mark.slow]


def documented(doc: str, command: str) -> str:
    """``command`` as ``doc`` prints it (a line, or lines joined at their ``\\``), else the test fails."""
    text = DOCS[doc].read_text()
    joined = re.sub(r"\\\n\s*", "", text)  # shell continuations
    flat = " ".join(joined.split())
    assert " ".join(command.split()) in flat, f"{doc} no longer shows: {command}\n(update this test with it)"
    return command


def run(command: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """The command in a shell at the repository root, the project's venv first on PATH (as after
    `make install` with the venv activated)."""
    proc = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{command}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def with_make_args(command: str, extra: list[str]) -> str:
    """A ``make`` command with ``extra`` added to its ARGS (or an ARGS made of them)."""
    if 'ARGS="' in command:
        return command.replace('ARGS="', 'ARGS="' + " ".join(extra) + " ", 1)
    return command + ' ARGS="' + " ".join(extra) + '"'


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> dict[str, Path]:
    """The folders the documents' paths are mapped onto."""
    tmp = tmp_path_factory.mktemp("readme")
    return {"tmp": tmp, "runs": tmp / "runs", "imagenet": tmp / "imagenet"}


@pytest.fixture(scope="module")
def env(place) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_API"))}
    return {**base, "PATH": f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}", "WANDB_MODE": "offline"}


@pytest.fixture(scope="module")
def imagenet(place, env) -> Path:
    """4 classes x 130 training images (one global batch of 512 fits) and 4 x 4 validation
    images, with the per-pixel mean at the 32 px crops of ``TINY``."""
    from pipeline.data.prep.synth import write_synthetic_imagenet

    root = place["imagenet"]
    write_synthetic_imagenet(root, classes=4, train_per_class=130, val_per_class=4, seed=0)
    run(f"python -m pipeline data stats {root} --crop-size 32", env)
    return root


def tiny(place) -> list[str]:
    return [*TINY, f"checkpoint.storage_path={place['runs']}"]


@pytest.fixture(scope="module")
def bucket(env):
    """A local S3 server with ``my-bucket``; the commands' environment pointing at it."""
    with moto_s3("my-bucket") as aws:
        yield {**env, **aws}


@pytest.fixture(scope="module")
def on_head(bucket):
    """The environment of a shell on a Ray cluster's node: ``RAY_ADDRESS`` names a running head
    (cluster/localnodes.py: 2 CPUs, token auth, its dashboard), whose workers have the S3
    server's environment as a cluster's nodes have their cloud's."""
    from localnodes import MARKER, LocalNodes

    aws = {k: v for k, v in bucket.items() if k.startswith("AWS_")}
    nodes = LocalNodes("readme", venv_on_path=True, env={**aws, "WANDB_MODE": "offline"})
    try:
        nodes.start("head", head=True, num_cpus=2)
        client = {k: nodes.client_env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", MARKER)}
        yield {**bucket, **client, "RAY_ADDRESS": nodes.gcs}
    finally:
        nodes.stop()


# ---------------------------------------------------------------- data tools (no Ray)


def test_demo_dataset_command(place, env):
    command = documented(
        "README.md",
        "python -m pipeline data synth --out data/synth-demo --classes 10 --train-per-class 100 --val-per-class 20",
    )
    out = place["tmp"] / "synth-demo"
    proc = run(command.replace("data/synth-demo", str(out)), env)
    assert len(list((out / "train").glob("*/*.JPEG"))) == 1000, proc.stdout
    assert len(list((out / "val").glob("*/*.JPEG"))) == 200


def test_preparing_imagenet_commands(place, env):
    """prepare-val on a flat val folder with the devkit's CSV, verify --fix, check-layout, stats."""
    from pipeline.data.prep.synth import write_synthetic_imagenet

    root = place["tmp"] / "raw-imagenet"
    write_synthetic_imagenet(root, classes=3, train_per_class=4, val_per_class=2, seed=1)
    labels = place["tmp"] / "LOC_val_solution.csv"
    with open(labels, "w", newline="") as f:  # the val set as ImageNet ships it: flat, labels in a CSV
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for i, path in enumerate(sorted((root / "val").glob("*/*.JPEG"))):
            name = f"ILSVRC2012_val_{i + 1:08d}"
            writer.writerow([name, f"{path.parent.name} 1 2 30 40"])
            path.rename(root / "val" / f"{name}.JPEG")
    for folder in (root / "val").iterdir():
        if folder.is_dir():
            folder.rmdir()
    (root / "train" / sorted(p.name for p in (root / "train").iterdir())[0] / "x_png.JPEG").write_bytes(
        _png_bytes()
    )  # a PNG named .JPEG, as ImageNet has one
    commands = [
        "python -m pipeline data prepare-val --val /data/imagenet/val --labels LOC_val_solution.csv",
        "python -m pipeline data verify /data/imagenet --fix",
        "python -m pipeline data check-layout /data/imagenet",
        "python -m pipeline data stats /data/imagenet",
    ]
    outputs = []
    for command in commands:
        documented("README.md", command)
        mapped = command.replace("/data/imagenet", str(root)).replace("LOC_val_solution.csv", str(labels))
        outputs.append(run(mapped, env).stdout)
    assert len(list((root / "val").glob("*/*.JPEG"))) == 6
    assert "rewritten" in outputs[1] or "fixed" in outputs[1], outputs[1]
    assert (root / "train_mean.npz").is_file()


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("doc", "command"),
    [
        (
            "README.md",
            "python -m pipeline dashboard --kind degradation --entity ENTITY --project resnet-pipeline --group degradation-cifar10",
        ),
        ("docs/wandb.md", "python -m pipeline dashboard --kind training --entity ENTITY"),
        (
            "docs/wandb.md",
            "python -m pipeline dashboard --kind training --entity ENTITY --group imagenet-table3",
        ),
        (
            "docs/wandb.md",
            "python -m pipeline dashboard --kind imagenet-tables --entity ENTITY --group imagenet-table3",
        ),
        (
            "docs/wandb.md",
            "python -m pipeline dashboard --kind training --entity ENTITY --dry-run > workspace.json",
        ),
    ],
)
def test_dashboard_commands_without_a_key_print_the_json(doc, command, env, place):
    pytest.importorskip("wandb_workspaces")
    proc = run(documented(doc, command).replace("workspace.json", str(place["tmp"] / "workspace.json")), env)
    printed = (place["tmp"] / "workspace.json").read_text() if ">" in command else proc.stdout
    assert json.loads(printed[printed.index("{") :]), printed[:500]


# ---------------------------------------------------------------- training and evaluation (Ray)


@pytest.mark.ray
def test_train_imagenet_then_eval_of_its_checkpoint(imagenet, place, env, on_head):
    """`make train-imagenet` (ResNet-50, the paper's schedule, a local Ray), then the README's
    `eval` of its checkpoint, under Ray as written (it crashed there once: Result.metrics is None
    without a checkpoint). The other modes run under Ray in test_the_bucket_commands (tencrop)
    and test_eval_of_torchvision_weights (center); every mode's numbers are checked against one
    process in tests/test_train_evaluate.py."""
    make = documented("README.md", "make train-imagenet DATA=/data/imagenet")
    command = with_make_args(make.replace("make ", "make -o .venv/.installed ", 1), tiny(place))
    proc = run(command.replace("/data/imagenet", str(imagenet)), env)
    assert "Ray: local" in proc.stdout, proc.stdout[-2000:]
    assert json.loads((place["runs"] / "imagenet-resnet50" / "summary.json").read_text())["steps"] == 2
    checkpoint = place["runs"] / "imagenet-resnet50" / "checkpoint_epoch0001"
    assert (checkpoint / "state.pt").is_file(), sorted(
        p.name for p in (place["runs"] / "imagenet-resnet50").iterdir()
    )

    written = documented(
        "README.md",
        "python -m pipeline eval --config configs/imagenet/resnet50.yaml --checkpoint "
        "runs/imagenet-resnet50/checkpoint_epoch0120 data.root=/data/imagenet eval.mode=multiscale",
    )
    mapped = written.replace("runs/imagenet-resnet50/checkpoint_epoch0120", str(checkpoint)).replace(
        "/data/imagenet", str(imagenet)
    )
    proc = run(mapped + " " + " ".join(TINY), on_head)
    assert "Ray: cluster at" in proc.stdout, proc.stdout[-2000:]
    record = json.loads((checkpoint / "eval-multiscale.json").read_text())
    assert record["eval_mode"] == "multiscale" and record["images"] == 16, record
    assert 0 <= record["top1_err"] <= 100 and f"wrote {checkpoint}/eval-multiscale.json" in proc.stdout


@pytest.mark.ray
def test_train_imagenet_with_another_config_and_args(imagenet, place, on_head):
    """A fast recipe (docs/recipes.md: BlurPool, label smoothing, the linear schedule with
    warm-up, a test crop and its flip) at another global batch, under Ray."""
    make = documented(
        "README.md",
        "make train-imagenet DATA=/data/imagenet CONFIG=configs/imagenet/fast/rn50_16ep.yaml "
        'ARGS="optim.batch_size=512"',
    )
    extra = [o for o in tiny(place) if not o.startswith("optim.batch_size")] + ["schedule.max_iters=1"]
    extra += ["data.val_crop=32"]  # the recipe tests a 256 crop of the 293-resized image
    command = make.replace("make ", "make -o .venv/.installed ", 1).replace(
        'ARGS="optim.batch_size=512"', 'ARGS="optim.batch_size=512 ' + " ".join(extra) + '"'
    )
    proc = run(command.replace("/data/imagenet", str(imagenet)), on_head)
    assert "global batch 512" in proc.stdout, proc.stdout[-2000:]
    summary = json.loads((place["runs"] / "imagenet-rn50-16ep" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["eval_mode"] == "center", summary


@pytest.mark.ray
def test_a_fast_recipe_from_shards_in_the_bucket(imagenet, bucket, on_head, place):
    """The README's sharding command into the bucket, then a fast recipe trained from those shards
    under Ray on 2 workers: the crop grows after the first epoch (data.res_schedule, as the
    recipe's 160 -> 192 px at 32 -> 48 here) and the EMA of the weights is scored beside them."""
    shard = documented(
        "README.md", "python -m pipeline data shard /data/imagenet s3://bucket/imagenet-shards"
    )
    uri = "s3://my-bucket/imagenet-shards"
    run(shard.replace("/data/imagenet", str(imagenet)).replace("s3://bucket/imagenet-shards", uri)
        + " --shard-size-mb 0.5", bucket)  # fmt: skip
    extra = [
        "name=rn50-16ep-shards", "cluster.num_workers=2", "optim.batch_size=128", "schedule.epochs=2",
        "schedule.max_iters=null", "data.crop_size=32", "data.scale_min=48", "data.scale_max=64",
        "data.res_schedule.end_res=48", "data.res_schedule.start_ramp=0", "data.res_schedule.end_ramp=1",
        "data.res_schedule.step=16", "data.val_resize=36", "data.val_crop=32", "model.num_classes=4",
        "optim.ema_decay=0.9", f"data.cache_dir={place['tmp'] / 'shard-cache'}", "tracking.mode=offline",
        f"checkpoint.storage_path={place['runs']}",
    ]  # fmt: skip
    make = (
        "make -o .venv/.installed train-imagenet DATA=" + uri + " CONFIG=configs/imagenet/fast/rn50_16ep.yaml"
    )
    run(with_make_args(make, extra), on_head)
    folder = place["runs"] / "rn50-16ep-shards"
    epochs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [e["train/crop_px"] for e in epochs] == [32, 48]
    assert all(e["world_size"] == 2 and "val/ema_top1_err" in e for e in epochs), epochs
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["steps"] == 8 and "ema_val_top1_err" in summary and summary["data_bytes_fetched"] > 0


@pytest.mark.ray
def test_train_command_with_overrides(imagenet, place, on_head):
    written = documented(
        "README.md",
        "python -m pipeline train --config configs/imagenet/resnet50.yaml optim.lr=0.2 schedule.kind=step "
        "schedule.milestones=[30,60,90] schedule.epochs=90 precision.amp=bf16",
    )
    proc = run(written + f" data.root={imagenet} name=overrides " + " ".join(tiny(place)), on_head)
    summary = json.loads((place["runs"] / "overrides" / "summary.json").read_text())
    # lr 0.2 at the paper's batch 256, scaled linearly to this batch of 16 (as printed)
    assert summary["steps"] == 2 and "(base 0.2, linear scaling)" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.ray
def test_eval_of_torchvision_weights(imagenet, place, on_head):
    import torch
    import torchvision

    weights = place["tmp"] / "resnet50-0676ba61.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    written = documented(
        "README.md",
        "python -m pipeline eval --config configs/imagenet/resnet50.yaml --weights resnet50-0676ba61.pth "
        "model.name=resnet50_v1_5 data.normalize=meanstd data.root=/data/imagenet eval.mode=center",
    )
    mapped = written.replace("resnet50-0676ba61.pth", str(weights)).replace("/data/imagenet", str(imagenet))
    extra = [o for o in TINY if not o.startswith("model.num_classes")]  # torchvision's fc has 1000 outputs
    run(mapped + " " + " ".join(extra), on_head)
    record = json.loads(Path(f"{weights}.eval-center.json").read_text())
    assert record["weights"] == str(weights) and record["images"] == 16


@pytest.mark.ray
def test_dry_run_command(imagenet, place, on_head):
    written = documented(
        "docs/cluster-checks.md",
        "python -m pipeline train --config configs/imagenet/resnet50.yaml data.root=/mnt/imagenet --dry-run",
    )
    proc = run(written.replace("/mnt/imagenet", str(imagenet)) + " " + " ".join(tiny(place)), on_head)
    assert "dry run" in proc.stdout and "viable" in proc.stdout.lower(), proc.stdout[-2000:]


# ---------------------------------------------------------------- no shared filesystem (S3)


@pytest.mark.ray
def test_the_bucket_commands(imagenet, bucket, on_head, place):
    """cluster/README's "No shared filesystem": index and check the dataset in the bucket, then
    (after a run into the bucket) eval, report and wandb-sync from s3:// as written."""
    import pyarrow.fs

    from pipeline.store import locations

    fs, path = locations.filesystem("s3://my-bucket/imagenet")
    pyarrow.fs.copy_files(str(imagenet), path, destination_filesystem=fs)
    for command in (
        "python -m pipeline data index s3://my-bucket/imagenet",
        "python -m pipeline data check-layout s3://my-bucket/imagenet",
    ):
        run(documented("cluster/README.md", command), bucket)

    # The run the commands below read: ResNet-50 trained into the bucket.
    run(
        "python -m pipeline train --config configs/imagenet/resnet50.yaml name=resnet50 "
        "data.root=s3://my-bucket/imagenet "
        + " ".join([*TINY, "checkpoint.storage_path=s3://my-bucket/runs"]),
        on_head,
    )
    written = documented(
        "cluster/README.md",
        "python -m pipeline eval --config configs/imagenet/resnet50.yaml "
        "--checkpoint s3://my-bucket/runs/resnet50/checkpoint_epoch0089 eval.mode=tencrop",
    )
    # The config names no bucket for the data: data.root is added, as a user's config would hold it.
    mapped = written.replace("checkpoint_epoch0089", "checkpoint_epoch0001")
    run(mapped + " data.root=s3://my-bucket/imagenet " + " ".join(TINY), on_head)
    record = json.loads(
        locations.read_bytes("s3://my-bucket/runs/resnet50/checkpoint_epoch0001/eval-tencrop.json")
    )
    assert record["images"] == 16 and record["eval_mode"] == "tencrop"

    report = documented(
        "cluster/README.md", "python -m pipeline report --runs s3://my-bucket/runs/resnet50 --out report/"
    )
    out = place["tmp"] / "report"
    run(report.replace("report/", f"{out}/"), bucket)
    assert (out / "report.md").is_file() and (out / "curves.png").is_file()

    sync = documented("cluster/README.md", "python -m pipeline wandb-sync s3://my-bucket/runs/resnet50")
    proc = subprocess.run(
        ["bash", "-c", sync], cwd=place["tmp"], env=bucket, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (place["tmp"] / "wandb-merged" / "resnet50").is_dir(), proc.stdout


def test_commands_run_by_other_tests_are_documented_and_tested_there():
    """The cluster commands run as written in their own tests; this keeps both sides honest."""
    for doc, command, test_file, marker in (
        ("cluster/README.md", "make job-logs JOB=<id>", "test_cluster_e2e.py", '"job-logs"'),
        ("README.md", "make degradation SEEDS=5 DATA=data/cifar10", "test_degradation.py", "SEEDS="),
        ("README.md", "`make drill`", "test_drill.py", '".venv/.installed", "drill"]'),
        ("cluster/README.md", "`make drill`", "test_drill.py", '".venv/.installed", "drill"]'),
    ):
        documented(doc, command)
        assert marker in (ROOT / "tests" / test_file).read_text(), (test_file, marker)
