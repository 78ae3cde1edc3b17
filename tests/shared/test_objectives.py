"""Golden values of every objective against its closed form in SPEC §1–§5, the identities between them,
where gradients may and may not flow, and the errors bad input must raise."""

import math

import pytest
import torch

import mmalign
from mmalign.shared.mmd import binned_mmd_penalty

B = 0.5  # β used by the golden cases


def softplus(x: float) -> float:
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def neg_log_sigmoid(x: float) -> float:
    return softplus(-x)


def pair(rho_w, rho_l, ref_w=None, ref_l=None):
    """Inputs whose log-ratios are exactly rho_w, rho_l (reference log-likelihoods vary to catch sign slips)."""
    rho_w = torch.tensor(rho_w, dtype=torch.float64)
    rho_l = torch.tensor(rho_l, dtype=torch.float64)
    ref_w = torch.linspace(-3.0, -1.0, rho_w.numel(), dtype=torch.float64) if ref_w is None else ref_w
    ref_l = torch.linspace(-2.0, -4.0, rho_l.numel(), dtype=torch.float64) if ref_l is None else ref_l
    return dict(policy_chosen=ref_w + rho_w, policy_rejected=ref_l + rho_l, ref_chosen=ref_w, ref_rejected=ref_l)


RHO_W = [0.3, -1.2, 2.0, 0.0]
RHO_L = [-0.4, 0.5, 1.5, 0.0]


def margins():
    return [w - l for w, l in zip(RHO_W, RHO_L)]


CLOSED_FORMS = {
    "dpo": ({}, lambda z, w, l: neg_log_sigmoid(B * z)),
    "ipo": ({}, lambda z, w, l: (z - 1 / (2 * B)) ** 2),
    "rdpo": ({"eps": 0.2}, lambda z, w, l: (0.8 * neg_log_sigmoid(B * z) - 0.2 * neg_log_sigmoid(-B * z)) / 0.6),
    "cdpo": ({"eps": 0.2}, lambda z, w, l: 0.8 * neg_log_sigmoid(B * z) + 0.2 * neg_log_sigmoid(-B * z)),
    "hinge": ({}, lambda z, w, l: max(0.0, 1 - B * z)),
    "fdpo_forward_kl": (
        {"divergence": "forward_kl"},
        lambda z, w, l: neg_log_sigmoid(B * (-1 / math.exp(w) + 1 / math.exp(l))),
    ),
    "fdpo_js": (
        {"divergence": "js"},
        lambda z, w, l: neg_log_sigmoid(
            B * (math.log(2 * math.exp(w) / (1 + math.exp(w))) - math.log(2 * math.exp(l) / (1 + math.exp(l))))
        ),
    ),
    "fdpo_alpha": (
        {"divergence": "alpha", "alpha": 0.3},
        lambda z, w, l: neg_log_sigmoid(B * ((1 - math.exp(w) ** -0.3) / 0.3 - (1 - math.exp(l) ** -0.3) / 0.3)),
    ),
}


@pytest.mark.parametrize("case", sorted(CLOSED_FORMS))
def test_pairwise_objectives_match_their_closed_forms(case):
    hparams, closed_form = CLOSED_FORMS[case]
    name = case.split("_")[0]
    out = mmalign.objective(name, beta=B, **hparams)(**pair(RHO_W, RHO_L))
    expected = [closed_form(z, w, l) for z, w, l in zip(margins(), RHO_W, RHO_L)]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert out.loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-9)


def test_hand_computed_literal_values():
    # β = 1, z = 0: −log σ(0) = log 2 for DPO, cDPO and rDPO alike; IPO: (0 − 1/2)² = 1/4; hinge: 1.
    zero = pair([0.0], [0.0])
    assert mmalign.objective("dpo", beta=1.0)(**zero).loss.item() == pytest.approx(math.log(2))
    assert mmalign.objective("cdpo", beta=1.0, eps=0.25)(**zero).loss.item() == pytest.approx(math.log(2))
    assert mmalign.objective("rdpo", beta=1.0, eps=0.25)(**zero).loss.item() == pytest.approx(math.log(2))
    assert mmalign.objective("ipo", beta=1.0)(**zero).loss.item() == pytest.approx(0.25)
    assert mmalign.objective("hinge", beta=1.0)(**zero).loss.item() == pytest.approx(1.0)
    # IPO with β = 0.5 reaches 0 exactly at z = 1/(2β) = 1 (the cnrpo appendix's 1/(2β²) would put it at 2).
    assert mmalign.objective("ipo", beta=0.5)(**pair([1.0], [0.0])).loss.item() == pytest.approx(0.0, abs=1e-12)
    # rDPO can go negative: β z = 10, ε = 0.25: (0.75·softplus(−10) − 0.25·softplus(10)) / 0.5.
    value = (0.75 * math.log1p(math.exp(-10)) - 0.25 * (10 + math.log1p(math.exp(-10)))) / 0.5
    assert mmalign.objective("rdpo", beta=1.0, eps=0.25)(**pair([10.0], [0.0])).loss.item() == pytest.approx(value)
    # Forward KL, ρ_w = log 2, ρ_l = 0, β = 1: logit = e^0 − e^{−log 2} = 1/2, loss = softplus(−1/2).
    out = mmalign.objective("fdpo", beta=1.0, divergence="forward_kl")(**pair([math.log(2)], [0.0]))
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.5)))


