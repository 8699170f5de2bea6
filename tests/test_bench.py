"""The ``bench`` commands: documented JSON fields with sane values, on tiny inputs.

    .venv/bin/python -m pytest -q tests/test_bench.py

Speeds are never asserted (the test machine's cores are shared): only that rates are
positive and finite, ratios are a / b, and the fields the docs name are there. ``bench ray``
starts Ray twice (a minute on two cores), so its pure helpers and its training loop are
tested here and the real run is left to ``make bench``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pipeline.__main__
from pipeline.bench import main as bench_main
from pipeline.bench.common import BenchError, machine_info, median, ratio
from pipeline.bench.model import ALL_VARIANTS, TORCHVISION_TWINS, Variant, parse_variants
from pipeline.bench.ray_train import loop_config, scaling_efficiency, synthetic_loop
from pipeline.bench.table import markdown

MACHINE_FIELDS = {"nproc", "cpu_count", "cpu_model", "load_avg_start", "load_avg_end", "platform", "python"}


def positive(x: float) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


def run_bench(argv: list[str], capsys) -> dict:
    assert pipeline.__main__.main(["bench", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------- helpers


def test_variants_parse_in_order_without_duplicates() -> None:
    assert [v.name for v in parse_variants("bf16-cl,fp32,bf16-cl", "cpu")] == ["bf16-cl", "fp32"]
    assert parse_variants("fp32-cl-compile", "cpu") == [Variant("fp32", channels_last=True, compile=True)]
    assert len(parse_variants("all", "cpu")) == len(ALL_VARIANTS) == 8
    # torch.compile is opt-in on CPU, part of the default matrix on CUDA.
    assert not any(v.compile for v in parse_variants(None, "cpu"))
    assert {v.dtype for v in parse_variants(None, "cpu")} == {"fp32", "bf16"}
    assert parse_variants(None, "cuda") == list(ALL_VARIANTS)
    with pytest.raises(BenchError, match="unknown variant 'fp16'.*fp32-cl"):
        parse_variants("fp16", "cpu")


def test_statistics_and_machine() -> None:
    assert median([3.0, 100.0, 1.0]) == 3.0
    assert ratio(3.0, 2.0) == 1.5 and ratio(1.0, None) is None
    m = machine_info()
    assert m["nproc"] >= 1 and m["cpu_model"] and len(m["load_avg_start"]) == 3


def test_torchvision_twins_are_the_same_network() -> None:
    import torchvision

    from pipeline.models import count_params, create_model

    for ours, theirs in TORCHVISION_TWINS.items():
        with torch.device("meta"):
            a, b = create_model(ours), getattr(torchvision.models, theirs)()
        assert count_params(a) == count_params(b), ours


# ---------------------------------------------------------------- bench model


def test_bench_model_json_fields(capsys) -> None:
    r = run_bench(
        "model --model resnet18 --input-size 32 --batch-size 4 --steps 2 --warmup 1 --variants fp32,fp32-cl "
        "--device cpu".split(),
        capsys,
    )
    assert (
        r["bench"] == "model" and r["model"] == "resnet18" and r["reference"] == "torchvision.models.resnet18"
    )
    assert (r["device"], r["batch_size"], r["input_size"], r["steps"]) == ("cpu", 4, 32, 2)
    assert r["eval_batch_size"] == 1 and r["eval_crops"] == 10 and r["threads"] >= 1
    assert MACHINE_FIELDS <= set(r["machine"]) and r["command"].startswith("python -m pipeline bench model")
    assert [v["variant"] for v in r["variants"]] == ["fp32", "fp32-cl"]
    for v in r["variants"]:
        assert v["error"] is None
        for key in (
            "train_img_per_s",
            "torchvision_train_img_per_s",
            "eval_img_per_s",
            "torchvision_eval_img_per_s",
        ):
            assert positive(v[key]), key
        assert v["ratio"] == pytest.approx(v["train_img_per_s"] / v["torchvision_train_img_per_s"])
        assert positive(v["ratio_paired"]) and positive(v["eval_ratio_paired"])
        assert v["eval_ratio"] == pytest.approx(v["eval_img_per_s"] / v["torchvision_eval_img_per_s"])
        assert len(v["train_timing"]["ours"]["block_s"]) == 2  # CPU: one step per interleaved block


def test_bench_model_without_twin_and_markdown(capsys, tmp_path: Path) -> None:
    r = run_bench(
        "model --model cifar_resnet20 --input-size 32 --batch-size 4 --steps 2 --variants bf16 "
        "--eval-batch-size 0 --out".split()
        + [str(tmp_path / "model.json")],
        capsys,
    )
    assert r["reference"] is None and "no network identical" in r["reference_note"]
    (v,) = r["variants"]
    assert positive(v["train_img_per_s"]) and v["torchvision_train_img_per_s"] is None and v["ratio"] is None
    assert "eval_img_per_s" not in v  # --eval-batch-size 0 skips the 10-crop phase
    assert json.loads((tmp_path / "model.json").read_text())["variants"][0]["variant"] == "bf16"
    assert "| bf16 |" in markdown([r])


@pytest.mark.slow
def test_bench_model_imports_neither_ray_nor_dali() -> None:
    """The GPU machine has torch alone: block the imports and the model bench must still run."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ray" or name.startswith("nvidia.dali"):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
