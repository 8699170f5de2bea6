"""``cluster.collective_timeout_s`` becomes the process group's timeout (Ray's ``TorchConfig``,
and the group ``init_context`` creates under torchrun).

Ray's default is 30 minutes: a peer that died mid-step would hold every other rank in its
collective that long. The key is checked at load and handed to the ``TorchTrainer`` that
``run_on_ray`` builds; the trainer itself is replaced here, so no Ray starts.
"""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.config import ConfigError, load_config


def test_default_and_bad_values_name_the_key():
    assert load_config(None).cluster.collective_timeout_s == 600
    assert load_config(None, ["cluster.collective_timeout_s=90"]).cluster.collective_timeout_s == 90
    for bad in ("0", "-5"):
        with pytest.raises(ConfigError, match=r"cluster\.collective_timeout_s: must be positive"):
            load_config(None, [f"cluster.collective_timeout_s={bad}"])
    with pytest.raises(ConfigError, match=r"cluster\.collective_timeout_s: expected int"):
        load_config(None, ["cluster.collective_timeout_s=soon"])


def test_the_key_reaches_the_trainers_torch_config(recorded_trainer, tmp_path):
    import ray.train.torch

    from pipeline.driver.ray_runner import run_on_ray

    cfg = load_config(
        None,
        ["cluster.collective_timeout_s=45", "cluster.use_gpu=false", f"checkpoint.storage_path={tmp_path}"],
    )
    assert run_on_ray(cfg, worker=lambda loop_config: None) == "fitted"
    torch_config = recorded_trainer["torch_config"]
    assert isinstance(torch_config, ray.train.torch.TorchConfig)
    assert torch_config.timeout_s == 45


def test_the_key_reaches_torchruns_process_group(monkeypatch):
    """Under torchrun ``init_context`` creates the group itself, with the configured timeout."""
    import datetime

    import torch.distributed as dist

    from pipeline.train import distributed

    seen: dict[str, Any] = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    ctx = distributed.init_context(False, use_gpu=False, timeout_s=45)
    assert (ctx.rank, ctx.world_size, ctx.owns_group) == (1, 2, True)
    assert seen == {"backend": "gloo", "rank": 1, "world_size": 2, "timeout": datetime.timedelta(seconds=45)}
