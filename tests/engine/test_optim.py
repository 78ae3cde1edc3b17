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


def _loss(params, step):
    return params[0].sum() * (step + 1) + params[1].square().sum()


def test_a_two_group_checkpoint_of_weight_decay_0_resumes_into_the_one_group(tmp_path):
    """Checkpoints written before the single group (matrices, then vectors, both without weight decay) load into it
    and continue with the same updates as the two-group optimizer they were saved from."""
    from mmalign.engine.checkpoints import load_optimizer_state

    old_params = _params()
    old = torch.optim.AdamW([{"params": [old_params[0]], "weight_decay": 0.0},
                             {"params": [old_params[1]], "weight_decay": 0.0}], lr=0.1, fused=True)
    for step in range(2):
        old.zero_grad()
        _loss(old_params, step).backward()
        old.step()
    torch.save(old.state_dict(), tmp_path / "optimizer.pt")
    new_params = [torch.nn.Parameter(p.detach().clone()) for p in old_params]
    new = build_adamw(new_params, _cfg(0.0))
    load_optimizer_state(new, tmp_path / "optimizer.pt")
    assert len(new.param_groups) == 1
    for step in range(2, 4):
        for params, opt in ((old_params, old), (new_params, new)):
            opt.zero_grad()
            _loss(params, step).backward()
            opt.step()
    for a, b in zip(old_params, new_params):
        assert torch.equal(a, b)


def test_an_optimizer_state_that_does_not_fit_is_a_checkpoint_error(tmp_path):
    import pytest

    from mmalign.engine.checkpoints import CheckpointError, load_optimizer_state

    decayed = build_adamw(_params(), _cfg(0.5))  # two groups with different weight decay: not merged
    torch.save(decayed.state_dict(), tmp_path / "optimizer.pt")
    with pytest.raises(CheckpointError, match="does not fit this run's optimizer"):
        load_optimizer_state(build_adamw(_params(), _cfg(0.0)), tmp_path / "optimizer.pt")