from pipeline.__main__ import main
sys.exit(main(["bench", "model", "--model", "cifar_resnet20", "--input-size", "16", "--batch-size", "2",
               "--steps", "1", "--warmup", "0", "--variants", "fp32", "--threads", "1", "--json"]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["variants"][0]["error"] is None


def test_bench_model_rejects_bad_requests(capsys) -> None:
    assert bench_main(["model", "--model", "resnet51"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert bench_main(["model", "--model", "resnet18", "--variants", "int8"]) == 2
    assert "unknown variant" in capsys.readouterr().err


# ---------------------------------------------------------------- bench loader


def test_bench_loader_json_fields(tiny_imagenet: Path, capsys) -> None:
    r = run_bench(
        ["loader", "--data", str(tiny_imagenet)]
        + "--threads 1 --batch-size 4 --images 12 --val-images 8 --repeats 1 --crop-size 32 --scale-min 36 "
        "--scale-max 48 --val-resize 36 --next-crop 36".split(),
        capsys,
    )
    assert r["bench"] == "loader" and r["threads"] == 1 and r["crop_size"] == 32 and r["scale"] == [36, 48]
    assert r["next_crop"] == 36 and positive(r["epoch_boundary"]["continuous_s"])
    assert MACHINE_FIELDS <= set(r["machine"]) and r["dali"] and r["torchvision"]
    assert r["dali_img_per_s"] == r["train"]["dali_img_per_s"]  # the headline is the train pipeline
    for part, images in ((r["train"], 12), (r["val_tencrop"], 8)):
        assert positive(part["dali_img_per_s"]) and positive(part["torchvision_img_per_s"])
        assert part["ratio"] == pytest.approx(part["dali_img_per_s"] / part["torchvision_img_per_s"])
        for run in part["dali_runs"] + part["torchvision_runs"]:
            # Both sides read every image of the pass (val: each image is one 10-crop sample).
            assert (
                run["images"] == images
                and positive(run["startup_s"])
                and positive(run["img_per_s_with_startup"])
            )
    assert "| train: shorter side 36-48" in markdown([r])


def test_bench_loader_checks_its_arguments(tiny_imagenet: Path, tmp_path: Path, capsys) -> None:
    assert bench_main(["loader", "--data", str(tmp_path)]) == 2
    assert "train/ and val/" in capsys.readouterr().err
    assert bench_main(["loader", "--data", str(tiny_imagenet), "--crop-size", "64", "--scale-min", "48"]) == 2
    assert (
        bench_main(
            [
                "loader",
                "--data",
                str(tiny_imagenet),
                "--crop-size",
                "32",
                "--next-crop",
                "64",
                "--scale-min",
                "36",
                "--scale-max",
                "48",
            ]
        )
        == 2
    )
    assert "crop-size and next-crop <= scale-min" in capsys.readouterr().err


# ---------------------------------------------------------------- bench ray (helpers and loop)


def test_scaling_efficiency() -> None:
    assert scaling_efficiency(100.0, 200.0, 2) == 1.0
    assert scaling_efficiency(100.0, 150.0, 2) == 0.75
    with pytest.raises(ValueError):
        scaling_efficiency(0.0, 1.0)


def test_synthetic_loop_in_a_plain_process() -> None:
    config = loop_config("cifar_resnet20", batch_size=2, input_size=8, warmup=1, steps=2)
    assert config["threads"] == 1 and config["num_classes"] == 10
    m = synthetic_loop(config)
    assert m["world_size"] == 1 and positive(m["img_per_s"])
    assert m["start_time"] <= m["first_step_time"]
    assert m["img_per_s"] == pytest.approx(2 * 2 / m["timed_s"])
    with pytest.raises(BenchError):
        loop_config("cifar_resnet20", batch_size=0, input_size=None, warmup=1, steps=1)


def test_markdown_of_a_ray_result_and_bad_input() -> None:
    r = {
        "bench": "ray",
        "model": "cifar_resnet20",
        "input_size": 32,
        "batch_size": 32,
        "plain_first_step_s": 3.0,
        "ray_first_step_s": 18.0,
        "startup_overhead_s": 15.0,
        "ray_init_s": 4.0,
        "plain_img_per_s": 200.0,
        "img_per_s_1_worker": 180.0,
        "img_per_s_2_workers": 270.0,
        "scaling_efficiency": 0.75,
        "machine": {
            "cpu_model": "x",
            "nproc": 2,
            "load_avg_start": [1.0, 1.0, 1.0],
            "load_avg_end": [1.0, 1.0, 1.0],
        },
        "command": "python -m pipeline bench ray",
    }
    assert "| scaling efficiency 1 -> 2 workers (gloo) | 0.75 |" in markdown([r])
    with pytest.raises(ValueError, match="not a bench result"):
        markdown([{"bench": "nope"}])


# ---------------------------------------------------------------- bench feed


@pytest.mark.slow  # runs bench feed end to end (DALI passes through a local S3 server): not in make test-fast
def test_bench_feed_counts_requests_per_source(tiny_imagenet: Path, capsys, monkeypatch) -> None:
    # --data relative to the working directory, as the docs' command gives it.
    monkeypatch.chdir(tiny_imagenet.parent)
    r = run_bench(
        ["feed", "--data", tiny_imagenet.name]
        + "--latency-ms 1 --threads 1 --batch-size 8 --fetchers 2 --shard-size-mb 0.05 --shuffle-window 2 "
        "--per-image-limit 16 --passes 2 --nodes 2 --faults 503:4,cut:6".split(),
        capsys,
    )
    s, t = r["sources"], r["targets"]
    assert r["images"] == 128 and 1 < r["images_per_shard"] < 64
    for tag in ("read", "read_decode"):
        assert s[f"s3_per_image_{tag}"]["gets_per_image"] >= 1  # one object per image
        first, second = s[f"sharded_epoch1_{tag}"], s[f"sharded_epoch2_{tag}"]
        assert first["gets_per_image"] * r["images_per_shard"] <= 1.1 and first["bytes_per_image"] > 0
        assert second["gets_per_image"] == 0 and second["bytes_per_image"] == 0
        # The sources on this machine's disk alternate their passes; the median pass counts.
        for name in (f"local_{tag}", f"sharded_epoch2_{tag}"):
            passes = s[name]["images_per_s_each_pass"]
            assert len(passes) == s[name]["passes"] == 2 and all(positive(x) for x in passes)
            assert s[name]["images_per_s"] == pytest.approx(median(passes))
    assert t["epoch2_data_gets"] == 0
    assert t["epoch2_vs_local (>= 0.9)"] == pytest.approx(
        s["sharded_epoch2_read"]["images_per_s"] / s["local_read"]["images_per_s"]
    )
    assert positive(s["server_ceiling"]["images_per_s"])
    # The cold start: two nodes, fault-free then through the faults, the same bytes each time.
    c = r["cold_start"]
    assert c["nodes"] == 2 and c["faults"] == {"slowdown_every": 4, "cut_every": 6}
    for run in (c["fault_free"], c["with_faults"]):
        assert run["same_bytes_as_fault_free"] and len(run["per_node"]) == 2
        assert all(n["bytes_fetched_over_dataset"] == 1.0 for n in run["per_node"])
        assert sum(n["retries"] for n in run["per_node"]) == run["server"]["refused"] + run["server"]["cut"]
    assert c["with_faults"]["server"]["refused"] == c["with_faults"]["server"]["GET.tar"] // 4
    assert t["cold_start_epoch1_with_faults_vs_fault_free"] == pytest.approx(
        c["with_faults"]["images_per_s_per_node"] / c["fault_free"]["images_per_s_per_node"]
    )


def test_bench_feed_checks_its_new_arguments_before_running(tiny_imagenet: Path, capsys) -> None:
    for bad, says in ((["--faults", "503:10,cut"], "'cut' is not KIND:N"), (["--rounds", "0"], "--rounds 0"),
                      (["--storm-s", "-1"], "--storm-s -1")):  # fmt: skip
        assert bench_main(["feed", "--data", str(tiny_imagenet), *bad]) == 2
        assert says in capsys.readouterr().err


# ---------------------------------------------------------------- bench fetch


def test_bench_fetch_streams_parts_and_counts_its_gets(capsys) -> None:
    """3 objects of 1 MiB in parts of 0.25 MiB: 4 ranged GETs each through the engine, and the
    whole-object pass beside it; the bound is fetchers x parts in flight x part."""
    r = run_bench(
        "fetch --objects 3 --object-mb 1 --fetchers 2 --part-mb 0.25 --parts-in-flight 2".split(), capsys
    )
    assert r["bench"] == "fetch" and r["object_mib"] == 1 and r["engine"]["gets"] == 12
    assert r["bound_mib"] == 2 * 2 * 0.25 and r["whole_objects"]["fetchers_x_object_mib"] == 2
    assert (
        r["engine"]["peak_growth_mib"] >= 0
        and positive(r["engine"]["seconds"])
        and MACHINE_FIELDS <= set(r["machine"])
    )
    assert pipeline.__main__.main(["bench", "fetch", "--objects", "0"]) == 2
    assert "--objects must be at least 1" in capsys.readouterr().err
