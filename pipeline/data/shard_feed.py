"""Training and evaluation over the sharded layout: sample ids from the manifest, bytes from the node's cache.

    source = open_sharded(cfg.data)     # None when data.root holds no manifest.json.gz
    data = source.loaders(cfg, rank=0, world_size=1, device=torch.device("cpu"), num_threads=2, eval_batch=64)

The training feed is ImageNet's (``pipeline.data.dali_loaders.TrainFeed``): at (seed, epoch, step)
it takes the global batch's sample ids from the epoch's order and this rank's slice of it;
the augmentation comes from (seed, epoch, step, position in the global batch). What changes
is the order and where the bytes come from:

- **The epoch's order** (``shard_reads.epoch_order``): the training shards are permuted by (seed, epoch),
  cut into windows of ``data.shuffle_window`` shards, and the samples of each window permuted.
  ``data shard`` already spread the samples over the shards at random (its ``--seed``), so a
  window is a random sample of the dataset, and a batch draws from ``shuffle_window`` shards
  (16 x ~1,100 images for ImageNet's 128 MB shards, about 18,000 images). Two images of one
  shard meet in a batch more often than under a full shuffle, and only two images of one
  shard can follow each other closely; across epochs the shards are permuted again and their
  windows change. This order is the same in every epoch (epoch 1 while the shards still
  stream, and later ones), on every world size, whatever the cache holds; resumes are exact.
  ``data.shuffle_window=0`` gives a full shuffle, at the price of a first batch that waits for
  the whole dataset.
- **The bytes** (``shard_reads.ShardReader``): the feed asks the node's shard cache (``pipeline.data.shard_cache``) for the
  shards in the order this node's ranks read them from the current step on (``next_use``),
  ``data.cache_fetchers`` at once on the node,
  and reads each sample at its (offset, size), checked against its CRC-32 the first time this
  process reads it; DALI gets the encoded JPEGs and decodes them as for the folder layout
  (mixed on a GPU).

Validation: each rank's contiguous slice of the val samples (as for the folder layout), read
the same way, the last batch padded and the padding cut before it leaves this module. The
training images in eval mode (``eval.train_eval``, ``deepen --inputs data``) are read so too,
from the manifest's training samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.config import Config, ConfigError, DataConfig
from pipeline.data.cache_sizing import GB, check_limit, minimum_bytes
from pipeline.data.constants import NUM_TEN_CROPS
from pipeline.data.dali_loaders import ValLoader, labels_on, nchw, torch_device
from pipeline.data.fetch import FetchPolicy
from pipeline.data.imagenet import build_train_loader
from pipeline.data.layout import ImageFolderIndex
from pipeline.data.loaders import Data
from pipeline.data.shard_cache import ShardCache
from pipeline.data.shard_manifest import Manifest, check_shards, load_manifest
from pipeline.data.shard_reads import ShardReader, epoch_order, shards_in_order
from pipeline.host import usable_cpus
from pipeline.store import locations


class ShardedSource:
    """An ImageNet dataset in the sharded layout (``data shard``), read through the node's cache."""

    def __init__(self, cfg: DataConfig, manifest: Manifest):
        check_shards(manifest)
        if cfg.cache_limit_gb > 0 and locations.is_uri(manifest.root):
            # Refused before anything starts; the batch is not known here, so a batch is taken to
            # read at most two windows (ImageNet's hold 18,000 images); the workers check exactly.
            need = minimum_bytes(manifest, cfg.shuffle_window, cfg.cache_fetchers, None)
            check_limit(int(cfg.cache_limit_gb * GB), need, explicit=True, cache_dir=cfg.cache_dir,
                        window=cfg.shuffle_window, fetchers=cfg.cache_fetchers)  # fmt: skip
        if cfg.normalize == "mean":
            from pipeline.data.stats import load_mean

            load_mean(cfg.root, cfg.crop_size)
        self.manifest = manifest
        self.root = manifest.root
        self.num_train = len(manifest.split("train"))
        self.num_classes = manifest.num_classes
        train, val = manifest.split("train"), manifest.split("val")
        # Names stand in for files in messages; the feed never opens them.
        self.index = ImageFolderIndex(
            manifest.classes,
            tuple(f"{self.root}[{n}]" for n in train.name),
            tuple(int(x) for x in train.label),
            tuple(f"{self.root}[{n}]" for n in val.name),
            tuple(int(x) for x in val.label),
        )

    def order_pin(self, cfg: DataConfig) -> dict[str, Any]:
        """What fixes the training order besides the seed (``Data.order_pin``, kept in checkpoints)."""
        return {"manifest_sha256": self.manifest.digest, "shuffle_window": cfg.shuffle_window}

    def cache(self, cfg: DataConfig, global_batch: int | None = None) -> ShardCache:
        """The node's cache, checked: writable, and a limit (said in one line) that can work."""
        cache = ShardCache(self.manifest, cfg.cache_dir, cfg.cache_fetchers, mmap=cfg.mmap,
                           policy=FetchPolicy(retry_s=cfg.fetch_retry_s),
                           limit_bytes=int(cfg.cache_limit_gb * GB))  # fmt: skip
        try:
            cache.check_limit(cfg.shuffle_window, global_batch)
        except ConfigError:
            cache.close()
            raise
        if cache.remote:
            print(cache.describe(), flush=True)
        return cache

    def train_loader(self, cfg: DataConfig, cache: ShardCache, *, global_batch: int, seed: int,
                     node_ranks: Sequence[int] | None = None, **common: Any) -> Any:  # fmt: skip
        """``build_train_loader`` over the manifest (same arguments besides the cache, and the ranks
        that share this node's cache: it prefetches in the order they read; None: every rank)."""
        orders: dict[int, np.ndarray] = {}

        def order(epoch: int) -> np.ndarray:
            if epoch not in orders:
                if len(orders) > 2:
                    orders.clear()
                orders[epoch] = epoch_order(self.manifest, seed, epoch, cfg.shuffle_window)
            return orders[epoch]

        world = common.get("world_size", 1)
        reader = ShardReader(self.manifest, cache, "train", order, global_batch, node_ranks, world)
        train = build_train_loader(
            self.index, cfg, global_batch=global_batch, seed=seed, order=order, read=reader, **common
        )
        train.cache = cache  # the feed benchmark reads its counters
        return train

    def loaders(
        self,
        cfg: Config,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        num_threads: int,
        eval_batch: int,
        node_ranks: Sequence[int] | None = None,
    ) -> Data:
        """This rank's loaders; ``node_ranks``: the ranks on this node (default: this one alone)."""
        cache = self.cache(cfg.data, cfg.optim.batch_size)
        common: dict[str, Any] = dict(
            rank=rank,
            world_size=world_size,
            device_id=device.index if device.type == "cuda" else None,
            num_threads=num_threads,
            channels_last=cfg.precision.channels_last,
            half=cfg.precision.amp == "fp16",
        )
        train = self.train_loader(cfg.data, cache, global_batch=cfg.optim.batch_size, seed=cfg.seed,
                                  node_ranks=node_ranks or [rank], **common)  # fmt: skip
        m = self.manifest

        def make_val(mode: str) -> Any:
            return build_sharded_val_loader(
                self.index,
                m,
                cache,
                cfg.data,
                mode=mode,
                scales=cfg.eval.scales,
                batch_size=eval_batch,
                **common,
            )

        def make_train_eval() -> Any:  # the training samples through the centre-crop test pipeline
            return build_sharded_val_loader(self.index, m, cache, cfg.data, mode="center", scales=cfg.eval.scales,
                                            batch_size=eval_batch, split="train", **common)  # fmt: skip

        counts = (lambda: fetch_counts(cache)) if cache.remote else None  # a local root fetches nothing
        pin = self.order_pin(cfg.data)
        # No make_test: as for the folder layout, ImageNet's test labels are not public.
        return Data(train=train, num_train=self.num_train, num_classes=self.num_classes, make_val=make_val,
                    make_train_eval=make_train_eval, fetch_counts=counts, order_pin=pin)  # fmt: skip


