"""SPEC §2: f-DPO. Each link maps the log-ratios (ρ_w, ρ_l) to the logit f'(u_w) − f'(u_l), u = exp(ρ)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.shared.objectives.base import Objective
from mmalign.shared.objectives.batch import neg_log_sigmoid
from mmalign.shared.objectives.hyperparameters import finite_number
from mmalign.shared.objectives.registry import register

# exp(50) ≈ 5e21 is finite in float32 with room for β and the sigmoid's gradient; beyond it the f-DPO links
# (forward KL, α) are clamped, where the loss is already saturated.
_MAX_EXPONENT = 50.0


def _reverse_kl_logit(rho_w: Tensor, rho_l: Tensor, alpha: float | None) -> Tensor:
    return rho_w - rho_l


def _forward_kl_logit(rho_w: Tensor, rho_l: Tensor, alpha: float | None) -> Tensor:
    return torch.exp((-rho_l).clamp(max=_MAX_EXPONENT)) - torch.exp((-rho_w).clamp(max=_MAX_EXPONENT))


def _jensen_shannon_logit(rho_w: Tensor, rho_l: Tensor, alpha: float | None) -> Tensor:
    # log(2u/(1+u)) = log 2 + ρ − softplus(ρ) = log 2 + log σ(ρ); the constants cancel in the difference.
    return F.logsigmoid(rho_w) - F.logsigmoid(rho_l)


def _alpha_logit(rho_w: Tensor, rho_l: Tensor, alpha: float | None) -> Tensor:
    exp_l = torch.exp((-alpha * rho_l).clamp(max=_MAX_EXPONENT))
    exp_w = torch.exp((-alpha * rho_w).clamp(max=_MAX_EXPONENT))
    return (exp_l - exp_w) / alpha


_F_DIVERGENCE_LINKS: dict[str, Callable[[Tensor, Tensor, float | None], Tensor]] = {
    "reverse_kl": _reverse_kl_logit,
    "forward_kl": _forward_kl_logit,
    "js": _jensen_shannon_logit,
    "alpha": _alpha_logit,
}
_INADMISSIBLE_DIVERGENCES = {"total_variation", "tv", "chi2", "chi_squared", "chi-squared", "pearson"}


@register
class FDPO(Objective):
    """f-DPO (SPEC §2, thesis Eq. 2.2, Table 2.1): `−log σ(β f'(u_w) − β f'(u_l))`, `u = π_θ/π_ref = e^ρ`.

    divergence: reverse_kl (= DPO), forward_kl, js (the thesis' first advice), or alpha with `alpha ∈ (0, 1)`.
    Total variation and χ² are refused: `0 ∈ dom f'` breaks Theorem 1. Exponentials are clamped at e^50, where
    the loss is saturated, so log-ratios of ±200 give finite losses and gradients.
    """

    name = "fdpo"

    def __init__(self, beta: float, divergence: str = "reverse_kl", alpha: float | None = None, nll: float = 0.0):
        super().__init__(beta, nll)
        if divergence in _INADMISSIBLE_DIVERGENCES:
            raise ValueError(
                f"fdpo: divergence {divergence!r} is not admissible: 0 ∈ dom f' for total variation and χ², so the "
                f"reward–policy mapping of Theorem 1 fails (SPEC §2); allowed: {sorted(_F_DIVERGENCE_LINKS)}"
            )
        if divergence not in _F_DIVERGENCE_LINKS:
            raise ValueError(f"fdpo: unknown divergence {divergence!r}; allowed: {sorted(_F_DIVERGENCE_LINKS)}")
        if divergence == "alpha":
            if alpha is None:
                raise ValueError("fdpo: divergence='alpha' needs alpha in (0, 1)")
            alpha = finite_number("alpha", alpha, self.name)
            if not 0 < alpha < 1:
                raise ValueError(
                    f"fdpo: alpha must be in (0, 1) (→0 is reverse KL, →1 forward KL); got {alpha}"
                )
        elif alpha is not None:
            raise ValueError(f"fdpo: alpha is only used with divergence='alpha', not {divergence!r}")
        self.divergence = divergence
        self.alpha = alpha
        self._link = _F_DIVERGENCE_LINKS[divergence]

    def losses(self, batch, **extra):
        logit = self._link(batch.reward_chosen, batch.reward_rejected, self.alpha)
        return neg_log_sigmoid(self.beta * logit), {"fdpo/logit": logit.detach().mean()}
