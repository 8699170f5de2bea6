"""Config loading, overrides, bases, and the error each kind of bad config gets."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_pipeline

from pipeline.config import ConfigError, dump_yaml, load_config, parse_overrides, to_dict
from pipeline.train.derived import derive


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_are_the_papers_imagenet_protocol():
    cfg = load_config(None)
    assert (cfg.optim.batch_size, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (
        256,
        0.1,
        0.9,
        1e-4,
    )
    assert (cfg.data.scale_min, cfg.data.scale_max, cfg.data.crop_size, cfg.data.pca_std) == (
        256,
        480,
        224,
        0.1,
    )


def test_overrides_convert_types(tmp_path):
    cfg = load_config(
        None,
        [
            "optim.lr=0.2",
            "schedule.milestones=[10, 20]",
            "precision.channels_last=true",
            "schedule.max_iters=null",
            "optim.weight_decay=5e-5",
            "cluster.num_workers=4",
            "model.shortcut=A",
        ],
    )
    assert cfg.optim.lr == 0.2 and isinstance(cfg.optim.lr, float)
    assert cfg.schedule.milestones == (10, 20)
    assert cfg.precision.channels_last is True
    assert cfg.schedule.max_iters is None
    assert cfg.optim.weight_decay == 5e-5
    assert cfg.model.shortcut == "A"


def test_int_given_for_float_is_accepted_and_float_for_int_rejected():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"optim.batch_size: expected int, got 2.5"):
        load_config(None, ["optim.batch_size=2.5"])


def test_base_chain_merges_sections(tmp_path):
    write(tmp_path / "base.yaml", "optim:\n  lr: 0.3\n  momentum: 0.8\nmodel:\n  name: resnet34\n")
    child = write(tmp_path / "sub" / "exp.yaml", "base: ../base.yaml\nname: exp\noptim:\n  lr: 0.05\n")
    cfg = load_config(child, ["optim.momentum=0.95"])
    assert (cfg.name, cfg.optim.lr, cfg.optim.momentum, cfg.model.name) == ("exp", 0.05, 0.95, "resnet34")


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'; did you mean 'optim.lr'\?"):
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"'shedule'; did you mean 'schedule'\?"):
        load_config(None, ["shedule.epochs=3"])


def test_wrong_type_names_expected_type():
    with pytest.raises(ConfigError, match=r"optim.lr: expected float, got 'fast'"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"precision.compile: expected bool"):
        load_config(None, ["precision.compile=3"])


def test_bad_choice_lists_choices():
    with pytest.raises(
        ConfigError,
        match=r"eval.mode: 'twelvecrop' is not a valid choice; choose one of center, tencrop, multiscale",
    ):
        load_config(None, ["eval.mode=twelvecrop"])


def test_batch_must_cover_every_worker_and_elastic_ranges_are_ordered():
    load_config(None, ["cluster.num_workers=3"])  # 256 over 3: 85, 85, 86 (each loss weighted by its share)
    with pytest.raises(ConfigError, match=r"optim.batch_size \(8\).*smaller than the 16 workers"):
        load_config(None, ["cluster.num_workers=16", "optim.batch_size=8"])
    with pytest.raises(ConfigError, match=r"optim.batch_size \(8\).*smaller than the 16 workers"):
        load_config(None, ["cluster.num_workers=[2, 16]", "optim.batch_size=8"])
    with pytest.raises(ConfigError, match=r"cluster.num_workers: give a number or \[min, max\]"):
        load_config(None, ["cluster.num_workers=[4, 2]"])
    cluster = load_config(None, ["cluster.num_workers=[2, 4]"]).cluster
    assert (cluster.min_workers, cluster.max_workers, cluster.elastic) == (2, 4, True)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path / "bad.yaml", "optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.lr"])


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["name=x", "schedule.milestones=[1,2]", "tracking.tags=[a, b]"])
    path = write(tmp_path / "resolved.yaml", dump_yaml(cfg))
    assert load_config(path) == cfg
    assert to_dict(cfg)["schedule"]["milestones"] == [1, 2]


def test_derived_values_follow_linear_scaling_and_equal_steps():
    cfg = load_config(None, ["optim.batch_size=1024", "cluster.num_workers=8", "schedule.epochs=90"])
    d = derive(cfg, num_train_images=1_281_167)
    assert d.per_worker_batch == 128
    assert d.lr == pytest.approx(0.4)
    assert d.iters_per_epoch == 1_281_167 // 1024
    assert d.total_iters == 90 * (1_281_167 // 1024)
    cifar = load_config(
        None,
        ["optim.batch_size=128", "schedule.epochs=1000", "schedule.max_iters=64000", "optim.scale_lr=false"],
    )
    d = derive(cifar, num_train_images=50_000)
    assert (d.iters_per_epoch, d.total_iters, d.epochs, d.lr) == (390, 64_000, 165, 0.1)


def test_batch_larger_than_dataset_is_an_error():
    with pytest.raises(ConfigError, match="larger than the training set"):
        derive(load_config(None), num_train_images=100)


def test_cli_exits_2_before_ray_on_config_typo():
    proc = run_pipeline("train", "--config", "configs/demo.yaml", "optim.lrr=0.1")
    assert proc.returncode == 2
    assert "did you mean 'optim.lr'" in proc.stderr
    assert "Ray" not in proc.stdout


def test_cli_exits_2_on_missing_data_dir(tmp_path):
    proc = run_pipeline("train", "--config", "configs/demo.yaml", f"data.root={tmp_path / 'missing'}")
    assert proc.returncode == 2
    assert str(tmp_path / "missing") in proc.stderr


def test_cifar_is_scored_on_whole_images():
    with pytest.raises(ConfigError, match=r"eval.final_mode: 'tencrop' is for ImageNet"):
        load_config(None, ["data.dataset=cifar10", "eval.final_mode=tencrop"])
    assert load_config(None, ["data.dataset=cifar10", "eval.final_mode=center"]).eval.final_mode == "center"


def test_val_resize_below_crop_size_is_an_error():
    with pytest.raises(ConfigError, match=r"data.val_resize \(200\) must be at least data.crop_size \(224\)"):
        load_config(None, ["data.val_resize=200"])
    load_config(
        None, ["data.dataset=cifar10", "data.crop_size=32", "data.val_resize=0", "eval.final_mode=center"]
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.cache_fetchers=0", r"data.cache_fetchers: must be at least 1 .*, got 0"),
        ("data.shuffle_window=-1", r"data.shuffle_window: must be 0 .* or more shards, got -1"),
        ("data.fetch_retry_s=-5", r"data.fetch_retry_s: must be 0 .* or more seconds .*, got -5"),
    ],
)
def test_shard_feed_settings_are_refused_at_load(override, message):
    """Checked for every config, not only when the sharded layout is opened: data.root may be a
    folder today and a manifest tomorrow."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    load_config(None, ["data.cache_fetchers=1", "data.shuffle_window=0", "data.fetch_retry_s=0"])


def test_imagenet_augment_refused_for_cifar_at_load():
    cifar = ["data.dataset=cifar10", "eval.final_mode=center"]
    with pytest.raises(
        ConfigError, match=r"data.augment: 'inception' is for ImageNet; CIFAR-10 takes 'paper'"
    ):
        load_config(None, [*cifar, "data.augment=inception"])
    for augment in ("paper", "none"):
        assert load_config(None, [*cifar, f"data.augment={augment}"]).data.augment == augment
    assert load_config(None, ["data.augment=inception"]).data.augment == "inception"  # ImageNet's own


def test_cli_refuses_a_bad_data_setting_before_opening_the_data(tmp_path):
    """The config error comes first: the missing data folder is never looked at, Ray never starts."""
    missing = tmp_path / "missing"
    proc = run_pipeline(
        "train", "--config", "configs/demo.yaml", f"data.root={missing}", "data.cache_fetchers=0"
    )
    assert proc.returncode == 2
    assert "data.cache_fetchers: must be at least 1" in proc.stderr
    assert str(missing) not in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Ray" not in proc.stdout
