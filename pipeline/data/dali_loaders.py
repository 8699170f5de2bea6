"""The DALI loaders every ImageNet layout shares: one feed over a reader, as torch tensors.

The reader is what the training feed hands DALI for each sample: a file name that DALI reads
itself (the folder layout, ``pipeline.data.imagenet``), or the encoded image read from the
node's shard cache (``read``: the sharded layout, ``pipeline.data.shard_feed``). Everything
else is the same for both: ``TrainFeed`` walks epoch after epoch through this rank's slice of
each global batch (``pipeline.data.rank_split``) with each sample's augmentation drawn from
(seed, epoch, step, position in the global batch), so a run resumed at any step, on any world
size, sees what an uninterrupted run would have; ``TrainLoader`` keeps one pipeline for the run;
``ValLoader`` builds its pipeline at the first pass and reuses it, and never yields the samples a
reader pads the last batch with, so summing over ranks scores each image once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.data.constants import NUM_TEN_CROPS
from pipeline.data.dali_pipeline import READER, lighting_means
from pipeline.data.erasing import erasing_inputs
from pipeline.data.rank_split import rank_slice, rank_train_order


def torch_device(device_id: int | None) -> torch.device:
    return torch.device("cpu") if device_id is None else torch.device("cuda", device_id)


def nchw(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """NHWC data -> logical NCHW with channels_last memory; NCHW data is returned as is."""
    return images.permute(0, 3, 1, 2) if channels_last else images


def labels_on(raw: torch.Tensor, device: torch.device) -> torch.Tensor:
    return raw.reshape(-1).to(device=device, dtype=torch.int64, non_blocking=True)


def _culprits(files: list[str]) -> list[str]:
    """The files that do not decode among ``files`` (DALI does not say which)."""
    from pipeline.data.image_check import check_image

    found = []
    for path in files:
        problem = check_image(path)
        if problem is not None:
            found.append(f"{path} ({problem[1]})")
    return found


def decode_error(suspects: list[str], error: RuntimeError) -> RuntimeError:
    """``error`` re-worded to name the files that do not decode, when they can be found.

    DALI does not say which file failed; the failing batch is at most the prefetch depth ahead
    of the last one delivered, so only those batches' files are checked.
    """
    bad = _culprits(suspects)
    if not bad:
        return error
    return RuntimeError(
        f"cannot decode {', '.join(bad)}; run `python -m pipeline data verify <root> --fix` "
        "to repair or quarantine such files"
    )


# ---------------------------------------------------------------- training


class TrainFeed:
    """The external source of the training pipeline: batch after batch, epoch after epoch.

    Everything it yields is a pure function of (seed, epoch, step, rank, world size); the
    augmentation of a sample depends on its position in the global batch only, so it is the
    same whatever the world size.
    """

    def __init__(
        self,
        files,
        labels,
        cfg: DataConfig,
        *,
        global_batch,
        rank,
        world_size,
        seed,
        epoch,
        step,
        channel_mean,
        order=None,
        read=None,
    ):
        self.files, self.labels, self.cfg = files, labels, cfg
        self.global_batch, self.rank = global_batch, rank
        self.world_size, self.seed = world_size, seed
        self.mine = rank_slice(global_batch, rank, world_size)
        self.per_rank = self.mine.stop - self.mine.start
        self.steps = len(files) // global_batch
        self.epoch, self.step = epoch, step
        self._order_epoch, self._order = -1, np.empty(0, np.int64)
        self.recent: deque[list[str]] = deque(maxlen=max(2, cfg.prefetch + 2))  # for naming undecodable files
        self.channel_mean = channel_mean  # what "paper"'s lighting offsets are folded into
        # The sharded layout: order(epoch) -> the epoch's permutation; read(ids, epoch, step) ->
        # the encoded images (pipeline.data.shard_feed). None: a full shuffle, file names.
        self.order, self.read = order, read

    def __iter__(self) -> TrainFeed:
        return self

    def _rank_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            order = rank_train_order(
                len(self.files),
                global_batch=self.global_batch,
                rank=self.rank,
                world_size=self.world_size,
                seed=self.seed,
                epoch=self.epoch,
                perm=None if self.order is None else self.order(self.epoch),
            )
            self._order_epoch, self._order = self.epoch, order.reshape(self.steps, self.per_rank)
        return self._order

    def _augmentation(self) -> list[list[np.ndarray]]:
        """Scale, crop position, flip and lighting for this rank's part of the global batch."""
        cfg, n = self.cfg, self.global_batch
        rng = np.random.default_rng([self.seed, self.epoch, self.step, 0xA06])
        lo, hi = float(cfg.scale_min), float(cfg.scale_max)
        scale = rng.uniform(lo, hi, n) if hi > lo else np.full(n, lo)
        pos = rng.uniform(0.0, 1.0, (n, 2))
        mirror = rng.random(n) < 0.5
        alphas = rng.normal(0.0, cfg.pca_std, (n, 3)) if cfg.pca_std > 0 else np.zeros((n, 3))
        means = lighting_means(alphas, self.channel_mean)
        mine = self.mine
        return [
            [np.float32(x) for x in scale[mine]],
            [np.float32(x) for x in pos[mine, 0]],
            [np.float32(x) for x in pos[mine, 1]],
            [np.int32(x) for x in mirror[mine]],
            list(means[mine]),
        ]

    def __next__(self) -> list[list[np.ndarray]]:
        idx = self._rank_order()[self.step]
        names = [self.files[i] for i in idx]
        self.recent.append(names)
        batch = [
            self.read(idx, self.epoch, self.step)
            if self.read is not None
            else [np.frombuffer(name.encode(), np.uint8) for name in names],
            [np.int64(self.labels[i]) for i in idx],
        ]
        side = self.cfg.train_crop(self.epoch)
        if self.cfg.augment != "none":  # the crop's side of this epoch (data.res_schedule)
            batch.append([np.float32(side)] * len(idx))
        if self.cfg.augment == "paper":
            batch += self._augmentation()
        if self.cfg.random_erase > 0:
            batch += erasing_inputs(self.cfg.random_erase, side, seed=self.seed, epoch=self.epoch,
                                    step=self.step, global_batch=self.global_batch, mine=self.mine)  # fmt: skip
        self.step += 1
        if self.step == self.steps:  # run on into the next epoch: the prefetch queue never drains
            self.epoch, self.step = self.epoch + 1, 0
        return batch


