"""AdamW's parameter groups (mmalign.engine.optim.build_adamw): no weight decay on vectors; with no weight decay at
all one group (one fused kernel call per step) whose updates equal the two groups'."""
import types

import torch

from mmalign.engine.optim import build_adamw


def _cfg(weight_decay):
    return types.SimpleNamespace(weight_decay=weight_decay, learning_rate=0.1, adam_beta1=0.9, adam_beta2=0.999,
                                 adam_epsilon=1e-8)


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4))]


def test_weight_decay_skips_vectors():
    matrix, vector = _params()
    optimizer = build_adamw([matrix, vector], _cfg(0.5))
    groups = [(len(g["params"]), g["weight_decay"]) for g in optimizer.param_groups]
    assert groups == [(1, 0.5), (1, 0.0)]
    assert optimizer.defaults.get("fused")


def test_no_weight_decay_is_one_group_with_the_same_updates():
    one, two = _params(), _params()
    optimizer = build_adamw(one, _cfg(0.0))
    assert [(len(g["params"]), g["weight_decay"]) for g in optimizer.param_groups] == [(2, 0.0)]
    reference = torch.optim.AdamW([{"params": [two[0]], "weight_decay": 0.0}, {"params": [two[1]], "weight_decay": 0.0}],
                                  lr=0.1, fused=True)
    for step in range(3):
        for params, opt in ((one, optimizer), (two, reference)):
            opt.zero_grad()
            (params[0].sum() * (step + 1) + params[1].square().sum()).backward()
            opt.step()
    for a, b in zip(one, two):
        assert torch.equal(a, b)