def fetch_counts(cache: ShardCache) -> dict[str, float]:
    """What ``cache`` fetched and what its reads found, since it opened: the fetch engine's GETs,
    retries, 503s, seconds of backoff and bytes (``FetchStats.snapshot``), and the shard reads and
    cache hits (``CacheReads.take``, which starts a new period of shard reads)."""
    return {**cache.fetch_stats.snapshot(), **cache.reads.take()}


def open_sharded(cfg: DataConfig) -> ShardedSource | None:
    """The sharded dataset at ``cfg.root``, or None when it holds no manifest (the folder layout)."""
    manifest = load_manifest(cfg.root)
    return None if manifest is None else ShardedSource(cfg, manifest)


# ---------------------------------------------------------------- validation


class _ValFeed:
    """Batches of (encoded image, label) over ids, padded with the first id, cycling pass after pass."""

    def __init__(self, reader: ShardReader, ids: np.ndarray, labels: np.ndarray, batch_size: int):
        self.reader, self.ids, self.labels, self.batch_size = reader, ids, labels, batch_size
        self.pos = 0

    def __iter__(self) -> _ValFeed:
        return self

    def __next__(self) -> list[list[np.ndarray]]:
        n = len(self.ids)
        take = [self.pos + j for j in range(self.batch_size)]
        take = [t if t < n else 0 for t in take]  # the last batch of a pass is padded
        self.pos = self.pos + self.batch_size if self.pos + self.batch_size < n else 0
        ids = self.ids[take]
        return [self.reader.read(ids), [np.int64(self.labels[t]) for t in take]]


