"""SPEC §1: the pairwise objectives on z = ρ_w − ρ_l, and SFT (§1's NLL term on its own)."""
from __future__ import annotations

import torch

from mmalign.shared.objectives.base import Objective
from mmalign.shared.objectives.batch import chosen_nll, masked_mean, neg_log_sigmoid
from mmalign.shared.objectives.hyperparameters import noise_rate
from mmalign.shared.objectives.registry import register


@register
class DPO(Objective):
    """DPO (SPEC §1): `−log σ(β z)`."""

    name = "dpo"

    def losses(self, batch, **extra):
        margin = batch.reward_chosen - batch.reward_rejected
        return neg_log_sigmoid(self.beta * margin), {}


@register
class IPO(Objective):
    """IPO (SPEC §1): `(z − 1/(2β))²`, the IPO paper's target `τ⁻¹/2` with `τ = β` (not cnrpo App. B's `1/(2β²)`)."""

    name = "ipo"

    def losses(self, batch, **extra):
        margin = batch.reward_chosen - batch.reward_rejected
        return (margin - 1.0 / (2.0 * self.beta)) ** 2, {}


@register
class RobustDPO(Objective):
    """rDPO, Chowdhury et al. (SPEC §1): `[(1−ε)·ℓ(βz) − ε·ℓ(−βz)] / (1 − 2ε)` with `ℓ(u) = −log σ(u)`.

    Unbiased for labels flipped at rate ε; it can be negative, and ε = 0 is DPO.
    """

    name = "rdpo"

    def __init__(self, beta: float, eps: float = 0.1, nll: float = 0.0) -> None:
        super().__init__(beta, nll)
        self.eps = noise_rate(eps, self.name)

    def losses(self, batch, **extra):
        logits = self.beta * (batch.reward_chosen - batch.reward_rejected)
        eps = self.eps
        return ((1 - eps) * neg_log_sigmoid(logits) - eps * neg_log_sigmoid(-logits)) / (1 - 2 * eps), {}


@register
class ConservativeDPO(Objective):
    """cDPO, label smoothing (SPEC §1): `(1−ε)·ℓ(βz) + ε·ℓ(−βz)` (cnrpo App. B swaps ε and 1−ε, a typo)."""

    name = "cdpo"

    def __init__(self, beta: float, eps: float = 0.1, nll: float = 0.0) -> None:
        super().__init__(beta, nll)
        self.eps = noise_rate(eps, self.name)

    def losses(self, batch, **extra):
        logits = self.beta * (batch.reward_chosen - batch.reward_rejected)
        return (1 - self.eps) * neg_log_sigmoid(logits) + self.eps * neg_log_sigmoid(-logits), {}


@register
class Hinge(Objective):
    """SLiC hinge (SPEC §1): `max(0, 1 − βz)`."""

    name = "hinge"

    def losses(self, batch, **extra):
        return torch.relu(1.0 - self.beta * (batch.reward_chosen - batch.reward_rejected)), {}


@register
class SFT(Objective):
    """Supervised fine-tuning on the chosen outputs: SPEC §1's NLL term on its own, `−logp_θ(x, y_w) / |y_w|`,
    averaged over each chosen group — the SFT baseline of the thesis' debiasing table (§3.6.2, Table 3.2).

    Neither the rejected outputs nor the reference enter the loss; β only scales the logged implicit rewards.
    `chosen_lengths` normalises per token (text); without it `|y_w| = 1`. For diffusion `−logp_θ = e_θ`, a mean
    over latent elements already (SPEC §7), so the loss is the plain denoising loss on the chosen images.
    """

    name = "sft"
    accepts_groups = True
    takes_lengths = True

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__(beta)

    def losses(self, batch, chosen_lengths=None, **extra):
        if chosen_lengths is None:
            return masked_mean(-batch.policy_chosen, batch.chosen_mask), {}
        return chosen_nll(self.name, batch, chosen_lengths), {}
