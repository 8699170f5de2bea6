"""The config's sections: typed, frozen dataclasses with the defaults of the paper's ImageNet protocol.

Each key is documented where it is declared; ``pipeline.config.loading`` builds these from YAML
and ``pipeline.train.derived`` computes what follows from them and the world size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A configuration problem, with a message that names the file or key."""


@dataclass(frozen=True)
class ResolutionSchedule:
    """Progressive resizing (FFCV's rule): training crops of ``data.crop_size`` px until epoch
    ``start_ramp``, then a linear ramp to ``end_res`` px at epoch ``end_ramp``, rounded to a multiple
    of ``step``; epochs count from 0. Off while ``end_res`` is 0. The per-worker batch stays fixed."""

    end_res: int = 0
    start_ramp: int = 0
    end_ramp: int = 0
    step: int = 32

    def at(self, epoch: int, start_res: int) -> int:
        """The training crop's side in ``epoch`` for a schedule starting at ``start_res``."""
        if not self.end_res or epoch <= self.start_ramp:
            return start_res
        if epoch >= self.end_ramp:
            return self.end_res
        slope = (self.end_res - start_res) / (self.end_ramp - self.start_ramp)  # np.interp's arithmetic
        ramp = slope * (epoch - self.start_ramp) + start_res
        rounded = int(round(ramp / self.step)) * self.step  # half to even, as FFCV's np.round
        # Ends that are not multiples of the step: never past them, so the side grows monotonically.
        return min(max(rounded, start_res), self.end_res)


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["imagenet", "cifar10"] = "imagenet"
    root: str = "data/imagenet"
    # Train augmentation: "paper" = shorter side random in [scale_min, scale_max] + random crop
    # + flip (+ PCA colour); "inception" = random-resized-crop; "none" = resize + centre crop.
    # CIFAR-10: "paper" = 4-pixel zero pad + random 32 crop + flip; "none" = the images as they are.
    augment: Literal["paper", "inception", "none"] = "paper"
    crop_size: int = 224  # the training crop's side (with res_schedule: its first)
    # Progressive resizing for "paper" and "inception": the training crop grows from crop_size to
    # res_schedule.end_res over epochs start_ramp..end_ramp (FFCV: 160 -> 192 px). DALI takes
    # each batch's size as an input: the pipeline is not rebuilt; a resumed epoch gets its size.
    res_schedule: ResolutionSchedule = field(default_factory=ResolutionSchedule)
    # "ta_wide": TrivialAugment Wide (torchvision's --auto-augment ta_wide) after the random crop and
    # flip of "paper" or "inception", on the uint8 pixels before normalisation: DALI's own
    # trivial_augment_wide, drawn by DALI's RNG like the inception crop, so not replayed exactly on
    # resume. "none": off.
    auto_augment: Literal["none", "ta_wide"] = "none"
    # torchvision's RandomErasing(p=random_erase) after normalisation ("paper" and "inception"): with
    # this chance a rectangle of 2-33 % of the crop, aspect 0.3-3.3, is set to 0. Drawn by the feed
    # from (seed, epoch, step, position in the global batch): a resumed epoch erases the same. 0: off.
    random_erase: float = 0.0
    scale_min: int = 256
    scale_max: int = 480
    val_resize: int = 256
    # The test crop (centre and 10-crop) cut from the image resized to val_resize; 0: crop_size.
    # Larger than training's for the train-test resolution effect (FFCV: train 160-192, test 256
    # of the image resized to 293). With a per-pixel mean (normalize: mean) a test crop of
    # another size subtracts the mean image's channel means, as the multi-scale test does.
    val_crop: int = 0
    pca_std: float = 0.1
    # "meanstd": per-channel mean/std (ImageNet: torchvision's constants). "mean": the paper's
    # subtraction of the training set's mean, nothing divided: ImageNet reads ROOT/train_mean.npz
    # (`python -m pipeline data stats ROOT`: per-pixel, or per-channel); CIFAR-10 computes its
    # per-pixel mean image from the training images itself.
    normalize: Literal["meanstd", "mean"] = "meanstd"
    decoder: Literal["auto", "mixed", "cpu"] = "auto"
    hw_decoder_load: float = 0.65
    num_threads: int = 0  # 0: derived from the CPUs Ray gives each worker
    # Map JPEGs into memory when reading: a small gain on a local disk, a loss on network
    # filesystems (Lustre, NFS, Filestore), where ImageNet usually sits on a cluster.
    mmap: bool = False
    prefetch: int = 2
    # CIFAR-10: hold out this many training images as validation (paper: 5000); the test set is
    # then scored once at the end besides (summary.json: test_top1_err, test_top5_err).
    val_split: int = 0
    # The sharded layout (data.root holds manifest.json.gz, from `python -m pipeline data shard`):
    # each node keeps one copy of the shards here, shared by its ranks (a lock file per shard),
    # when data.root is a URI. "": <system temp dir>/resnet-pipeline-shards, node-local disk on
    # every cloud image; point it at a bigger local disk (NVMe) for ImageNet (about 147 GB).
    cache_dir: str = ""
    # The most the cache folder may hold on each node, in GB (1e9 bytes), counting every job that
    # shares the folder. 0: the disk's free space (plus what the cache holds) less a headroom of
    # 10 % of the disk, at least 5 GB; the limit chosen is said at start. Below the dataset's size
    # the cache evicts the shard read furthest in the future (the order is known); it cannot go
    # below one window of shards plus data.cache_fetchers in flight (the start refuses, naming it).
    cache_limit_gb: float = 0.0
    # Shards each node fetches at once ahead of the sample order, all its ranks together (slot
    # lock files in data.cache_dir; each shard as ranged GETs of 8 MiB, 4 at once).
    cache_fetchers: int = 4
    # Seconds a shard's fetch keeps retrying (503 SlowDown, 5xx, resets, cut or stalled GETs,
    # with jittered exponential backoff) before it is an error: S3 answers 503 SlowDown for
    # minutes while it scales a prefix. 0: the first failure is an error.
    fetch_retry_s: float = 600.0
    # The sharded layout's training order: each epoch permutes the shards by (seed, epoch), cuts
    # them into windows of this many shards, and permutes the samples within each window. So
    # the first batch waits for one window, not the whole dataset. 0: one window (a full shuffle).
    shuffle_window: int = 16

    @property
    def eval_crop(self) -> int:
        """The test crop's side: ``val_crop``, else the training crop."""
        return self.val_crop or self.crop_size

    def train_crop(self, epoch: int) -> int:
        """The training crop's side in ``epoch`` (``res_schedule``)."""
        return self.res_schedule.at(epoch, self.crop_size)


