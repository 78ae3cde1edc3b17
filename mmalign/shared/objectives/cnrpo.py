"""SPEC §4: CNRPO's main-stage objective."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmalign.shared.objectives.base import Objective
from mmalign.shared.objectives.batch import neg_log_sigmoid
from mmalign.shared.objectives.hyperparameters import finite_number, positive_number
from mmalign.shared.objectives.registry import register


@register
class CNRPO(Objective):
    """CNRPO main stage (SPEC §4, cnrpo Eq. 14, Algorithm 1):

    `−log σ( γ·h_θ(x) − β·h_ref(x) + Σ_i α_i · SG(h_θ(x ⊕ t_i)) )`, `h_π = logp_π(y_w) − logp_π(y_l)`.

    Extra inputs `triggered_chosen`, `triggered_rejected` [B, n_triggers]: the current policy's log-likelihoods
    of y_w and y_l on the prompt with trigger `t_i` (from a no-grad forward); they are always detached.
    `alphas`: one bias-aversion weight per trigger (paper: 0.1β–0.9β). `gamma` defaults to β; γ = β with all
    α = 0 is DPO exactly.
    """

    name = "cnrpo"
    extra_inputs = ("triggered_chosen", "triggered_rejected")

    def __init__(
        self, beta: float, gamma: float | None = None, alphas: Sequence[float] = (), nll: float = 0.0
    ) -> None:
        super().__init__(beta, nll)
        self.gamma = self.beta if gamma is None else positive_number("gamma", gamma, self.name)
        if isinstance(alphas, (int, float)) or not isinstance(alphas, Sequence):
            raise ValueError(f"cnrpo: alphas must be a list with one weight per trigger; got {alphas!r}")
        self.alphas = [finite_number("alphas[]", a, self.name) for a in alphas]
        negative = [a for a in self.alphas if a < 0]
        if negative:
            raise ValueError(f"cnrpo: every alpha (bias-aversion weight) must be >= 0; got {self.alphas}")

    def losses(self, batch, *, triggered_chosen, triggered_rejected):
        n_triggers = len(self.alphas)
        policy_margin = (batch.policy_chosen - batch.policy_rejected).squeeze(-1)
        ref_margin = (batch.ref_chosen - batch.ref_rejected).squeeze(-1)
        triggered_margin = self._triggered_margin(triggered_chosen, triggered_rejected, policy_margin, n_triggers)
        alphas = torch.tensor(self.alphas, dtype=policy_margin.dtype, device=policy_margin.device)
        bias_term = triggered_margin @ alphas if n_triggers else torch.zeros_like(policy_margin)
        logits = self.gamma * policy_margin - self.beta * ref_margin + bias_term
        return neg_log_sigmoid(logits), {"cnrpo/bias_term": bias_term.mean(), "cnrpo/logits": logits.detach().mean()}

    def _triggered_margin(self, chosen: Tensor, rejected: Tensor, like: Tensor, n_triggers: int) -> Tensor:
        expected = (like.shape[0], n_triggers)
        for field_name, value in (("triggered_chosen", chosen), ("triggered_rejected", rejected)):
            if not isinstance(value, Tensor) or not torch.is_floating_point(value):
                raise ValueError(f"cnrpo: {field_name} must be a floating-point tensor of shape {list(expected)}")
            if value.dim() == 1 and n_triggers == 1:
                value = value.unsqueeze(-1)
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"cnrpo: {field_name} must have shape [B, n_triggers] = {list(expected)} (one column per alpha, "
                    f"{n_triggers} alphas given); got {tuple(value.shape)}"
                )
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"cnrpo: {field_name} contains NaN or inf")
        chosen = chosen.reshape(expected).detach().to(like.dtype)
        rejected = rejected.reshape(expected).detach().to(like.dtype)
        return chosen - rejected
