"""SPEC §3: multi-sample objectives on group implicit rewards R(G) = mean ρ."""
from __future__ import annotations

from mmalign.shared.objectives.base import Objective
from mmalign.shared.objectives.batch import masked_sample_variance
from mmalign.shared.objectives.pairwise import DPO
from mmalign.shared.objectives.registry import register


@register
class MultiSampleDPO(DPO):
    """mDPO (SPEC §3, thesis §3.5): `−log σ(β (R(G_w) − R(G_l)))`, R the mean log-ratio over a group.

    Groups may differ in size and be ragged (masks). With k = 1 this is DPO exactly. Biased under
    minibatching (the log-sigmoid of a sample mean), with variance falling as k grows.
    """

    name = "mdpo"
    accepts_groups = True


@register
class MultiSampleIPO(Objective):
    """mIPO with the unbiased estimator of Proposition 1 (SPEC §3):

    `(R(G_w) − R(G_l) − 1/(2β))² − (s_w²/k_w + s_l²/k_l)`, `s²` the sample variance (n−1) of ρ within a group
    (0 for a group of one). Its expectation over the sampled members equals the population loss
    `(E ρ_w − E ρ_l − 1/(2β))²`: the square of a sample mean overshoots by exactly `Var/k`. With k = 1 it is IPO.
    """

    name = "mipo"
    accepts_groups = True

    def losses(self, batch, **extra):
        margin = batch.reward_chosen - batch.reward_rejected
        k_w = batch.chosen_mask.sum(-1).to(margin.dtype)
        k_l = batch.rejected_mask.sum(-1).to(margin.dtype)
        correction = masked_sample_variance(batch.ratio_chosen, batch.chosen_mask) / k_w + masked_sample_variance(
            batch.ratio_rejected, batch.rejected_mask
        ) / k_l
        losses = (margin - 1.0 / (2.0 * self.beta)) ** 2 - correction
        return losses, {"mipo/variance_correction": correction.detach().mean()}