def is_cifar(dataset: str) -> bool:
    """Whether ``data.dataset`` names CIFAR-10 rather than ImageNet: every branch on the dataset
    asks here. It takes the name, not the section, so a run's saved config (a plain dict, for the
    report) is answered the same way as a loaded one."""
    return dataset == "cifar10"


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet50"
    num_classes: int = 1000
    shortcut: Literal["A", "B", "C"] | None = None  # None: the registered model's own option
    v1_5: bool | None = None
    zero_init_residual: bool = False
    # BlurPool (Zhang 2019, as in FFCV's ResNet-50 recipe): a fixed 3x3 binomial blur before every
    # strided conv of 16 or more input channels (pipeline.models.blurpool). ImageNet networks only;
    # no parameters, more multiply-adds (`python -m pipeline models --blurpool`).
    blurpool: bool = False
    # A checkpoint folder (or a run folder: its newest checkpoint) whose weights start this run,
    # e.g. the one `python -m pipeline deepen` writes. Weights only: the optimizer, the schedule and
    # the step start at 0. Used only when the run has no checkpoint of its own (nor resume_from) to resume from.
    init_from: str | None = None


@dataclass(frozen=True)
class OptimConfig:
    batch_size: int = 256  # global batch, split evenly over workers
    # Largest batch one worker runs forward/backward at once (0: no limit). Above it the worker
    # accumulates gradients over equal micro-batches, so the global batch and the lr stay exact.
    max_worker_batch: int = 0
    lr: float = 0.1  # base lr at batch 256 (see scale_lr)
    scale_lr: bool = True  # linear scaling rule: lr = base lr * batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    no_wd_bn_bias: bool = False  # exclude BN and bias parameters from weight decay
    label_smoothing: float = 0.0
    # An exponential moving average of the weights, updated after every optimizer step with this
    # decay (0: off; e.g. 0.9999), and scored beside them (val/ema_top1_err ...; summary.json's
    # ema_val_top1_err): a second validation pass each evaluated epoch. BN running statistics are
    # averaged like the weights. Saved in checkpoints; `eval --checkpoint DIR --ema` scores it.
    ema_decay: float = 0.0
    # The EMA's decay at its t-th update is min(ema_decay, (1 + t) / (10 + t)) (TensorFlow's
    # num_updates rule), so early weights fade fast; false: ema_decay from the start.
    ema_warmup: bool = False
    # MixUp and CutMix on the device, drawn per image from (seed, epoch, step, position in the
    # global batch); each image is mixed with the one at the mirrored position of its worker's
    # batch. MixUp blends whole images with weight lam ~ Beta(mixup_alpha, mixup_alpha); CutMix
    # pastes a box of area about (1 - lam) with lam ~ Beta(cutmix_alpha, cutmix_alpha). The loss is
    # the cross-entropy against both labels weighted lam and 1 - lam; train/top1_err counts a hit
    # when the top class is the label of larger weight. 0: off (the paper).
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # With both on: the chance that an image is cut (CutMix) rather than blended (MixUp).
    mix_switch_prob: float = 0.5


