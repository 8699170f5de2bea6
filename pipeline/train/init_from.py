"""``model.init_from``: start a run from another checkpoint's weights, at step 0 of its own schedule.

    python -m pipeline train --config configs/cifar10/plain56.yaml model.init_from=runs/plain56-from-plain20

Unlike ``resume_from`` (which continues a run: optimizer, schedule position, RNG), only the
model's weights (and BN statistics) are loaded; the optimizer, the lr schedule and the step
counter start fresh. A run that already has checkpoints of its own resumes from them instead,
so an interrupted run started with ``init_from`` carries on where it stopped.

The folder is a checkpoint (``state.pt`` inside, e.g. what ``python -m pipeline deepen`` writes)
or a run folder, whose newest checkpoint is taken; local or a URI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import Config, ConfigError
from pipeline.store.locations import is_uri
from pipeline.train import checkpoint as ckpt


def resolve(source: str) -> str:
    """The checkpoint folder ``source`` names: itself, or a run folder's newest checkpoint."""
    if not is_uri(source) and (Path(source) / ckpt.STATE_FILE).is_file():
        return source
    found = ckpt.list_checkpoints(source)
    return found[0] if found else source


def read_initial_state(cfg: Config) -> tuple[str, dict[str, Any]]:
    """(the checkpoint folder, its state) for ``model.init_from``; ``ConfigError`` naming the key."""
    source = resolve(cfg.model.init_from)
    try:
        with ckpt.fetched(source) as folder:
            return source, ckpt.read(folder)
    except (ckpt.CheckpointError, OSError) as e:
        raise ConfigError(f"model.init_from={cfg.model.init_from!r}: {e}") from None


def check_fits(state: dict[str, Any], model: nn.Module, init_from: str) -> None:
    """The checkpoint's weights have exactly the model's keys and shapes (works on the meta device)."""
    theirs, ours = state["model"], model.state_dict()
    missing = sorted(ours.keys() - theirs.keys())
    unexpected = sorted(theirs.keys() - ours.keys())
    wrong = [k for k in ours.keys() & theirs.keys() if tuple(ours[k].shape) != tuple(theirs[k].shape)]
    if missing or unexpected or wrong:
        name = (state["config"].get("model") or {}).get("name")
        raise ConfigError(
            f"model.init_from={init_from!r} holds weights of {name!r} that do not fit this model; "
            f"missing: {missing[:5] or 'none'}; unexpected: {unexpected[:5] or 'none'}; "
            f"other shapes: {sorted(wrong)[:5] or 'none'}"
        )


def load_initial_weights(model: nn.Module, cfg: Config, *, is_main: bool) -> None:
    """Load ``model.init_from``'s weights into ``model`` (every rank reads its own copy); no-op if unset."""
    if not cfg.model.init_from:
        return
    source, state = read_initial_state(cfg)
    check_fits(state, model, cfg.model.init_from)
    with torch.no_grad():
        ckpt.restore_model(state, model)
    if is_main:
        print(f"initial weights from {source} (weights only; the schedule starts at step 0)", flush=True)
