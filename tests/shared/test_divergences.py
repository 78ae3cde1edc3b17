"""f-divergences to the reference (thesis §2.8.1–2.8.2): closed forms, the penalties, the unbiased estimator."""
import math

import pytest
import torch

from mmalign.shared.divergences import (DIVERGENCES, check_divergence, divergence_estimate, divergence_penalty,
                                        f_divergence)

PI = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)   # the policy
REF = torch.tensor([0.2, 0.3, 0.1, 0.4], dtype=torch.float64)    # the reference
CASES = [("reverse_kl", None), ("forward_kl", None), ("js", None), ("alpha", 0.5), ("alpha", 0.2)]


def closed_form(name, alpha):
    if name == "reverse_kl":
        return float((PI * (PI / REF).log()).sum())
    if name == "forward_kl":
        return float((REF * (REF / PI).log()).sum())
    if name == "js":  # the thesis' f: twice the Jensen–Shannon divergence
        mix = (PI + REF) / 2
        return float((PI * (PI / mix).log()).sum() + (REF * (REF / mix).log()).sum())
    return float(((PI ** (1 - alpha) * REF ** alpha).sum() - 1) / (alpha * (alpha - 1)))


@pytest.mark.parametrize("name, alpha", CASES)
def test_exact_divergence_matches_closed_form(name, alpha):
    assert float(f_divergence(PI, REF, name, alpha)) == pytest.approx(closed_form(name, alpha), rel=1e-6)
    assert float(f_divergence(PI, PI, name, alpha)) == pytest.approx(0.0, abs=1e-9)


def test_penalties_are_the_thesis_rewards():
    """§2.8.1: r_RKL = r + β log t, r_JS = r − β(t log t − (t+1) log((t+1)/2)), r_FKL = r − β t log t."""
    rho = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0], dtype=torch.float64)
    t = torch.exp(-rho)
    assert torch.allclose(divergence_penalty(rho, "reverse_kl"), -t.log())
    assert torch.allclose(divergence_penalty(rho, "forward_kl"), t * t.log())
    assert torch.allclose(divergence_penalty(rho, "js"), t * t.log() - (t + 1) * ((t + 1) / 2).log())
    # forward KL's penalty grows fastest as the policy leaves the reference (the instability of §2.8.1)
    far = torch.tensor([-6.0], dtype=torch.float64)
    assert divergence_penalty(far, "forward_kl") > divergence_penalty(far, "js") > divergence_penalty(far, "reverse_kl")


@pytest.mark.parametrize("name, alpha", CASES)
def test_estimator_is_unbiased_by_monte_carlo(name, alpha):
    """§2.8.2: E_{y~π}[g(t) − g'(1)(t − 1)] = D_f(π ‖ π_ref), t = π_ref/π, within 4 standard errors."""
    generator = torch.Generator().manual_seed(0)
    draws = torch.multinomial(PI, 200_000, replacement=True, generator=generator)
    rho = (PI.log() - REF.log())[draws]
    terms = divergence_estimate(rho, name, alpha)
    standard_error = float(terms.std()) / math.sqrt(len(terms))
    assert abs(float(terms.mean()) - closed_form(name, alpha)) < 4 * standard_error + 1e-12


def test_control_variate_lowers_the_variance_of_reverse_kl():
    generator = torch.Generator().manual_seed(1)
    near = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    ref = torch.tensor([0.35, 0.3, 0.35], dtype=torch.float64)
    rho = (near.log() - ref.log())[torch.multinomial(near, 50_000, replacement=True, generator=generator)]
    assert divergence_estimate(rho, "reverse_kl").var() < divergence_penalty(rho, "reverse_kl").var() / 5
    assert bool((divergence_estimate(rho, "reverse_kl") >= 0).all())  # k3 is non-negative


def test_estimator_is_finite_far_from_the_reference_and_differentiable():
    rho = torch.tensor([-200.0, -60.0, 0.0, 60.0, 200.0], requires_grad=True)
    for name, alpha in CASES:
        values = divergence_estimate(rho, name, alpha)
        assert bool(torch.isfinite(values).all()), name
        (grad,) = torch.autograd.grad(values.sum(), rho)
        assert bool(torch.isfinite(grad).all()), name


@pytest.mark.parametrize("name, alpha, message", [
    ("tv", None, "not admissible"), ("chi2", None, "not admissible"), ("hellinger", None, "unknown"),
    ("alpha", None, r"alpha in \(0, 1\)"), ("alpha", 1.5, r"alpha in \(0, 1\)"), ("js", 0.5, "only used"),
])
def test_inadmissible_divergences_are_refused(name, alpha, message):
    with pytest.raises(ValueError, match=message):
        check_divergence(name, alpha)
    assert set(DIVERGENCES) == {"reverse_kl", "forward_kl", "js", "alpha"}