def build_sharded_val_loader(
    index: ImageFolderIndex,
    manifest: Manifest,
    cache: ShardCache,
    cfg: DataConfig,
    *,
    mode: str,
    scales: tuple[int, ...],
    batch_size: int,
    rank: int,
    world_size: int,
    device_id: int | None,
    num_threads: int,
    channels_last: bool = False,
    half: bool = False,
    split: str = "val",
) -> Any:
    """``build_val_loader`` over the manifest's samples of ``split`` (same arguments, same outputs):
    ``val``, or ``train`` for the training images in eval mode (each rank a contiguous slice of the
    manifest's training samples, no augmentation)."""
    from pipeline.data.dali_pipeline import VAL_MODES, build_val_pipeline
    from pipeline.data.rank_split import augmentation_seed, rank_val_range

    if mode not in VAL_MODES:
        raise ValueError(f"eval mode {mode!r}; choose one of {VAL_MODES}")
    if mode == "multiscale" and not scales:
        raise ValueError("eval mode 'multiscale' needs at least one scale (eval.scales)")
    if batch_size < 1:
        raise ValueError(f"val batch_size must be positive, got {batch_size}")
    if split not in ("train", "val"):
        raise ValueError(f"split {split!r}; choose 'train' or 'val'")
    names, all_labels = (
        (index.train_files, index.train_labels) if split == "train" else (index.val_files, index.val_labels)
    )
    mine = rank_val_range(len(names), rank=rank, world_size=world_size)
    ids = np.arange(mine.start, mine.stop)
    labels = np.asarray(all_labels, np.int64)[mine.start : mine.stop]
    reader = ShardReader(manifest, cache, split, None)
    cache.prefetch(shards_in_order(manifest, split, ids) if len(ids) else [])

    def make_pipe() -> Any:
        return build_val_pipeline(
            mode, [], [], cfg, batch_size=batch_size, device_id=device_id, num_threads=num_threads if num_threads > 0 else usable_cpus(),
            seed=augmentation_seed(0, 0, rank), channels_last=channels_last, half=half, scales=tuple(scales),
            source=_ValFeed(reader, ids, labels, batch_size),
        )  # fmt: skip

    files = list(names[mine.start : mine.stop])
    return _ShardValLoader(mode, files, make_pipe, batch_size, torch_device(device_id), channels_last)


def _to_torch(tl: Any, device: torch.device) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    t = tl.as_tensor()
    out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(t, out, cuda_stream=stream)
    return out


class _ShardValLoader(ValLoader):
    """The folder layout's val loader, run with ``pipe.run()``: the feed pads, this cuts."""

    def _suspects(self, seen: int) -> list[str]:
        return []  # the bytes come from a checked shard; DALI's own message stands

    def _dense(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seen = 0
        while seen < len(self.files):
            images, labels = self._pipe.run()
            n = min(self.batch_size, len(self.files) - seen)
            x = _to_torch(images, self._device)[:n]
            y = _to_torch(labels, torch.device("cpu")).reshape(-1)[:n]
            if self.mode == "tencrop":
                x = x.reshape(n * NUM_TEN_CROPS, *x.shape[2:])
            seen += n
            yield nchw(x, self._channels_last), labels_on(y, self._device)
