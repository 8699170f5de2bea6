"""``python -m pipeline deepen``: a deeper network built from a trained shallower one (the paper's construction).

    python -m pipeline deepen --checkpoint runs/cifar10-plain20/checkpoint_epoch0164 \\
        --config configs/cifar10/plain56.yaml --out runs/plain56-from-plain20 data.root=data/cifar10
    python -m pipeline train --config configs/cifar10/plain56.yaml model.init_from=runs/plain56-from-plain20

He et al. (2015, Sec. 1): "There exists a solution by construction to the deeper model: the
added layers are identity mapping, and the other layers are copied from the learned shallower
model." Here the deeper network keeps every block of the shallower one at the same place (block
i of stage s stays block i of stage s, so the first block of each stage, the one that strides
and widens, is always a copied one) and appends the added blocks at the end of each stage,
where they map a tensor of one width to itself. An added block computes the identity:

- **plain block**: every conv a Dirac delta (``torch.nn.init.dirac_``: out channel c reads in
  channel c at the kernel's centre), every BN passing values through in eval mode (running mean
  0, running variance 1 - eps, weight 1, bias 0: ``(x - 0) / sqrt((1 - eps) + eps) * 1 + 0``,
  and ``(1 - eps) + eps`` rounds to exactly 1 in float32 for the default eps), and the ReLU after
  each sees non-negative values: a block's input is the output of a ReLU (the stem's or the
  previous block's), and the Dirac conv and the pass-through BN keep it as it is.
- **residual block**: the residual branch outputs exactly zero (its last BN has weight 0 and
  bias 0, so its output is ``0 * finite + 0 = 0`` in eval mode for any input), the shortcut is
  the identity (option A/B inside a stage; with option C the 1x1 projection becomes a Dirac
  delta and its BN passes through), and ``relu(0 + x) = x`` for the non-negative input. The
  alternative, Dirac convs in the branch too, would give ``x + x``: not the identity. The
  branch's convs keep the deeper network's He initialisation, so, as with
  ``zero_init_residual``, the gradient reaches the last BN's weight from the first step.

Both are exact in float arithmetic up to the convolution kernels' own summation (a Dirac
kernel adds exact zeros); the command measures the largest logit difference in eval mode on a
sample of the training and test images (``--inputs data``, the default: the deeper config's
dataset, the training images without augmentation) or on generated inputs (``--inputs
generated``: standard-normal images of the config's input size, for a machine without the
dataset), prints it, and writes nothing if it exceeds the tolerance. In training mode BN
normalises with the batch's statistics instead, so the constructed net is the shallower one's
function in eval mode only: what the paper's argument is about (training error measured on the
training images in eval mode, ``train_eval/top1_err``).

Refused, with the reason: a different dataset family (a CIFAR net and an ImageNet net), plain
against residual, a different width schedule (basic against bottleneck blocks, other widths or
classes), a shallower net that is not shallower (every stage at least as deep, the whole
strictly deeper), and a shortcut of a copied block that has no form in the deeper one (a
trained projection into option A's zero-padding identity).

The output is a checkpoint like any other (``DIR/state.pt`` at epoch 0, step 0, with a fresh
optimizer state and the deeper config), plus ``DIR/deepened.json`` (where it came from, the
blocks added, the measured differences). ``train ... model.init_from=DIR`` loads its weights
only and starts the schedule at step 0; ``pipeline eval --checkpoint DIR`` scores it;
``resume_from=DIR`` resumes from it like from any checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import is_cifar
from pipeline.models.resnet import BasicBlock, Bottleneck, ZeroPadShortcut

DEEPENED_FILE = "deepened.json"
# Largest logit difference accepted, relative to the largest logit (and at least this absolute).
TOLERANCE = 1e-4


class ConstructionError(ValueError):
    """A pair of networks without the identity construction, with the reason."""


@dataclass(frozen=True)
class Construction:
    """What ``deepen_into`` did."""

    copied: int  # tensors copied from the shallower network
    added_blocks: tuple[str, ...]  # module names of the blocks set to the identity


def _stages(model: nn.Module) -> list[tuple[str, nn.Sequential]]:
    """The model's stages: its children that are sequences of residual/plain blocks."""
    return [
        (name, m)
        for name, m in model.named_children()
        if isinstance(m, nn.Sequential) and len(m) and all(isinstance(b, BasicBlock | Bottleneck) for b in m)
    ]


def _is_plain(model: nn.Module) -> bool:
    return all(b.shortcut is None for _, stage in _stages(model) for b in stage)


def _shortcut_kind(block: BasicBlock | Bottleneck) -> str:
    s = block.shortcut
    if s is None:
        return "none (plain)"
    if isinstance(s, nn.Identity):
        return "identity"
    if isinstance(s, ZeroPadShortcut):
        return "zero-padding identity (option A)"
    return "projection (option B/C)"


def check_pair(shallow: nn.Module, deep: nn.Module, names: tuple[str, str] = ("shallower", "deeper")) -> None:
    """Raise ``ConstructionError`` unless ``deep`` can be built from ``shallow`` by adding identity blocks.

    Args:
        shallow: the trained network.
        deep: the network to build (freshly initialised).
        names: how the two are called in messages (their model names).
    """
    a, b = names
    if type(shallow) is not type(deep):
        raise ConstructionError(
            f"{a} is a {type(shallow).__name__} and {b} a {type(deep).__name__}: a different dataset "
            "family (CIFAR 6n+2 against ImageNet); the construction copies layers, so both must be one family"
        )
    if _is_plain(shallow) != _is_plain(deep):
        kinds = {True: "plain", False: "residual"}
        raise ConstructionError(
            f"{a} is {kinds[_is_plain(shallow)]} and {b} is {kinds[_is_plain(deep)]}: the construction keeps "
            "the family (plain to plain, residual to residual)"
        )
    s_stages, d_stages = _stages(shallow), _stages(deep)
    if [n for n, _ in s_stages] != [n for n, _ in d_stages]:
        raise ConstructionError(f"{a} and {b} have different stages: a different width schedule")
    for (stage, s_seq), (_, d_seq) in zip(s_stages, d_stages, strict=True):
        if type(s_seq[0]) is not type(d_seq[0]):
            raise ConstructionError(
                f"{stage}: {a} has {type(s_seq[0]).__name__} blocks and {b} {type(d_seq[0]).__name__} blocks: "
                "a different width schedule (a bottleneck's 4x-wide output has no counterpart in a basic block)"
            )
    counts = [(len(s), len(d)) for (_, s), (_, d) in zip(s_stages, d_stages, strict=True)]
    if any(ns > nd for ns, nd in counts) or sum(nd for _, nd in counts) <= sum(ns for ns, _ in counts):
        raise ConstructionError(
            f"{b} is not deeper than {a} stage by stage (blocks per stage: {a} {[ns for ns, _ in counts]}, "
            f"{b} {[nd for _, nd in counts]}): every stage must have at least as many blocks and the whole "
            "network more; pass the shallower net's checkpoint and the deeper net's config"
        )
    for (stage, s_seq), (_, d_seq) in zip(s_stages, d_stages, strict=True):
        for i, (sb, db) in enumerate(zip(s_seq, d_seq, strict=False)):
            if _shortcut_kind(sb) != _shortcut_kind(db):
                raise ConstructionError(
                    f"{stage}.{i}: {a}'s shortcut is {_shortcut_kind(sb)}, {b}'s is {_shortcut_kind(db)}: "
                    "a trained shortcut has no identity form in the other option; use the same model.shortcut"
                )
        for i in range(len(s_seq), len(d_seq)):
            _identity_form_exists(d_seq[i], f"{stage}.{i}")
    s_state, d_state = shallow.state_dict(), deep.state_dict()
    for key, value in s_state.items():
        if key not in d_state or d_state[key].shape != value.shape:
            got = "missing" if key not in d_state else f"shape {list(d_state[key].shape)}"
            raise ConstructionError(
                f"{key}: {a} has shape {list(value.shape)}, {b} {got}: a different width schedule "
                "(or number of classes); the copied layers must have the same widths"
            )


def _identity_form_exists(block: BasicBlock | Bottleneck, name: str) -> None:
    convs = [m for m in _branch(block) if isinstance(m, nn.Conv2d)]
    if block.shortcut is None:
        for conv in convs:
            if conv.in_channels != conv.out_channels or conv.stride != (1, 1) or conv.groups != 1:
                raise ConstructionError(
                    f"{name}: a plain block with a conv from {conv.in_channels} to {conv.out_channels} channels "
                    f"(stride {conv.stride[0]}) has no identity form"
                )
    elif isinstance(block.shortcut, nn.Sequential):  # a projection (option C): must be square, stride 1
        conv = block.shortcut[0]
        if conv.in_channels != conv.out_channels or conv.stride != (1, 1):
            raise ConstructionError(
                f"{name}: a projection shortcut that changes the shape has no identity form"
            )
    elif not isinstance(block.shortcut, nn.Identity):
        raise ConstructionError(f"{name}: an added block must keep the shape; its shortcut changes it")


def _branch(block: BasicBlock | Bottleneck) -> list[nn.Module]:
    """The residual branch's convs and BNs, in order (not the shortcut's)."""
    if isinstance(block, BasicBlock):
        return [block.conv1, block.bn1, block.conv2, block.bn2]
    return [block.conv1, block.bn1, block.conv2, block.bn2, block.conv3, block.bn3]


@torch.no_grad()
def pass_through(bn: nn.BatchNorm2d) -> None:
    """BN that returns its input in eval mode: (x - 0) / sqrt((1 - eps) + eps) * 1 + 0."""
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)
    bn.weight.fill_(1.0)
    bn.bias.zero_()


@torch.no_grad()
def make_identity(block: BasicBlock | Bottleneck) -> None:
    """Set an added block (square, stride 1) to compute the identity on non-negative inputs."""
    if block.shortcut is None:
        for m in _branch(block):
            if isinstance(m, nn.Conv2d):
                nn.init.dirac_(m.weight)
            else:
                pass_through(m)
        return
    for m in _branch(block):
        if isinstance(m, nn.BatchNorm2d):
            pass_through(m)
    last = block.last_bn()
    last.weight.zero_()  # the branch then outputs exactly 0 whatever its convs hold
    last.bias.zero_()
    if isinstance(block.shortcut, nn.Sequential):  # option C: the projection becomes the identity
        nn.init.dirac_(block.shortcut[0].weight)
        pass_through(block.shortcut[1])


@torch.no_grad()
def deepen_into(
    shallow: nn.Module, deep: nn.Module, names: tuple[str, str] = ("shallower", "deeper")
) -> Construction:
    """Copy ``shallow`` into ``deep`` and set the added blocks to the identity (``check_pair`` first).

    Args:
        shallow: the trained network.
        deep: a fresh network of the deeper config; modified in place.
        names: the two networks' names for error messages.

    Returns:
        How many tensors were copied and which blocks were added.
    """
    check_pair(shallow, deep, names)
    s_state = shallow.state_dict()
    d_state = deep.state_dict()
    for key, value in s_state.items():
        d_state[key].copy_(value)
    added = []
    for (stage, s_seq), (_, d_seq) in zip(_stages(shallow), _stages(deep), strict=True):
        for i in range(len(s_seq), len(d_seq)):
            make_identity(d_seq[i])
            added.append(f"{stage}.{i}")
    return Construction(copied=len(s_state), added_blocks=tuple(added))


@torch.no_grad()
def max_logit_difference(
    shallow: nn.Module, deep: nn.Module, batches: Iterable[torch.Tensor], device: torch.device
) -> tuple[float, float, int]:
    """(largest |logit difference|, largest |logit|, images) of the two networks in eval mode."""
    shallow.eval().to(device)
    deep.eval().to(device)
    worst, scale, n = 0.0, 0.0, 0
    for x in batches:
        x = x.to(device)
        a, b = shallow(x), deep(x)
        worst = max(worst, (a - b).abs().max().item())
        scale = max(scale, a.abs().max().item())
        n += x.shape[0]
    return worst, scale, n


def within_tolerance(diff: float, scale: float) -> bool:
    return math.isfinite(diff) and diff <= TOLERANCE * max(1.0, scale)


# ---------------------------------------------------------------- the command


def _first_images(loader: Any, limit: int) -> Iterator[torch.Tensor]:
    seen = 0
    for images, _ in loader.epoch(0):
        if seen >= limit:
            return
        images = images[: limit - seen]
        seen += images.shape[0]
        yield images


