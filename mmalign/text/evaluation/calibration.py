"""Calibration of the policy's preference prediction, collected over an evaluation pass (thesis §2.6.4, SPEC §2).

The thesis treats a preference pair as a binary prediction whose probability comes from "the exponentials of
normalised scores ... computed for chosen and rejected strings conditioned on input prompts": here the score
of a response is the policy's log-likelihood per response token, and the score of a group (mDPO/mIPO data)
is the mean of its members' scores. :func:`mmalign.shared.metrics.preference_ece` then bins the confidence
``max(p, 1 − p)`` with ``p = σ(s_w − s_l)``. The trainer logs the result as ``eval_ece``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from mmalign.shared.metrics import preference_ece
from mmalign.text.modeling.logprobs import gather_groups

__all__ = ["member_lengths", "group_scores", "CalibrationAccumulator"]


def member_lengths(batch: Mapping[str, Any]) -> torch.Tensor:
    """[N] response-token count of every member, for either collator layout."""
    if "score_members" in batch:  # shared-prompt layout: one scored token per entry
        return torch.bincount(batch["score_members"], minlength=int(batch["num_members"]))
    return batch["loss_mask"].sum(-1)


def group_scores(policy: torch.Tensor, index: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B] mean over each group's present members of log-likelihood / response tokens."""
    mask = index >= 0
    per_token = policy / gather_groups(lengths.to(policy.dtype), index).clamp_min(1)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    return per_token.sum(-1) / mask.sum(-1).clamp_min(1)


class CalibrationAccumulator:
    """Collects chosen/rejected scores batch by batch; :meth:`compute` returns the ECE over all of them."""

    def __init__(self, n_bins: int = 10):
        self.n_bins = n_bins
        self._chosen: list[torch.Tensor] = []
        self._rejected: list[torch.Tensor] = []

    def add(self, inputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> None:
        lengths = member_lengths(batch)
        self._chosen.append(group_scores(inputs["policy_chosen"].detach(), batch["chosen_index"], lengths).float())
        self._rejected.append(group_scores(inputs["policy_rejected"].detach(), batch["rejected_index"], lengths).float())

    def compute(self, accelerator: Optional[Any] = None) -> float:
        chosen, rejected = torch.cat(self._chosen), torch.cat(self._rejected)
        if accelerator is not None and accelerator.num_processes > 1:
            chosen, rejected = accelerator.gather_for_metrics((chosen, rejected))
        return preference_ece(chosen.cpu().numpy(), rejected.cpu().numpy(), n_bins=self.n_bins)
