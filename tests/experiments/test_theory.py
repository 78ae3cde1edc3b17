"""Numerical checks of the seeds' theory (mmalign.sim.theory); each check is also shown to reject a wrong claim."""

import json

import numpy as np
import pytest
import torch

from mmalign_experiments.sim import theory


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def variance():
    return theory.group_estimator_variance(ks=(8, 16, 32, 64, 128), trials=6000, seed=1)


def test_proposition_1_unbiased_for_iid_members(variance):
    for row in variance["rows"]:
        assert abs(row["unbiased_mean"] - variance["truth"]) < 4 * row["unbiased_se"]
        # the plug-in estimator is biased upwards by σ_w²/k + σ_l²/k (= 8/k here)
        assert row["plug_in_mean"] - variance["truth"] > 4 * row["unbiased_se"] or row["k"] >= 64


def test_proposition_2_variance_slope_is_minus_one(variance):
    ks = [r["k"] for r in variance["rows"]]
    var = [r["unbiased_var"] for r in variance["rows"]]
    slope = theory.assert_slope(ks, var, expected=-1.0, tol=0.1)
    assert -1.1 < slope < -0.9
    # the check rejects wrong rates: 1/k² (slope −2) and a k-independent variance
    with pytest.raises(AssertionError):
        theory.assert_slope(ks, [v / k for v, k in zip(var, ks)])
    with pytest.raises(AssertionError):
        theory.assert_slope(ks, [var[0]] * len(ks))


def test_without_replacement_breaks_the_iid_premise():
    pool = np.arange(10.0)
    iid = theory.finite_pool_bias(pool, pool + 2, k=10, c=-1.0, replace=True, trials=8000)
    assert abs(iid["bias"]) < 4 * iid["se"]
    fixed = theory.finite_pool_bias(pool, pool + 2, k=10, c=-1.0, replace=False, trials=200)
    # k = N without replacement: the mean is exact, so the bias is the whole −(s_w² + s_l²)/N
    assert fixed["bias"] == pytest.approx(-2 * np.var(pool, ddof=1) / 10)
    partial = theory.finite_pool_bias(pool, pool + 2, k=5, c=-1.0, replace=False, trials=8000)
    assert partial["bias"] < -4 * partial["se"]


@pytest.mark.parametrize("divergence", list(theory.DIVERGENCES))
def test_fdpo_theorem_1_closed_form_equals_optimisers(divergence):
    result = theory.fdpo_optimum(divergence, n_arms=20, beta=0.5, seed=0)
    assert result["tv_regularised"] < 1e-6
    assert result["tv_fdpo"] < 1e-6
    assert result["reward_offset_spread"] < 1e-9  # r − β f'(π*/π_ref) is one constant over arms
    assert abs(result["closed_form"].sum() - 1) < 1e-12


def test_fdpo_check_rejects_a_wrong_closed_form():
    """Reverse KL's Gibbs policy is not the optimum under the other divergences: the comparison notices."""
    right = theory.fdpo_optimum("js", seed=0)
    gen = torch.Generator().manual_seed(0)
    reward = torch.randn(20, generator=gen, dtype=torch.float64)
    log_ref = torch.log_softmax(0.5 * torch.randn(20, generator=gen, dtype=torch.float64), -1)
    gibbs = theory.fdpo_closed_form(reward.numpy(), log_ref.numpy(), 0.5, "reverse_kl")
    assert 0.5 * np.abs(gibbs - right["by_regularised_objective"]).sum() > 1e-2


def test_ece_bound_holds_and_a_smaller_constant_fails():
    ok = theory.ece_bound(pairs=400, seed=2)
    assert ok["worst_ratio_tv"] <= 1 and ok["worst_ratio_kl"] <= 1
    too_tight = theory.ece_bound(pairs=400, seed=2, tv_constant=0.2)
    assert too_tight["worst_ratio_tv"] > 1


def test_stochastic_ece_is_zero_only_when_calibrated():
    truth = np.array([[0.2, 0.8], [0.5, 0.5]])
    assert theory.stochastic_ece(truth, truth) == 0
    assert theory.stochastic_ece([[0.9, 0.1], [0.5, 0.5]], truth) == pytest.approx(0.5 * (0.9 * 0.7 + 0.1 * 0.7))


@pytest.mark.parametrize("differing", [0, 2])
def test_cnrpo_theorem_2_gradient_steepest_in_the_differing_dimension(differing):
    result = theory.kl_gradient_by_dimension(dims=3, values=4, differing=differing, seed=3)
    assert result["steepest"] == differing and result["most_moved"] == differing
    others = [g for d, g in enumerate(result["grad_norms"]) if d != differing]
    assert result["grad_norms"][differing] > 5 * max(others)


def test_cnrpo_theorem_2_not_when_q_differs_everywhere():
    """When Q differs in every dimension alike, no single dimension dominates (the premise matters)."""
    result = theory.kl_gradient_by_dimension(dims=3, values=4, differing=0, big=1.0, small=1.0, seed=3)
    norms = sorted(result["grad_norms"])
    assert norms[-1] < 5 * norms[0]


def test_cli_writes_figure_and_summary(tmp_path):
    assert theory.main(["--out", str(tmp_path), "--trials", "500"]) == 0
    png = (tmp_path / "figure_3_2.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "theory.json").read_text())
    assert set(summary) == {"proposition_2", "finite_pool", "fdpo_theorem_1", "ece_bound", "cnrpo_theorem_2"}
