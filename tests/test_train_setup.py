"""A worker's setup: the optimizer's parameter groups."""

from __future__ import annotations

import torch


def test_param_groups_exclude_bn_and_bias_by_type():
    from pipeline.train.setup import param_groups

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(2),
    )
    model(torch.zeros(1, 3, 5, 5))
    decay, no_decay = param_groups(model, 1e-4, no_wd_bn_bias=True)
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 3, 3, 3), (2, 36)]
    assert sorted(tuple(p.shape) for p in no_decay["params"]) == [(2,), (4,), (4,)]
    assert no_decay["weight_decay"] == 0.0
    (everything,) = param_groups(model, 1e-4, no_wd_bn_bias=False)
    assert len(everything["params"]) == 5 and everything["weight_decay"] == 1e-4
