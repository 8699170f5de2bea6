"""Reading a config: YAML with ``base:`` chains, dotted overrides, typed construction, validation.

A YAML file may name a ``base:`` file (a path relative to itself, or a list of them); the
file's own keys are merged over the base, section by section, so each experiment's file
holds only what differs. Dotted ``key=value`` overrides come last and are parsed as YAML
scalars (``1e-4``, ``true``, ``[30, 60, 90]``, ``null``).

Every error is a ``ConfigError`` that names the key: unknown keys suggest the closest valid
one, wrong types name the expected type, bad choices list the choices. ``config_changes`` lists
what differs between two resolved configs (a resumed run warns about it).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config.schema import Config, ConfigError, DataConfig, is_cifar

# ---------------------------------------------------------------- loading and merging


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_config_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a YAML file with its ``base:`` chain merged in."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: base files form a cycle: {' -> '.join(map(str, _seen + (path,)))}")
    data = _read_yaml(path)
    bases = data.pop("base", None) or []
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _deep_merge(merged, read_config_tree(path.parent / base, _seen + (path,)))
    return _deep_merge(merged, data)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.2", "model.name=resnet18"]`` -> nested mapping."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.2)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is set both as a value and as a section")
        node[parts[-1]] = value
    return tree


# ---------------------------------------------------------------- typed construction


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config class, sections and leaves."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], prefix + f.name + ".")
    return keys


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise (
            errors[-1]
            if len(errors) == 1
            else ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        )
    if origin is Literal:
        choices = typing.get_args(tp)
        # YAML reads `true`/`false` as booleans; let them select "true"/"false" choices.
        candidate = str(value).lower() if isinstance(value, bool) else value
        if candidate in choices:
            return candidate
        raise ConfigError(
            f"{key}: {value!r} is not a valid choice; choose one of {', '.join(map(str, choices))}"
        )
    if origin is tuple:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp, *_) = typing.get_args(tp)
        return tuple(_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool (true or false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected float, got {value!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite float, got {value!r}")
            return float(value)
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected str, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # a bug in this module, not the user's


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = prefix + str(key)
            # Siblings first (optim.lrr -> optim.lr), then any key (shedule.epochs -> schedule.epochs).
            siblings = [prefix + n for n in names]
            close = difflib.get_close_matches(full, siblings, n=1, cutoff=0.6) or difflib.get_close_matches(
                full, _all_keys(Config), n=1, cutoff=0.6
            )
            hint = (
                f"; did you mean {close[0]!r}?" if close else f"; valid keys here: {', '.join(sorted(names))}"
            )
            raise ConfigError(f"unknown config key {full!r}{hint}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name] if data[name] is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, data[name], tp)
    return cls(**kwargs)


def check_batches(cfg: Config, world: int) -> None:
    """Each global batch (training and evaluation) is split as evenly as it goes over ``world``
    workers, so any world size works as long as no rank is empty. Checked at load for the most
    workers the config allows, and by ``pipeline.train.derived.derive`` for the world a run gets."""
    for key, batch in (
        ("optim.batch_size", cfg.optim.batch_size),
        ("eval.batch_size", cfg.global_eval_batch),
    ):
        if batch < world:
            raise ConfigError(
                f"{key} ({batch}) is the global batch and is smaller than the {world} workers "
                "(cluster.num_workers): every worker needs at least one image"
            )


def _check(cfg: Config) -> None:
    """Value checks that types cannot express."""
    positive = {
        "optim.batch_size": cfg.optim.batch_size,
        "data.crop_size": cfg.data.crop_size,
        "schedule.epochs": cfg.schedule.epochs,
        "cluster.num_workers": cfg.cluster.min_workers,
        "model.num_classes": cfg.model.num_classes,
        "optim.lr": cfg.optim.lr,
        "cluster.collective_timeout_s": cfg.cluster.collective_timeout_s,
        "cluster.resize_check_s": cfg.cluster.resize_check_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    for key, value in {
        "optim.max_worker_batch": cfg.optim.max_worker_batch,
        "checkpoint.every_n_steps": cfg.checkpoint.every_n_steps,
    }.items():
        if value < 0:
            raise ConfigError(f"{key}: must be 0 (off) or positive, got {value}")
    if cfg.cluster.start_timeout_s <= 0:
        raise ConfigError(f"cluster.start_timeout_s: must be positive, got {cfg.cluster.start_timeout_s}")
    if cfg.cluster.restart_timeout_s <= 0:
        raise ConfigError(f"cluster.restart_timeout_s: must be positive, got {cfg.cluster.restart_timeout_s}")
    if cfg.cluster.elastic and cfg.cluster.restart_timeout_s > cfg.cluster.start_timeout_s:
        raise ConfigError(
            f"cluster.restart_timeout_s: {cfg.cluster.restart_timeout_s:g} is more than "
            f"cluster.start_timeout_s ({cfg.cluster.start_timeout_s:g}); an elastic run's restarts "
            "wait at most as long as its first start: lower restart_timeout_s or raise start_timeout_s"
        )
    if cfg.cluster.preemption_poll_s < 0:
        raise ConfigError(
            f"cluster.preemption_poll_s: must be 0 (never) or positive seconds, got {cfg.cluster.preemption_poll_s}"
        )
    if cfg.cluster.max_preemption_failures < -1:
        raise ConfigError(
            "cluster.max_preemption_failures: must be -1 (no limit) or more, "
            f"got {cfg.cluster.max_preemption_failures}"
        )
    if cfg.cluster.start_retries < -1:
        raise ConfigError(
            f"cluster.start_retries: must be -1 (retry forever) or more, got {cfg.cluster.start_retries}"
        )
    if cfg.data.scale_min > cfg.data.scale_max:
        raise ConfigError(
            f"data.scale_min ({cfg.data.scale_min}) is larger than data.scale_max ({cfg.data.scale_max})"
        )
    if (
        cfg.data.augment == "paper"
        and not is_cifar(cfg.data.dataset)
        and cfg.data.scale_min < cfg.data.crop_size
    ):
        raise ConfigError(
            f"data.scale_min ({cfg.data.scale_min}) must be at least data.crop_size ({cfg.data.crop_size}) "
            "for the paper's random crop"
        )
    if cfg.data.val_crop < 0 or (cfg.data.val_crop and is_cifar(cfg.data.dataset)):
        raise ConfigError(
            f"data.val_crop: 0 (the training crop) or a positive side, and CIFAR-10 tests whole 32 px "
            f"images (0 there), got {cfg.data.val_crop}"
        )
    if not is_cifar(cfg.data.dataset) and cfg.data.val_resize < cfg.data.eval_crop:
        which = "data.val_crop" if cfg.data.val_crop else "data.crop_size"
        raise ConfigError(
            f"data.val_resize ({cfg.data.val_resize}) must be at least {which} ({cfg.data.eval_crop}): "
            "the test crops are cut from the image resized to shorter side val_resize"
        )
    _check_res_schedule(cfg.data)
    _check_torchvision_augment(cfg.data)
    if cfg.eval.flip and "center" not in (cfg.eval.mode, cfg.eval.final_mode or cfg.eval.mode):
        raise ConfigError(
            "eval.flip: the test-time flip of centre evaluation, but eval.mode and eval.final_mode are "
            f"{cfg.eval.mode} and {cfg.eval.final_mode}: set one of them to center, or drop eval.flip"
        )
    if cfg.data.cache_fetchers < 1:
        raise ConfigError(
            "data.cache_fetchers: must be at least 1 (the shards each node fetches at once), "
            f"got {cfg.data.cache_fetchers}"
        )
    if cfg.data.cache_limit_gb < 0:
        raise ConfigError(
            "data.cache_limit_gb: must be 0 (the cache disk's free space less headroom) or more GB, "
            f"got {cfg.data.cache_limit_gb:g}"
        )
    if cfg.data.fetch_retry_s < 0:
        raise ConfigError(
            "data.fetch_retry_s: must be 0 (no retries) or more seconds (how long a shard's fetch rides out "
            f"throttling and network failures), got {cfg.data.fetch_retry_s:g}"
        )
    if cfg.data.shuffle_window < 0:
        raise ConfigError(
            "data.shuffle_window: must be 0 (one window: a full shuffle) or more shards, "
            f"got {cfg.data.shuffle_window}"
        )
    _check_recipe(cfg)
    if list(cfg.schedule.milestones) != sorted(cfg.schedule.milestones):
        raise ConfigError(f"schedule.milestones must be increasing, got {list(cfg.schedule.milestones)}")
    workers = cfg.cluster.num_workers
    if isinstance(workers, tuple) and (len(workers) != 2 or workers[0] > workers[1]):
        raise ConfigError(
            f"cluster.num_workers: give a number or [min, max] with min <= max, got {list(workers)}"
        )
    check_batches(cfg, cfg.cluster.max_workers)
    if is_cifar(cfg.data.dataset):
        if cfg.data.augment not in ("paper", "none"):
            raise ConfigError(
                f"data.augment: {cfg.data.augment!r} is for ImageNet; CIFAR-10 takes 'paper' (4-pixel pad, "
                "random 32 crop, flip) or 'none' (the images as they are)"
            )
        for key, mode in (("eval.mode", cfg.eval.mode), ("eval.final_mode", cfg.eval.final_mode)):
            if mode not in (None, "center"):
                raise ConfigError(
                    f"{key}: {mode!r} is for ImageNet; CIFAR-10 is scored on whole 32x32 images, use center"
                )
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"name: must be a non-empty run name without '/', got {cfg.name!r}")


def _check_recipe(cfg: Config) -> None:
    """The fast-recipe keys: EMA, MixUp / CutMix, BlurPool."""
    o = cfg.optim
    if not 0.0 <= o.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay: must be 0 (off) or in (0, 1), e.g. 0.9999, got {o.ema_decay:g}")
    if o.ema_warmup and o.ema_decay == 0.0:
        raise ConfigError("optim.ema_warmup: true needs an EMA; set optim.ema_decay (e.g. 0.9999)")
    for key, alpha in (("optim.mixup_alpha", o.mixup_alpha), ("optim.cutmix_alpha", o.cutmix_alpha)):
        if alpha < 0:
            raise ConfigError(
                f"{key}: must be 0 (off) or positive (a Beta distribution's alpha), got {alpha:g}"
            )
    if not 0.0 <= o.mix_switch_prob <= 1.0:
        raise ConfigError(
            f"optim.mix_switch_prob: must be a probability in [0, 1], got {o.mix_switch_prob:g}"
        )
    if o.mix_switch_prob != 0.5 and not (o.mixup_alpha > 0 and o.cutmix_alpha > 0):
        raise ConfigError(
            "optim.mix_switch_prob: chooses between MixUp and CutMix, so it needs both optim.mixup_alpha "
            "and optim.cutmix_alpha above 0"
        )
    if cfg.model.blurpool and is_cifar(cfg.data.dataset):
        raise ConfigError("model.blurpool: is for the ImageNet networks; the CIFAR-10 ones take false")


def _check_res_schedule(data: DataConfig) -> None:
    """``data.res_schedule``: a ramp that grows, for the ImageNet pipelines that crop at random."""
    r = data.res_schedule
    if r.end_res == 0:
        if (r.start_ramp, r.end_ramp) != (0, 0):
            raise ConfigError(
                "data.res_schedule: start_ramp / end_ramp are set but end_res is 0 (off); set end_res"
            )
        return
    if is_cifar(data.dataset) or data.augment == "none":
        raise ConfigError(
            "data.res_schedule: progressive resizing is for ImageNet's random crops (data.augment: "
            f"paper or inception), not {data.dataset} with data.augment={data.augment}; set end_res: 0"
        )
    if r.end_res < data.crop_size or r.step < 1:
        raise ConfigError(
            f"data.res_schedule: end_res ({r.end_res}) must be at least data.crop_size ({data.crop_size}), "
            f"the ramp's start, and step ({r.step}) positive"
        )
    if not 0 <= r.start_ramp < r.end_ramp:
        raise ConfigError(
            f"data.res_schedule: 0 <= start_ramp < end_ramp (epochs from 0), got {r.start_ramp} and {r.end_ramp}"
        )
    if data.augment == "paper" and data.scale_min < r.end_res:
        raise ConfigError(
            f"data.scale_min ({data.scale_min}) must be at least data.res_schedule.end_res ({r.end_res}) "
            "for the paper's random crop"
        )


def _check_torchvision_augment(data: DataConfig) -> None:
    """``data.auto_augment`` and ``data.random_erase``: they follow ImageNet's random crops."""
    if not 0.0 <= data.random_erase <= 1.0:
        raise ConfigError(f"data.random_erase: a probability in [0, 1] (0: off), got {data.random_erase:g}")
    for key, on in (
        ("data.auto_augment", data.auto_augment != "none"),
        ("data.random_erase", data.random_erase > 0),
    ):
        if on and (is_cifar(data.dataset) or data.augment == "none"):
            raise ConfigError(
                f"{key}: is for ImageNet's random crops (data.augment: paper or inception), not "
                f"{data.dataset} with data.augment={data.augment}; turn it off, or on ImageNet set data.augment"
            )


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    _check(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (with its bases), apply dotted overrides, validate."""
    data = read_config_tree(path) if path is not None else {}
    data = _deep_merge(data, parse_overrides(overrides or []))
    return config_from_dict(data)


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML, JSON, W&B and Ray's train_loop_config."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two config dicts."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes
