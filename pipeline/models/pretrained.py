"""torchvision's published ResNet weights in the registry's networks, checked key by key.

    state = read_torchvision_weights("resnet50-0676ba61.pth", cfg.model)   # model.name=resnet50_v1_5
    model = build_model(cfg.model); model.load_state_dict(state)

A torchvision ``resnet18/34`` file fits ``resnet18``/``resnet34`` (option B); ``resnet50/101/152``
are v1.5 (stride in the bottleneck's 3x3), so they fit ``resnet50_v1_5`` or ``model.v1_5=true``.
The paper's v1 networks have the same parameter names and shapes, so loading into them would
"work" and compute something else: that is refused here by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.models.registry import build_model, model_spec
from pipeline.models.resnet import from_torchvision_state_dict


class WeightsError(ValueError):
    """A weights file that does not fit the configured model; the message names the file and the fix."""


def _tensor_dict(raw: Any, path: Path) -> Mapping[str, torch.Tensor]:
    # Training scripts often wrap the state dict ({"model": ...}, {"state_dict": ...}).
    for key in ("state_dict", "model"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise WeightsError(f"{path}: not a state dict of tensors (got {type(raw).__name__})")
    # torch.nn.parallel / torch.compile prefixes
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in raw.items()}


def check_torchvision_fit(model_cfg: Any) -> None:
    """Refuse models that torchvision's weights cannot mean (v1 bottlenecks, CIFAR and plain nets)."""
    spec = model_spec(model_cfg.name)
    if spec.family != "imagenet" or spec.plain:
        raise WeightsError(
            f"model.name={model_cfg.name!r}: torchvision publishes ResNet-18/34/50/101/152 weights for "
            "ImageNet only; choose one of those"
        )
    v1_5 = spec.v1_5 if model_cfg.v1_5 is None else model_cfg.v1_5
    if spec.depth >= 50 and not v1_5:
        hint = "model.name=resnet50_v1_5" if spec.depth == 50 else "model.v1_5=true"
        raise WeightsError(
            f"model.name={model_cfg.name!r} is the paper's v1 ResNet-{spec.depth} (stride in the first 1x1), "
            f"torchvision's is v1.5 (stride in the 3x3): the weights would load and compute something else; "
            f"set {hint}"
        )


def read_torchvision_weights(path: str | Path, model_cfg: Any) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state-dict file, renamed and checked against the configured model.

    Args:
        path: a ``.pth`` file holding ``torchvision.models.resnetXX(...).state_dict()`` (the
            published files are exactly that).
        model_cfg: ``pipeline.config.ModelConfig`` of the model to load it into.

    Returns:
        A state dict for ``build_model(model_cfg).load_state_dict``.

    Raises:
        WeightsError: unreadable file, a model it cannot mean, or keys/shapes that do not fit
            (listed exactly).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    check_torchvision_fit(model_cfg)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or non-torch file surfaces as many different errors
        raise WeightsError(
            f"{path}: cannot be read as a torch state dict ({type(e).__name__}: {e})"
        ) from None
    state = from_torchvision_state_dict(_tensor_dict(raw, path))
    with torch.device("meta"):  # names and shapes only: no memory, no arithmetic
        expected = {k: tuple(v.shape) for k, v in build_model(model_cfg).state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
        for k in sorted(expected.keys() & state.keys())
        if tuple(state[k].shape) != expected[k]
    ]
    if missing or unexpected or shapes:
        hint = ""
        if any(s.startswith("fc.") for s in shapes) and "fc.weight" in state:
            hint = f"; set model.num_classes={state['fc.weight'].shape[0]} to match the file"
        raise WeightsError(
            f"{path} does not fit model.name={model_cfg.name!r}: missing keys: {missing or 'none'}; "
            f"unexpected keys: {unexpected or 'none'}; shape mismatches: {shapes or 'none'}{hint}"
        )
    return state
