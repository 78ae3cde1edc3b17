"""Policy-gradient pieces of online training: group baselines, the clipped surrogate, chosen/rejected groups.

- RLOO (Ahmadian et al. 2024): ``A_i = r_i − mean_{j≠i} r_j`` over the k samples of one prompt
  (``= k/(k−1) · (r_i − mean_j r_j)``).
- GRPO (Shao et al. 2024): ``A_i = (r_i − mean_j r_j) / (std_j r_j + ε)`` (population std).
- The surrogate ``−min(w·A, clip(w, 1−ε, 1+ε)·A)`` with ``w = π_θ(y)/π_old(y)`` (sequence-level ratio); with one
  update per rollout ``w = 1`` and its gradient is the REINFORCE gradient ``−A ∇log π_θ(y)``.
- :func:`form_groups`: the chosen and rejected groups of the online group objectives (SPEC §3, thesis §3.6.4),
  from the k samples by reward: the top m vs the bottom m, or above / below a threshold.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

__all__ = ["group_advantages", "clipped_policy_loss", "form_groups", "ADVANTAGES"]

ADVANTAGES = ("rloo", "grpo")


def group_advantages(rewards: Tensor, kind: str, eps: float = 1e-6) -> Tensor:
    """Advantages [B, k] of rewards [B, k] (k samples of each of B prompts) under a group baseline."""
    if rewards.dim() != 2:
        raise ValueError(f"group_advantages: rewards must be [B, k]; got shape {tuple(rewards.shape)}")
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(f"{kind}: a group baseline needs k >= 2 samples per prompt; got k={k}")
    centred = rewards - rewards.mean(-1, keepdim=True)
    if kind == "rloo":
        return centred * (k / (k - 1))
    if kind == "grpo":
        return centred / (rewards.std(-1, unbiased=False, keepdim=True) + eps)
    raise ValueError(f"unknown advantage {kind!r}; allowed: {', '.join(ADVANTAGES)}")


def clipped_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_epsilon: Optional[float]) -> tuple[Tensor, Tensor]:
    """Per-sample surrogate losses and the clipped fraction (0-dim). ``clip_epsilon=None``: no clipping."""
    ratio = torch.exp((logp - old_logp.detach()).clamp(max=50.0))
    unclipped = ratio * advantages
    if clip_epsilon is None:
        return -unclipped, torch.zeros((), device=logp.device)
    clipped = ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon) * advantages
    fraction = ((ratio - 1).abs() > clip_epsilon).float().mean().detach()
    return -torch.minimum(unclipped, clipped), fraction


def form_groups(rewards: Tensor, *, selection: Literal["top_bottom", "threshold"] = "top_bottom",
                group_size: Optional[int] = None, threshold: Optional[float] = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Chosen and rejected members of each prompt's k samples, by reward.

    Returns ``chosen_index`` [B, m_w], ``chosen_mask``, ``rejected_index`` [B, m_l], ``rejected_mask`` (sample
    positions 0..k−1; masked entries hold 0) and ``valid`` [B]: whether the prompt has a preference (both groups
    non-empty and the chosen mean reward above the rejected one; prompts whose k rewards all tie have none).
    ``top_bottom``: the ``group_size`` best vs the ``group_size`` worst (default k // 2). ``threshold``: every
    sample with reward ``>= threshold`` is chosen, the others rejected (ragged groups).
    """
    if rewards.dim() != 2:
        raise ValueError(f"form_groups: rewards must be [B, k]; got shape {tuple(rewards.shape)}")
    batch, k = rewards.shape
    if k < 2:
        raise ValueError(f"form_groups: chosen and rejected groups need k >= 2 samples per prompt; got k={k}")
    order = rewards.argsort(dim=-1, descending=True, stable=True)
    if selection == "top_bottom":
        m = k // 2 if group_size is None else int(group_size)
        if not 1 <= m <= k // 2:
            raise ValueError(f"form_groups: group_size must be in [1, k//2 = {k // 2}]; got {m}")
        chosen, rejected = order[:, :m], order[:, k - m:].flip(-1)
        chosen_mask = torch.ones_like(chosen, dtype=torch.bool)
        rejected_mask = torch.ones_like(rejected, dtype=torch.bool)
    elif selection == "threshold":
        if threshold is None:
            raise ValueError("form_groups: selection 'threshold' needs threshold")
        above = torch.gather(rewards, 1, order) >= threshold  # sorted: above-threshold samples first
        chosen_mask, chosen = above, order
        rejected_mask = (~above).flip(-1)
        rejected = order.flip(-1)
        chosen = torch.where(chosen_mask, chosen, torch.zeros_like(chosen))
        rejected = torch.where(rejected_mask, rejected, torch.zeros_like(rejected))
    else:
        raise ValueError(f"form_groups: unknown selection {selection!r}; allowed: top_bottom, threshold")
    mean = lambda index, mask: (torch.gather(rewards, 1, index) * mask).sum(-1) / mask.sum(-1).clamp_min(1)  # noqa: E731
    valid = chosen_mask.any(-1) & rejected_mask.any(-1) & (mean(chosen, chosen_mask) > mean(rejected, rejected_mask))
    return chosen, chosen_mask, rejected, rejected_mask, valid
