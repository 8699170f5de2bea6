"""One typed, frozen, validated configuration for a run.

    cfg = load_config("configs/imagenet/resnet50.yaml", ["optim.lr=0.2", "cluster.num_workers=8"])
    derived = derive(cfg, num_train_images, world_size)

- ``schema``: the sections as frozen dataclasses, every key typed and documented;
- ``loading``: YAML with ``base:`` chains, dotted overrides, type coercion, validation that
  names the key;
- ``derived``: what follows from the config and the world size (per-worker batch, scaled lr,
  iterations), the GPU decision, and the diff of two configs (warned about at resume).
"""

from pipeline.config.derived import Derived, config_changes, derive, requested_gpu
from pipeline.config.loading import (
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
)

__all__ = [
    "CheckpointConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "Derived",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "PrecisionConfig",
    "ScheduleConfig",
    "TrackingConfig",
    "config_changes",
    "config_from_dict",
    "derive",
    "dump_yaml",
    "load_config",
    "parse_overrides",
    "read_config_tree",
    "requested_gpu",
    "to_dict",
]
