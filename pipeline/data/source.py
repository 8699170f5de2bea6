"""The dataset a config names (ImageNet in the folder or sharded layout, or CIFAR-10): its sizes
for the preflight, its loaders for a worker.

    source = open_dataset(cfg.data)              # checks the layout; cheap (no decoding)
    check_num_classes(cfg.model.num_classes, source)
    data = source.loaders(cfg, rank=0, world_size=1, device=torch.device("cpu"), num_threads=2,
                          eval_batch=64)

The launcher opens the dataset before Ray starts (a wrong path fails in seconds, with exit
code 2); each worker opens it again on its own node and builds its shard's loaders.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from pipeline.config import Config, ConfigError, DataConfig, is_cifar
from pipeline.data.loaders import Data, Loader
from pipeline.data.shard_feed import ShardedSource, open_sharded


class ImageNetSource:
    """An ImageNet-layout folder read by DALI (decoded on the GPU when the worker has one)."""

    def __init__(self, cfg: DataConfig):
        from pipeline.data.layout import scan_imagenet

        self.index = scan_imagenet(cfg.root)
        if cfg.normalize == "mean":  # the training set's mean must exist before any worker starts
            from pipeline.data.stats import load_mean

            load_mean(cfg.root, cfg.crop_size)
        self.root = cfg.root
        self.num_train = len(self.index.train_files)
        self.num_classes = self.index.num_classes

    def loaders(
        self,
        cfg: Config,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        num_threads: int,
        eval_batch: int,
    ) -> Data:
        from pipeline.data.imagenet import build_train_loader, build_val_loader

        common: dict[str, Any] = dict(
            rank=rank,
            world_size=world_size,
            device_id=device.index if device.type == "cuda" else None,
            num_threads=num_threads,
            channels_last=cfg.precision.channels_last,
            half=cfg.precision.amp == "fp16",
        )
        train = build_train_loader(
            self.index, cfg.data, global_batch=cfg.optim.batch_size, seed=cfg.seed, **common
        )

        def make_val(mode: str) -> Loader:
            return build_val_loader(
                self.index, cfg.data, mode=mode, scales=cfg.eval.scales, batch_size=eval_batch, **common
            )

        def make_train_eval() -> Loader:  # the training files through the centre-crop test pipeline
            as_val = dataclasses.replace(
                self.index, val_files=self.index.train_files, val_labels=self.index.train_labels
            )
            return build_val_loader(
                as_val, cfg.data, mode="center", scales=cfg.eval.scales, batch_size=eval_batch, **common
            )

        return Data(
            train=train, num_train=self.num_train, num_classes=self.num_classes, make_val=make_val,
            make_train_eval=make_train_eval,
        )  # fmt: skip


class CifarSource:
    """The CIFAR-10 python archive, held whole on the training device."""

    num_classes = 10

    def __init__(self, cfg: DataConfig):
        from pipeline.data.cifar import cifar_num_train

        self.root = cfg.root
        self.num_train = cifar_num_train(cfg.root, cfg.val_split)

    def loaders(
        self,
        cfg: Config,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        num_threads: int,
        eval_batch: int,
    ) -> Data:
        from pipeline.data.cifar import build_cifar_loaders

        loaders = build_cifar_loaders(
            cfg.data.root,
            cfg.data,
            global_batch=cfg.optim.batch_size,
            rank=rank,
            world_size=world_size,
            device=device,
            seed=cfg.seed,
            eval_batch_size=eval_batch,
        )
        test = loaders.test
        return Data(
            train=loaders.train,
            num_train=loaders.num_train,
            num_classes=self.num_classes,
            make_val=lambda mode: loaders.val,
            make_test=(lambda: test) if test is not None else None,
            make_train_eval=lambda: loaders.train.unaugmented(eval_batch),
        )


DataSource = ImageNetSource | CifarSource | ShardedSource


def open_dataset(cfg: DataConfig) -> DataSource:
    """The dataset ``data.dataset`` names, its layout checked (``DataLayoutError`` names the path).

    An ImageNet root holding ``manifest.json.gz`` is the sharded layout (``data shard``).
    """
    if is_cifar(cfg.dataset):
        return CifarSource(cfg)
    return open_sharded(cfg) or ImageNetSource(cfg)


def check_num_classes(model_classes: int, source: DataSource) -> None:
    """A classifier narrower than the dataset would fail at the first out-of-range label: say it now."""
    if source.num_classes > model_classes:
        raise ConfigError(
            f"model.num_classes ({model_classes}) is smaller than the {source.num_classes} classes in "
            f"{source.root}; set model.num_classes={source.num_classes}"
        )


def data_probe_path(dataset: str, root: str) -> str:
    """What must exist under a local ``data.root`` on every node: ImageNet's ``train/``, CIFAR's archive."""
    from pathlib import Path

    if is_cifar(dataset):
        from pipeline.data.cifar import CIFAR_DIRNAME

        return str(Path(root) / CIFAR_DIRNAME)
    return str(Path(root) / "train")