def test_identities_between_objectives():
    inputs = pair(RHO_W, RHO_L)
    dpo = mmalign.objective("dpo", beta=B)(**inputs).losses
    ipo = mmalign.objective("ipo", beta=B)(**inputs).losses
    torch.testing.assert_close(mmalign.objective("fdpo", beta=B, divergence="reverse_kl")(**inputs).losses, dpo)
    torch.testing.assert_close(mmalign.objective("mdpo", beta=B)(**inputs).losses, dpo)
    torch.testing.assert_close(mmalign.objective("mipo", beta=B)(**inputs).losses, ipo)
    torch.testing.assert_close(mmalign.objective("rdpo", beta=B, eps=0.0)(**inputs).losses, dpo)
    torch.testing.assert_close(mmalign.objective("cdpo", beta=B, eps=0.0)(**inputs).losses, dpo)
    triggered = torch.randn(4, 2, dtype=torch.float64)
    cnrpo = mmalign.objective("cnrpo", beta=B, gamma=B, alphas=[0.0, 0.0])(
        **inputs, triggered_chosen=triggered, triggered_rejected=triggered.flip(0)
    )
    torch.testing.assert_close(cnrpo.losses, dpo)
    bins = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(mmalign.objective("causal_dpo", beta=B, lam=0.0)(**inputs, bins=bins).losses, dpo)
    # Explicit [B, 1] groups are the same as [B] pairs.
    as_groups = {key: value.unsqueeze(-1) for key, value in inputs.items()}
    torch.testing.assert_close(mmalign.objective("dpo", beta=B)(**as_groups).losses, dpo)