class TrainLoader:
    """This rank's training batches; the pipeline is built once and rebuilt only to jump."""

    def __init__(self, make_feed: Callable[[int, int], TrainFeed], build: Callable[[TrainFeed], Any], steps: int,
                 device: torch.device, channels_last: bool):  # fmt: skip
        self._make_feed, self._build, self._steps = make_feed, build, steps
        self._device, self._channels_last = device, channels_last
        self._it: Any = None
        self._feed: TrainFeed | None = None
        self._next: tuple[int, int] | None = None  # the (epoch, step) the pipeline delivers next

    def __len__(self) -> int:
        return self._steps

    def _start(self, epoch: int, start: int) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self._it = None  # releases the old pipeline before the new one allocates
        self._feed = self._make_feed(epoch, start)
        pipe = self._build(self._feed)
        try:
            # The iterator prefetches on construction, so a bad file can fail here already.
            self._it = DALIGenericIterator(pipe, ["images", "labels"], size=-1, auto_reset=False)
        except RuntimeError as e:
            raise decode_error(self._suspects(), e) from e
        self._next = (epoch, start)

    def _suspects(self) -> list[str]:
        """The files that may not have decoded; none for encoded bytes (each checked against its CRC-32)."""
        if self._feed is None or self._feed.read is not None:
            return []
        return [f for b in self._feed.recent for f in b]

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` from step ``start`` on (earlier steps are skipped unread)."""
        if not 0 <= start <= self._steps:
            raise ValueError(f"start step {start} is outside the epoch's {self._steps} steps")
        if self._next != (epoch, start):
            self._start(epoch, start)
        for step in range(start, self._steps):
            self._next = None  # an abandoned pass leaves the pipeline mid-way: the next call restarts it
            try:
                out = next(self._it)[0]
            except RuntimeError as e:
                raise decode_error(self._suspects(), e) from e
            self._next = (epoch, step + 1) if step + 1 < self._steps else (epoch + 1, 0)
            yield nchw(out["images"], self._channels_last), labels_on(out["labels"], self._device)


# ---------------------------------------------------------------- validation


class ValLoader:
    """One pass over this rank's validation slice per call; the pipeline is built at the first pass
    and reused (rebuilt only after a pass that was abandoned half-way)."""

    def __init__(self, mode: str, files: list[str], make_pipe: Callable[[], Any], batch_size: int,
                 device: torch.device, channels_last: bool):  # fmt: skip
        self.mode, self.files, self._make_pipe, self.batch_size = mode, files, make_pipe, batch_size
        self._device, self._channels_last = device, channels_last
        self._pipe: Any = None
        self._it: Any = None

    def __len__(self) -> int:
        return -(-len(self.files) // self.batch_size)

    def _suspects(self, seen: int) -> list[str]:
        return self.files[seen : seen + self.batch_size * (self._pipe.prefetch_queue_depth + 2)]

    def epoch(self, _epoch: int, start: int = 0) -> Iterator[tuple[Any, torch.Tensor]]:
        """Every image of the slice once, in order (``_epoch`` and ``start`` are for the Loader protocol)."""
        if not self.files:
            return
        if self._pipe is None:
            self._pipe = self._make_pipe()
        seen, whole = 0, False
        try:
            batches = self._multiscale() if self.mode == "multiscale" else self._dense()
            for images, lab in batches:
                seen += lab.shape[0]
                yield images, lab
            whole = True
        except RuntimeError as e:
            raise decode_error(self._suspects(seen), e) from e
        finally:
            if not whole:  # stopped half-way: the reader is mid-epoch, start the next pass afresh
                self._pipe = self._it = None

    def _dense(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if self._it is None:
            # Prefetches on construction. At a pass's end auto_reset calls reset(); the reader pads
            # its last batch (PARTIAL cuts it), so the next pass starts at the slice's first image.
            self._it = DALIGenericIterator(
                self._pipe,
                ["images", "labels"],
                reader_name=READER,
                last_batch_policy=LastBatchPolicy.PARTIAL,
                auto_reset=True,
            )
        seen = 0
        for batch in self._it:
            images, labels = batch[0]["images"], batch[0]["labels"]
            n = min(labels.shape[0], len(self.files) - seen)  # belt and braces: never yield a padded sample
            seen += n
            if self.mode == "tencrop":
                # [B, 10, ...] -> [B*10, ...]: rows 10i..10i+9 are sample i's crops.
                images = images[:n].reshape(n * NUM_TEN_CROPS, *images.shape[2:])
            else:
                images = images[:n]
            yield nchw(images, self._channels_last), labels_on(labels[:n], self._device)

    def _multiscale(self) -> Iterator[tuple[list[list[torch.Tensor]], torch.Tensor]]:
        """Varying image sizes cannot form one tensor: copy each sample's output on its own."""
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        device, seen = self._device, 0
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        while seen < len(self.files):
            *scaled, labels = self._pipe.run()
            n = min(self.batch_size, len(self.files) - seen)  # the reader pads the last batch: cut it
            batch: list[list[torch.Tensor]] = []
            for i in range(n):
                per_scale = []
                for tl in scaled:
                    t = tl[i]
                    out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
                    feed_ndarray(t, out, cuda_stream=stream)
                    per_scale.append(nchw(out.unsqueeze(0), self._channels_last))
                batch.append(per_scale)
            lab = labels.as_cpu() if hasattr(labels, "as_cpu") else labels
            lab_t = torch.as_tensor(np.array(lab.as_array()).reshape(-1)[:n], dtype=torch.int64).to(device)
            seen += n
            yield batch, lab_t
