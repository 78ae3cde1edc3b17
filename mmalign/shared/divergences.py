"""f-divergences to the reference for online training (thesis §2.8.1–2.8.2), on sequence log-ratios.

Samples ``y ~ π`` (the policy), ``ρ = log π(y) − log π_ref(y)`` and ``t = π_ref/π = e^{−ρ}``. Each divergence of
f-DPO (SPEC §2: reverse KL, forward KL, JS, α ∈ (0, 1); the same names) is ``D_f(π ‖ π_ref) = E_{π_ref}[f(π/π_ref)]``
with f-DPO's ``f``; as an expectation under the sampling policy it is ``E_π[g(t)]`` with ``g(t) = t·f(1/t)``:

| divergence | ``g(t)`` | ``g'(1)`` |
|---|---|---|
| reverse_kl | ``−log t`` | −1 |
| forward_kl | ``t log t`` | 1 |
| js | ``t log t − (t+1) log((t+1)/2)`` | 0 |
| alpha | ``(t^α − α t − (1 − α)) / (α(α − 1))`` | 0 |

- **In the reward** (thesis §2.8.1): ``r − β·g(t)`` — the penalties ``r_RKL``, ``r_JS``, ``r_FKL`` of the thesis
  (reverse KL: ``r + β log t``). :func:`divergence_penalty` gives ``g(t)``.
- **In the loss** (thesis §2.8.2, Schulman 2020): ``E_π[g(t) − g'(1)(t − 1)]``, unbiased because ``E_π[t] = 1``,
  with lower variance than ``g(t)`` alone (for reverse KL it is the "k3" estimator ``t − 1 − log t ≥ 0``).
  :func:`divergence_estimate` gives the per-sample terms.

The exponent is clamped at ±50 (as f-DPO does): forward KL's ``t log t`` grows like ``e^{−ρ}`` — the fast-growing
penalty of §2.8.1 — and would overflow float32 for ρ < −88.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["DIVERGENCES", "check_divergence", "divergence_penalty", "divergence_estimate", "f_divergence"]

DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
_INADMISSIBLE = ("total_variation", "tv", "chi2", "chi_squared", "chi-squared", "pearson")
_MAX_EXPONENT = 50.0


def check_divergence(name: str, alpha: Optional[float] = None) -> None:
    """Refuses unknown and inadmissible divergences (SPEC §2) and α outside (0, 1), naming the allowed ones."""
    if name in _INADMISSIBLE:
        raise ValueError(f"divergence {name!r} is not admissible: 0 ∈ dom f' for total variation and χ² (SPEC §2); "
                         f"allowed: {', '.join(DIVERGENCES)}")
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; allowed: {', '.join(DIVERGENCES)}")
    if name == "alpha":
        if alpha is None or isinstance(alpha, bool) or not 0 < float(alpha) < 1:
            raise ValueError(f"divergence 'alpha' needs alpha in (0, 1) (→0 reverse KL, →1 forward KL); got {alpha!r}")
    elif alpha is not None:
        raise ValueError(f"alpha is only used with divergence 'alpha', not {name!r}")


def _log_t(rho: Tensor) -> Tensor:
    rho = rho if rho.dtype == torch.float64 else rho.float()  # bf16 log-ratios lose the digits that matter
    return (-rho).clamp(-_MAX_EXPONENT, _MAX_EXPONENT)


def divergence_penalty(rho: Tensor, name: str, alpha: Optional[float] = None) -> Tensor:
    """``g(t)`` per sample, ``t = e^{−ρ}`` (thesis §2.8.1's penalty: the reward becomes ``r − β·g(t)``)."""
    check_divergence(name, alpha)
    log_t = _log_t(rho)
    t = log_t.exp()
    if name == "reverse_kl":
        return -log_t
    if name == "forward_kl":
        return t * log_t
    if name == "js":
        # (t+1) log((t+1)/2) with log(1+t) = softplus(log t): stable for tiny and huge t
        return t * log_t - (t + 1) * (torch.nn.functional.softplus(log_t) - math.log(2.0))
    a = float(alpha)
    return (torch.exp(a * log_t) - a * t - (1 - a)) / (a * (a - 1))


_G_PRIME_AT_ONE = {"reverse_kl": -1.0, "forward_kl": 1.0, "js": 0.0, "alpha": 0.0}


def divergence_estimate(rho: Tensor, name: str, alpha: Optional[float] = None) -> Tensor:
    """Per-sample terms of the unbiased estimator ``g(t) − g'(1)(t − 1)`` of ``D_f(π ‖ π_ref)`` (thesis §2.8.2);
    their mean over samples ``y ~ π`` estimates the divergence. Differentiable in ``ρ``."""
    t = _log_t(rho).exp()
    return divergence_penalty(rho, name, alpha) - _G_PRIME_AT_ONE[name] * (t - 1)


def f_divergence(policy_probs: Tensor, ref_probs: Tensor, name: str, alpha: Optional[float] = None) -> Tensor:
    """The exact ``D_f(π ‖ π_ref) = Σ_y π(y) g(π_ref(y)/π(y))`` of two categorical distributions (for tests and
    the closed-form checks); ``π`` must be positive where ``π_ref`` is."""
    rho = policy_probs.log() - ref_probs.log()
    return (policy_probs * divergence_penalty(rho, name, alpha)).sum(-1)
