"""Preference objectives on per-sample log-likelihoods: one implementation for text and images (SPEC §0–§5).

Every objective consumes the policy's and the reference's per-sample log-likelihoods of the chosen and the
rejected outputs (for diffusion, the denoising surrogate of SPEC §7), shape `[B]` for pairs or `[B, k]` for
groups, and returns an :class:`ObjectiveOutput`. Objectives live in a registry::

    obj = mmalign.objective("mdpo", beta=0.1)
    out = obj(policy_chosen=pc, policy_rejected=pr, ref_chosen=rc, ref_rejected=rr, chosen_mask=m_w)
    out.loss.backward()

Conventions shared by all objectives:
- `ρ = logp_θ − logp_ref` per sample; a group's implicit reward is the mean of its members' ρ (SPEC §3). For
  pairs this is ρ itself, so every pairwise formula below is the k = 1 case of the group formula.
- Inputs are upcast to float32 (float64 stays): bf16 log-likelihoods of long responses lose the digits that a
  DPO margin lives in. The reference inputs are detached: the reference is frozen by definition.
- `pairs="members"` (config `objective.pairs: members`) trains a pairwise objective on the member pairs
  `(y_w,i, y_l,i)` of equal-size groups: the loss and metrics of the pairwise objective on those pairs.
- `nll=λ` adds `λ · (−logp_θ(x, y_w) / |y_w|)` to any objective (SPEC §1) and needs `chosen_lengths`.
- Metrics use the names of the common ecosystem: `rewards/chosen = β·R_w`, `rewards/rejected`,
  `rewards/margins`, `rewards/accuracies` (share of examples with `R_w > R_l`), `logps/chosen`, `logps/rejected`.
"""

from __future__ import annotations

# Importing each objective's module registers its objectives.
from mmalign.shared.objectives.base import Objective
from mmalign.shared.objectives.batch import ObjectiveOutput, PreferenceBatch, masked_mean, masked_sample_variance
from mmalign.shared.objectives.causal import CausalDPO
from mmalign.shared.objectives.cnrpo import CNRPO
from mmalign.shared.objectives.fdpo import FDPO
from mmalign.shared.objectives.member_pairs import MemberPairs
from mmalign.shared.objectives.multisample import MultiSampleDPO, MultiSampleIPO
from mmalign.shared.objectives.pairwise import DPO, IPO, SFT, ConservativeDPO, Hinge, RobustDPO
from mmalign.shared.objectives.registry import available_objectives, objective, register

__all__ = [
    "Objective",
    "ObjectiveOutput",
    "PreferenceBatch",
    "masked_mean",
    "masked_sample_variance",
    "register",
    "available_objectives",
    "objective",
    "DPO",
    "IPO",
    "RobustDPO",
    "ConservativeDPO",
    "Hinge",
    "SFT",
    "FDPO",
    "MultiSampleDPO",
    "MultiSampleIPO",
    "CNRPO",
    "CausalDPO",
    "MemberPairs",
]