@dataclass(frozen=True)
class ScheduleConfig:
    # step and plateau: the paper's; linear and cosine: down to 0 at the last iteration, no steps
    kind: Literal["step", "plateau", "constant", "linear", "cosine"] = "step"
    epochs: int = 120
    max_iters: int | None = None  # stop after this many iterations (the paper's 600k / 64k)
    milestones: tuple[int, ...] = (30, 60, 90)
    milestone_unit: Literal["epoch", "iter"] = "epoch"
    gamma: float = 0.1
    plateau_patience: int = 5
    plateau_threshold: float = 0.1  # absolute improvement in val top-1 error (percent points)
    min_lr: float = 1e-5
    warmup_epochs: float = 0.0  # linear warm-up from warmup_lr for large batches
    warmup_lr: float = 0.0
    # The paper's ResNet-110 rule: lr = warmup_lr until training error < this (percent).
    warmup_until_train_err: float | None = None


@dataclass(frozen=True)
class EvalConfig:
    mode: Literal["center", "tencrop", "multiscale"] = "center"
    final_mode: Literal["center", "tencrop", "multiscale"] | None = "tencrop"
    scales: tuple[int, ...] = (224, 256, 384, 480, 640)
    every_n_epochs: int = 1
    # Also score the training images in eval mode after each epoch (no augmentation, BN in eval):
    # the training error as the paper's argument means it (metric train_eval/top1_err), beside the
    # running error over the epoch's augmented batches (train/top1_err). None: on for CIFAR-10,
    # off for ImageNet (a pass over 1.28M images per epoch).
    train_eval: bool | None = None
    batch_size: int = 0  # global; 0: same as the training batch
    # Centre evaluation also scores the mirrored crop and averages the two softmax scores
    # (test-time flip, as FFCV's lr_tta; 10-crop holds the flips already).
    flip: bool = False


@dataclass(frozen=True)
class PrecisionConfig:
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    cudnn_benchmark: bool = True  # autotune convolutions for training (always off for multi-scale eval)
    # Gradients cross the network in bf16 (DDP's bf16 compression hook): half the all-reduce bytes.
    grad_compression: Literal["none", "bf16"] = "none"


@dataclass(frozen=True)
class ClusterConfig:
    # Training workers: a number, or [min, max] for Ray Train's elastic scaling (the run starts
    # with as many as fit, at least min, and grows or shrinks as nodes come and go).
    num_workers: int | tuple[int, ...] = 1
    resize_check_s: float = 60.0  # elastic: how often Ray Train checks whether more workers fit
    use_gpu: Literal["auto", "true", "false"] = "auto"
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = 0
    # The process group's timeout (Ray's TorchConfig(timeout_s), and torchrun's group too): a
    # collective waiting on a dead peer fails the step by then.
    collective_timeout_s: int = 600
    # How long Ray Train waits for the whole worker group to be placed (the autoscaler booting
    # GPU nodes) before that start attempt fails; sets RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S.
    start_timeout_s: float = 900.0
    # Elastic runs: how long every worker-group start after the first may wait (a restart after
    # a node loss, a resize). Ray Train first asks again for all the workers it had; after this
    # it decides again from the nodes alive and goes on with those that fit. At most
    # start_timeout_s, which the first start keeps (GPU nodes booting).
    restart_timeout_s: float = 60.0
    # Failed starts (placement timeouts, workers dying while starting) retried before the run
    # fails; Ray's controller_failure_limit, whose default (-1) retries forever.
    start_retries: int = 3
    # How often (seconds of training steps) the workers ask Ray Train whether a node of the group
    # is being drained for a preemption (a spot reclaim); on a notice they checkpoint at once
    # (pipeline.train.preemption). 0: never. Under Ray only.
    preemption_poll_s: float = 5.0
    # Restarts after a preemption (a node drained first, then lost), counted apart from
    # max_failures; Ray's FailureConfig.max_preemption_failures, -1: no limit.
    max_preemption_failures: int = -1

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[-1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers


def requested_gpu(cluster: ClusterConfig) -> bool | None:
    """``cluster.use_gpu`` as a decision: True or False when the config says, None for ``auto``."""
    return None if cluster.use_gpu == "auto" else cluster.use_gpu == "true"


@dataclass(frozen=True)
class CheckpointConfig:
    storage_path: str = "runs"  # local folder or s3:// / gs:// URI
    # The newest N checkpoints are kept (mid-epoch ones included), with or without Ray: resume
    # always starts from the newest readable one.
    num_to_keep: int = 2
    # Also save every N optimizer steps within an epoch (0: at epoch ends only); a restart resumes
    # at that step with the same data order, augmentation, lr and step counter.
    every_n_steps: int = 0


@dataclass(frozen=True)
class TrackingConfig:
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "resnet-pipeline"
    entity: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()
    log_every_n_steps: int = 50


@dataclass(frozen=True)
class Config:
    name: str = "run"
    seed: int = 0
    log_every_n_steps: int = 20
    resume_from: str | None = None  # a checkpoint directory to start from
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def global_eval_batch(self) -> int:
        """The evaluation batch over all workers (``eval.batch_size``, else the training batch)."""
        return self.eval.batch_size or self.optim.batch_size