def test_alpha_divergence_interpolates_between_reverse_and_forward_kl():
    inputs = pair(RHO_W, RHO_L)
    reverse = mmalign.objective("fdpo", beta=B)(**inputs).losses
    forward = mmalign.objective("fdpo", beta=B, divergence="forward_kl")(**inputs).losses
    near_zero = mmalign.objective("fdpo", beta=B, divergence="alpha", alpha=1e-6)(**inputs).losses
    near_one = mmalign.objective("fdpo", beta=B, divergence="alpha", alpha=1 - 1e-6)(**inputs).losses
    torch.testing.assert_close(near_zero, reverse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(near_one, forward, atol=1e-5, rtol=1e-5)


def test_group_objectives_use_the_mean_log_ratio_and_respect_ragged_masks():
    # Row 0: 3 chosen, 2 rejected valid; row 1: 1 chosen, 2 rejected. Padding holds NaN to prove it is ignored.
    rho_w = torch.tensor([[0.5, 1.0, 2.1], [0.4, float("nan"), float("nan")]], dtype=torch.float64)
    rho_l = torch.tensor([[-0.3, 0.1], [0.2, 0.6]], dtype=torch.float64)
    chosen_mask = torch.tensor([[True, True, True], [True, False, False]])
    rejected_mask = torch.tensor([[True, True], [True, True]])
    inputs = dict(
        policy_chosen=rho_w - 1.0, ref_chosen=torch.full_like(rho_w, -1.0),
        policy_rejected=rho_l + 2.0, ref_rejected=torch.full_like(rho_l, 2.0),
        chosen_mask=chosen_mask, rejected_mask=rejected_mask,
    )
    r_w = [(0.5 + 1.0 + 2.1) / 3, 0.4]
    r_l = [(-0.3 + 0.1) / 2, (0.2 + 0.6) / 2]
    mdpo = mmalign.objective("mdpo", beta=B)(**inputs)
    torch.testing.assert_close(mdpo.losses, torch.tensor([neg_log_sigmoid(B * (w - l)) for w, l in zip(r_w, r_l)],
                                                          dtype=torch.float64))
    # mIPO: subtract s²/k per group, s² with the n − 1 denominator; a group of one contributes 0.
    var_w0 = sum((x - r_w[0]) ** 2 for x in (0.5, 1.0, 2.1)) / 2
    var_l0 = sum((x - r_l[0]) ** 2 for x in (-0.3, 0.1)) / 1
    var_l1 = sum((x - r_l[1]) ** 2 for x in (0.2, 0.6)) / 1
    expected = [
        (r_w[0] - r_l[0] - 1 / (2 * B)) ** 2 - (var_w0 / 3 + var_l0 / 2),
        (r_w[1] - r_l[1] - 1 / (2 * B)) ** 2 - (0.0 + var_l1 / 2),
    ]
    mipo = mmalign.objective("mipo", beta=B)(**inputs)
    torch.testing.assert_close(mipo.losses, torch.tensor(expected, dtype=torch.float64))
    assert mipo.metrics["rewards/margins"] == pytest.approx(B * sum(w - l for w, l in zip(r_w, r_l)) / 2)
    assert torch.isfinite(mipo.loss)


def test_mipo_estimator_is_unbiased_and_the_naive_square_is_not():
    generator = torch.Generator().manual_seed(0)
    n, k_w, k_l, beta = 200_000, 3, 2, 0.5
    mu_w, mu_l, sd_w, sd_l = 1.4, 0.2, 1.5, 0.8
    rho_w = mu_w + sd_w * torch.randn(n, k_w, generator=generator, dtype=torch.float64)
    rho_l = mu_l + sd_l * torch.randn(n, k_l, generator=generator, dtype=torch.float64)
    inputs = dict(policy_chosen=rho_w, policy_rejected=rho_l, ref_chosen=torch.zeros_like(rho_w),
                  ref_rejected=torch.zeros_like(rho_l))
    population = (mu_w - mu_l - 1 / (2 * beta)) ** 2  # 0.04
    losses = mmalign.objective("mipo", beta=beta)(**inputs).losses
    standard_error = (losses.std() / n**0.5).item()
    assert abs(losses.mean().item() - population) < 4 * standard_error
    assert abs(losses.mean().item() - population) < 0.02  # the stated tolerance (SE ≈ 0.004 here)
    naive = (rho_w.mean(1) - rho_l.mean(1) - 1 / (2 * beta)) ** 2
    bias = sd_w**2 / k_w + sd_l**2 / k_l  # 1.07: what the square of a sample mean adds
    assert naive.mean().item() - population == pytest.approx(bias, abs=0.03)
    assert naive.mean().item() - population > 50 * standard_error


def test_dpo_gradient_matches_the_analytic_form():
    inputs = pair(RHO_W, RHO_L)
    policy_chosen = inputs["policy_chosen"].clone().requires_grad_()
    policy_rejected = inputs["policy_rejected"].clone().requires_grad_()
    out = mmalign.objective("dpo", beta=B)(**{**inputs, "policy_chosen": policy_chosen,
                                              "policy_rejected": policy_rejected})
    out.loss.backward()
    # d/dρ_w of −log σ(βz), averaged over 4 examples: −β σ(−βz) / 4.
    expected = torch.tensor([-B / (1 + math.exp(B * z)) / 4 for z in margins()], dtype=torch.float64)
    torch.testing.assert_close(policy_chosen.grad, expected)
    torch.testing.assert_close(policy_rejected.grad, -expected)


def test_no_gradient_reaches_cnrpo_triggered_inputs_or_the_reference():
    inputs = {key: value.clone().requires_grad_() for key, value in pair(RHO_W, RHO_L).items()}
    triggered_chosen = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    triggered_rejected = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    out = mmalign.objective("cnrpo", beta=B, gamma=0.2, alphas=[0.1, 0.3])(
        **inputs, triggered_chosen=triggered_chosen, triggered_rejected=triggered_rejected
    )
    out.loss.backward()
    assert triggered_chosen.grad is None and triggered_rejected.grad is None
    assert inputs["ref_chosen"].grad is None and inputs["ref_rejected"].grad is None
    assert inputs["policy_chosen"].grad is not None and inputs["policy_chosen"].grad.abs().sum() > 0


def test_cnrpo_closed_form_with_two_triggers():
    inputs = pair(RHO_W, RHO_L)
    tc = torch.tensor([[0.1, -0.2], [1.0, 0.0], [0.3, 0.3], [-2.0, 1.0]], dtype=torch.float64)
    tr = torch.tensor([[0.4, 0.1], [-1.0, 0.5], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    gamma, alphas = 0.2, [0.1, 0.45]
    out = mmalign.objective("cnrpo", beta=B, gamma=gamma, alphas=alphas)(
        **inputs, triggered_chosen=tc, triggered_rejected=tr
    )
    expected = []
    for i in range(4):
        h_theta = (inputs["policy_chosen"][i] - inputs["policy_rejected"][i]).item()
        h_ref = (inputs["ref_chosen"][i] - inputs["ref_rejected"][i]).item()
        bias = sum(a * (tc[i, j] - tr[i, j]).item() for j, a in enumerate(alphas))
        expected.append(neg_log_sigmoid(gamma * h_theta - B * h_ref + bias))
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))


def test_causal_dpo_adds_the_binned_mmd_penalty_of_the_log_ratios():
    inputs = pair(RHO_W, RHO_L)
    bins = torch.tensor([[0, 1], [0, 1], [1, 0], [1, 1]])
    dpo = mmalign.objective("dpo", beta=B)(**inputs).losses
    rho = torch.tensor([RHO_W, RHO_L], dtype=torch.float64).T  # [B, 2]
    for conditional in (False, True):
        out = mmalign.objective("causal_dpo", beta=B, lam=3.0, conditional=conditional)(**inputs, bins=bins)
        groups = torch.tensor([1, 0]).repeat(4) if conditional else None
        penalty, _ = binned_mmd_penalty(rho.reshape(-1), bins.reshape(-1), groups=groups)
        torch.testing.assert_close(out.losses, dpo + 3.0 * penalty)
        assert out.loss.item() == pytest.approx(out.losses.mean().item())
        assert out.metrics["mmd/penalty"] == pytest.approx(penalty.item())


def test_nll_term_is_added_per_token():
    inputs = pair(RHO_W, RHO_L)
    lengths = torch.tensor([3, 5, 2, 4])
    plain = mmalign.objective("dpo", beta=B)(**inputs).losses
    with_nll = mmalign.objective("dpo", beta=B, nll=0.7)(**inputs, chosen_lengths=lengths)
    torch.testing.assert_close(with_nll.losses, plain + 0.7 * (-inputs["policy_chosen"] / lengths))
    with pytest.raises(ValueError, match="chosen_lengths"):
        mmalign.objective("dpo", beta=B, nll=0.7)(**inputs)


def test_sft_is_the_chosen_groups_nll_alone():
    # ragged groups: row 0 has 2 chosen of 3 (the padding holds NaN, which must not leak), row 1 has 3
    policy_chosen = torch.tensor([[-2.0, -4.0, float("nan")], [-1.0, -3.0, -8.0]], dtype=torch.float64,
                                 requires_grad=True)
    policy_rejected = torch.tensor([[-5.0], [-6.0]], dtype=torch.float64, requires_grad=True)
    inputs = dict(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                  ref_chosen=torch.full((2, 3), -1.0, dtype=torch.float64), ref_rejected=torch.zeros(2, 1),
                  chosen_mask=torch.tensor([[True, True, False], [True, True, True]]))
    sft = mmalign.objective("sft")
    out = sft(**inputs)
    torch.testing.assert_close(out.losses, torch.tensor([3.0, 4.0], dtype=torch.float64))
    out.loss.backward()
    # d loss / d logp: -1/(B k_w) on valid chosen members; nothing reaches the rejected outputs or the padding
    torch.testing.assert_close(policy_chosen.grad, torch.tensor([[-0.25, -0.25, 0.0], [-1 / 6, -1 / 6, -1 / 6]],
                                                                dtype=torch.float64))
    assert policy_rejected.grad is None or not policy_rejected.grad.any()
    # the reference does not enter: shifting it leaves the loss unchanged
    shifted = sft(**{**inputs, "ref_chosen": inputs["ref_chosen"] - 7.0}).losses
    torch.testing.assert_close(shifted, out.losses)
    # per token with chosen_lengths, like the NLL term of SPEC §1
    lengths = torch.tensor([[2, 4, 1], [1, 3, 8]])
    per_token = sft(**inputs, chosen_lengths=lengths).losses
    torch.testing.assert_close(per_token, torch.tensor([(1.0 + 1.0) / 2, (1.0 + 1.0 + 1.0) / 3],
                                                       dtype=torch.float64))
    # β only scales the logged implicit rewards
    assert mmalign.objective("sft", beta=3.0)(**inputs).loss.item() == pytest.approx(out.loss.item())


def test_metrics_use_the_ecosystem_names():
    out = mmalign.objective("dpo", beta=B)(**pair(RHO_W, RHO_L))
    assert out.metrics["rewards/chosen"] == pytest.approx(B * sum(RHO_W) / 4)
    assert out.metrics["rewards/rejected"] == pytest.approx(B * sum(RHO_L) / 4)
    assert out.metrics["rewards/margins"] == pytest.approx(B * sum(margins()) / 4)
    assert out.metrics["rewards/accuracies"] == pytest.approx(2 / 4)  # z > 0 for rows 0 and 2 only
    assert set(out.metrics) >= {"logps/chosen", "logps/rejected"}
    assert all(t.dim() == 0 and not t.requires_grad for t in out.metric_tensors.values())


@pytest.mark.parametrize("name,hparams,extra", [
    ("dpo", {}, {}), ("ipo", {}, {}), ("rdpo", {"eps": 0.3}, {}), ("cdpo", {}, {}), ("hinge", {}, {}),
    ("fdpo", {"divergence": "forward_kl"}, {}), ("fdpo", {"divergence": "js"}, {}),
    ("fdpo", {"divergence": "alpha", "alpha": 0.5}, {}), ("mdpo", {}, {}), ("mipo", {}, {}),
    ("cnrpo", {"gamma": 0.2, "alphas": [0.3]}, {"triggered_chosen": torch.tensor([[200.0], [-200.0]]),
                                                 "triggered_rejected": torch.tensor([[-200.0], [200.0]])}),
    ("causal_dpo", {"lam": 1.0}, {"bins": torch.tensor([0, 1])}), ("sft", {}, {}),
])
def test_extreme_log_ratios_give_finite_losses_and_gradients(name, hparams, extra):
    policy_chosen = torch.tensor([200.0, -200.0], requires_grad=True)
    policy_rejected = torch.tensor([-200.0, 200.0], requires_grad=True)
    out = mmalign.objective(name, beta=0.1, **hparams)(
        policy_chosen=policy_chosen, policy_rejected=policy_rejected,
        ref_chosen=torch.zeros(2), ref_rejected=torch.zeros(2), **extra,
    )
    out.loss.backward()
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(policy_chosen.grad).all()
    assert torch.isfinite(policy_rejected.grad).all() if name != "sft" else policy_rejected.grad is None


@pytest.mark.parametrize("name,hparams,message", [
    ("dpo", {"beta": 0.0}, "beta must be > 0"),
    ("ipo", {"beta": -1.0}, "beta must be > 0"),
    ("dpo", {"beta": float("nan")}, "finite"),
    ("rdpo", {"beta": 0.1, "eps": 0.5}, r"\[0, 0.5\)"),
    ("cdpo", {"beta": 0.1, "eps": -0.1}, r"\[0, 0.5\)"),
    ("fdpo", {"beta": 0.1, "divergence": "alpha", "alpha": 1.0}, r"\(0, 1\)"),
    ("fdpo", {"beta": 0.1, "divergence": "alpha"}, "needs alpha"),
    ("fdpo", {"beta": 0.1, "divergence": "total_variation"}, "not admissible"),
    ("fdpo", {"beta": 0.1, "divergence": "chi2"}, "not admissible"),
    ("fdpo", {"beta": 0.1, "divergence": "hellinger"}, "allowed"),
    ("fdpo", {"beta": 0.1, "alpha": 0.5}, "only used with divergence='alpha'"),
    ("dpo", {"beta": 0.1, "gamma": 0.1}, r"unknown hyperparameter.*allowed"),
    ("dpo", {}, "missing hyperparameter"),
    ("cnrpo", {"beta": 0.1, "alphas": 0.3}, "one weight per trigger"),
    ("cnrpo", {"beta": 0.1, "alphas": [-0.1]}, ">= 0"),
    ("causal_dpo", {"beta": 0.1, "lam": -1}, ">= 0"),
    ("dpo", {"beta": 0.1, "nll": -1}, ">= 0"),
    ("orpo", {"beta": 0.1}, "unknown objective.*available"),
])
def test_bad_hyperparameters_are_refused_with_what_is_allowed(name, hparams, message):
    with pytest.raises(ValueError, match=message):
        mmalign.objective(name, **hparams)


def test_bad_inputs_are_refused():
    dpo = mmalign.objective("dpo", beta=0.1)
    good = pair(RHO_W, RHO_L)
    with pytest.raises(ValueError, match="ref_chosen has shape"):
        dpo(**{**good, "ref_chosen": torch.zeros(3)})
    with pytest.raises(ValueError, match="rows"):
        dpo(**{**good, "policy_rejected": torch.zeros(3), "ref_rejected": torch.zeros(3)})
    with pytest.raises(ValueError, match="NaN or inf"):
        dpo(**{**good, "policy_chosen": torch.tensor([0.0, float("nan"), 0.0, 0.0])})
    with pytest.raises(ValueError, match="NaN or inf"):
        dpo(**{**good, "ref_rejected": torch.tensor([0.0, float("inf"), 0.0, 0.0])})
    with pytest.raises(ValueError, match="pairwise.*mdpo"):
        dpo(policy_chosen=torch.zeros(2, 3), ref_chosen=torch.zeros(2, 3),
            policy_rejected=torch.zeros(2, 3), ref_rejected=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="floating-point"):
        dpo(**{**good, "policy_chosen": torch.zeros(4, dtype=torch.long)})
    with pytest.raises(ValueError, match="unknown input"):
        dpo(**good, bins=torch.zeros(4))
    mdpo = mmalign.objective("mdpo", beta=0.1)
    groups = dict(policy_chosen=torch.zeros(2, 3), ref_chosen=torch.zeros(2, 3),
                  policy_rejected=torch.zeros(2, 2), ref_rejected=torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"every member of the group in row\(s\) \[1\]"):
        mdpo(**groups, chosen_mask=torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="boolean"):
        mdpo(**groups, chosen_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="shape"):
        mdpo(**groups, rejected_mask=torch.ones(2, 3, dtype=torch.bool))
    cnrpo = mmalign.objective("cnrpo", beta=0.1, alphas=[0.1, 0.2])
    with pytest.raises(ValueError, match="missing required input"):
        cnrpo(**good)
    with pytest.raises(ValueError, match=r"\[B, n_triggers\].*2 alphas"):
        cnrpo(**good, triggered_chosen=torch.zeros(4, 1), triggered_rejected=torch.zeros(4, 1))
    causal = mmalign.objective("causal_dpo", beta=0.1)
    with pytest.raises(ValueError, match="integer bin ids"):
        causal(**good, bins=torch.zeros(4))
    with pytest.raises(ValueError, match=r"shape \[B\] or \[B, 2\]"):
        causal(**good, bins=torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="per-response features"):
        mmalign.objective("causal_dpo", beta=0.1, conditional=True)(
            **good, bins=torch.zeros(4, dtype=torch.long), features=torch.zeros(4, 8))


def test_every_registered_objective_is_exercised_here():
    assert set(mmalign.available_objectives()) == {
        "dpo", "ipo", "rdpo", "cdpo", "hinge", "fdpo", "mdpo", "mipo", "cnrpo", "causal_dpo", "sft"
    }
    assert mmalign.objective("mdpo", beta=0.1).accepts_groups and not mmalign.objective("dpo", beta=0.1).accepts_groups
    assert mmalign.objective("cnrpo", beta=0.1).extra_inputs == ("triggered_chosen", "triggered_rejected")
    assert mmalign.objective("fdpo", beta=0.2, divergence="js").hparams == {
        "beta": 0.2, "divergence": "js", "alpha": None, "nll": 0.0
    }


def test_causal_dpo_bandwidth_floor_keeps_early_gradients_small():
    # At the start of training every log-ratio is ≈ 0: an unfloored median heuristic picks h ≈ 1e-4 and the
    # penalty's gradient (∝ 1/h) explodes; the default floor of 0.1 keeps it at the scale of the DPO term.
    generator = torch.Generator().manual_seed(0)
    noise = 1e-4 * torch.randn(16, generator=generator)
    bins = (torch.arange(16) % 2) * 1
    grads = {}
    for floor in (0.0, 0.1):
        policy_chosen = noise.clone().requires_grad_()
        out = mmalign.objective("causal_dpo", beta=0.1, lam=1.0, min_bandwidth=floor)(
            policy_chosen=policy_chosen, policy_rejected=noise.flip(0), ref_chosen=torch.zeros(16),
            ref_rejected=torch.zeros(16), bins=bins,
        )
        out.loss.backward()
        grads[floor] = policy_chosen.grad.abs().max().item()
    assert grads[0.0] > 100 * grads[0.1]
    assert grads[0.1] < 1.0
