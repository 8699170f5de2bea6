"""One typed, frozen, validated configuration for a run.

    cfg = load_config("configs/imagenet/resnet50.yaml", ["optim.lr=0.2", "cluster.num_workers=8"])

- ``schema``: the sections as frozen dataclasses, every key typed and documented, the GPU
  decision ``cluster.use_gpu`` stands for, and ``is_cifar``, the ImageNet-or-CIFAR-10 decision;
- ``loading``: YAML with ``base:`` chains, dotted overrides, type coercion, validation that
  names the key (the batch check among them), and the diff of two configs (warned about at
  resume).

What follows from a config and the world size (per-worker batch, scaled lr, iterations) is
``pipeline.train.derived``.
"""

from pipeline.config.loading import (
    check_batches,
    config_changes,
    config_from_dict,
    dump_yaml,
    load_config,
    parse_overrides,
    read_config_tree,
    to_dict,
)
from pipeline.config.schema import (
    CheckpointConfig,
    ClusterConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    PrecisionConfig,
    ScheduleConfig,
    TrackingConfig,
    is_cifar,
    requested_gpu,
)

__all__ = [
    "CheckpointConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "PrecisionConfig",
    "ScheduleConfig",
    "TrackingConfig",
    "check_batches",
    "config_changes",
    "config_from_dict",
    "dump_yaml",
    "is_cifar",
    "load_config",
    "parse_overrides",
    "read_config_tree",
    "requested_gpu",
    "to_dict",
]