def _sample_batches(cfg: Any, inputs: str, sample: int, device: torch.device) -> list[tuple[str, Any]]:
    """[(what, batches)] to compare on: training and test images, or generated inputs."""
    if inputs == "generated":
        size = cfg.data.crop_size
        g = torch.Generator().manual_seed(0)
        images = torch.randn(sample, 3, size, size, generator=g)
        return [(f"generated {size}x{size} inputs", list(images.split(64)))]
    from pipeline.data.source import open_dataset
    from pipeline.host import usable_cpus

    source = open_dataset(cfg.data)
    # Batch 1 for the (unused) augmented training loader: any dataset size works.
    one = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, batch_size=1))
    data = source.loaders(
        one, rank=0, world_size=1, device=torch.device("cpu"), num_threads=usable_cpus(), eval_batch=64
    )
    test = data.make_test() if data.make_test else data.make_val("center")
    test_name = "test" if data.make_test or is_cifar(cfg.data.dataset) else "validation"
    return [
        ("training images (no augmentation)", _first_images(data.make_train_eval(), sample)),
        (f"{test_name} images", _first_images(test, sample)),
    ]


def main(argv: list[str]) -> int:
    from pipeline.config import ConfigError, config_from_dict, load_config, to_dict
    from pipeline.data.layout import DataLayoutError
    from pipeline.models import build_model
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.checkpoint import fetched
    from pipeline.train.init_from import resolve
    from pipeline.train.setup import TrainingProgress, param_groups

    parser = argparse.ArgumentParser(prog="python -m pipeline deepen", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", required=True, help="the shallower net's checkpoint folder, or its run folder"
    )
    parser.add_argument("--config", required=True, help="the deeper net's YAML config")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the deeper checkpoint into")
    parser.add_argument(
        "--inputs",
        choices=("data", "generated"),
        default="data",
        help="compare logits on the config's training and test images (default) or on generated inputs",
    )
    parser.add_argument(
        "--sample", type=int, default=256, help="images per split to compare on (default 256)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides of the deeper config"
    )
    args = parser.parse_args(argv)
    if args.sample < 1:
        parser.error("--sample must be at least 1")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if (args.out / ckpt.STATE_FILE).exists():
        print(
            f"error: {args.out / ckpt.STATE_FILE} exists; remove it or choose another --out", file=sys.stderr
        )
        return 2
    source = resolve(args.checkpoint)
    try:
        with fetched(source) as folder:
            state = ckpt.read(folder)
        shallow_cfg = config_from_dict(state["config"])
        shallow = build_model(shallow_cfg.model)
        ckpt.restore_model(state, shallow)
        deep = build_model(cfg.model)
        built = deepen_into(shallow, deep, (shallow_cfg.model.name, cfg.model.name))
        batches = _sample_batches(cfg, args.inputs, args.sample, torch.device("cpu"))
    except (ckpt.CheckpointError, ConstructionError, ConfigError, DataLayoutError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, DataLayoutError):
            print("(no dataset here? `--inputs generated` compares on generated images)", file=sys.stderr)
        return 2
    print(
        f"{cfg.model.name} from {shallow_cfg.model.name} ({source}): {built.copied} tensors copied, "
        f"{len(built.added_blocks)} identity blocks added ({', '.join(built.added_blocks)})",
        flush=True,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checks, ok = [], True
    for what, split in batches:
        diff, scale, n = max_logit_difference(shallow, deep, split, device)
        passed = n > 0 and within_tolerance(diff, scale)
        ok &= passed
        checks.append({"inputs": what, "images": n, "max_abs_logit_diff": diff, "max_abs_logit": scale})
        print(
            f"eval-mode logits on {n} {what}: largest difference {diff:.3g} (largest logit {scale:.3g}): "
            + ("equal within float tolerance" if passed else "NOT equal"),
            flush=True,
        )
    if not ok:
        print(
            f"error: the deeper network's logits differ beyond {TOLERANCE:g} x max(1, |logit|); nothing written",
            file=sys.stderr,
        )
        return 1
    deep.cpu()
    optimizer = torch.optim.SGD(
        param_groups(deep, cfg.optim.weight_decay, cfg.optim.no_wd_bn_bias), lr=cfg.optim.lr
    )
    record = {
        "source_checkpoint": source,
        "shallower_model": shallow_cfg.model.name,
        "deeper_model": cfg.model.name,
        "tensors_copied": built.copied,
        "added_blocks": list(built.added_blocks),
        "checks": checks,
        "tolerance": TOLERANCE,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / DEEPENED_FILE).write_text(json.dumps(record, indent=2) + "\n")
    # state.pt last (written under a temporary name, then renamed): its presence means the folder is whole.
    ckpt.save(
        args.out,
        model=deep,
        optimizer=optimizer,
        scaler=None,
        progress=TrainingProgress(),
        config=to_dict(cfg),
    )
    print(f"wrote {args.out / ckpt.STATE_FILE} (train with model.init_from={args.out})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
