"""Group baselines (RLOO, GRPO), the clipped surrogate and chosen/rejected groups formed by reward."""
import pytest
import torch

from mmalign.shared.policy_gradient import clipped_policy_loss, form_groups, group_advantages


def test_rloo_advantages_leave_one_out():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 1.0]])
    expected = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3], [-2 / 3, -2 / 3, 2 / 3, 2 / 3]])
    assert torch.allclose(group_advantages(rewards, "rloo"), expected)


def test_grpo_advantages_standardise_within_the_group():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    got = group_advantages(rewards, "grpo")
    assert torch.allclose(got[0], (rewards[0] - 3.0) / (3.5 ** 0.5 + 1e-6))
    assert torch.equal(got[1], torch.zeros(4))  # a tied group gives no signal


def test_group_baseline_needs_two_samples():
    with pytest.raises(ValueError, match="k >= 2"):
        group_advantages(torch.ones(3, 1), "rloo")
    with pytest.raises(ValueError, match="unknown advantage"):
        group_advantages(torch.ones(3, 2), "reinforce++")


def test_clipped_surrogate():
    old = torch.zeros(3)
    logp = torch.tensor([0.5, 0.0, -0.5], requires_grad=True)  # ratios e^0.5, 1, e^-0.5
    advantages = torch.tensor([1.0, 1.0, -1.0])
    losses, fraction = clipped_policy_loss(logp, old, advantages, 0.2)
    assert torch.allclose(losses, torch.tensor([-1.2, -1.0, 0.8]))
    assert fraction.item() == pytest.approx(2 / 3)
    losses.sum().backward()
    assert logp.grad.tolist() == [0.0, -1.0, 0.0]  # clipped samples carry no gradient
    plain, _ = clipped_policy_loss(torch.zeros(2, requires_grad=True), torch.zeros(2), torch.tensor([2.0, -1.0]), None)
    assert plain.tolist() == [-2.0, 1.0]


def test_top_bottom_groups_by_reward():
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.3], [1.0, 1.0, 1.0, 1.0]])
    chosen, chosen_mask, rejected, rejected_mask, valid = form_groups(rewards)
    assert chosen[0].tolist() == [1, 2] and rejected[0].tolist() == [0, 3]
    assert valid.tolist() == [True, False]  # all tied: no preference
    chosen, _, rejected, _, _ = form_groups(rewards, group_size=1)
    assert chosen[0].tolist() == [1] and rejected[0].tolist() == [0]
    with pytest.raises(ValueError, match="group_size"):
        form_groups(rewards, group_size=3)


def test_threshold_groups_are_ragged():
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.3], [2.0, 3.0, 4.0, 5.0]])
    chosen, chosen_mask, rejected, rejected_mask, valid = form_groups(rewards, selection="threshold", threshold=0.4)
    assert chosen[0][chosen_mask[0]].tolist() == [1, 2]
    assert sorted(rejected[0][rejected_mask[0]].tolist()) == [0, 3]
    assert valid.tolist() == [True, False]  # every sample of prompt 2 is above: no rejected group
    with pytest.raises(ValueError, match="needs threshold"):
        form_groups(rewards, selection="threshold")
