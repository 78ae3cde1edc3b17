"""The seeds' theory, checked numerically on small categorical problems.

Each function computes what a statement predicts and what happens, and returns both; ``assert_*`` helpers
turn a statement into a pass/fail check with a stated tolerance (the tests also feed them wrong inputs to
show that they can fail).

* :func:`group_estimator_variance` — thesis §3.5.2, Proposition 1 (the mIPO estimator is unbiased for i.i.d.
  group members) and Proposition 2 (its variance is O(1/k)): empirical variance over k, log-log slope ≈ −1,
  and the biased plug-in estimator next to it (the data of the thesis' Figure 3.2, ``f(x) = x²``).
* :func:`finite_pool_bias` — the same estimator when members are drawn *without* replacement from a finite
  pool (what the RNG builder did before issue #17): biased, because the i.i.d. premise fails.
* :func:`fdpo_optimum` — thesis ch. 2 Theorem 1: the closed form ``π* = π_ref (f')⁻¹((r − λ)/β)`` against
  an optimiser (L-BFGS) on the regularised objective ``E_π r − β D_f(π ‖ π_ref)`` and on the f-DPO loss
  (Eq. 2.2, :func:`mmalign.objective` ``"fdpo"``) fed exact Bradley–Terry preferences from ``r``.
* :func:`ece_bound` — thesis §2.8.8 Theorem 2: ``ECE(θ₁) − ECE(θ₂) ≤ 4 E_x TV ≤ 2 E_x ψ(D_f)`` with the
  stochastic-prediction ECE ``E_x Σ_y π_θ(y|x) |π(y|x) − π_θ(y|x)|`` (Remark 3), ψ from Pinsker for KL.
* :func:`kl_gradient_by_dimension` — cnrpo Theorem 2 (App. G): for factorised P, Q that differ mainly in one
  dimension, the gradient of ``KL(P ‖ Q)`` w.r.t. P's parameters is steepest in that dimension.

``python -m mmalign_experiments.sim theory --out runs/theory`` runs every check and writes the Figure 3.2 PNG and a JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import mmalign

__all__ = [
    "group_estimator_variance", "loglog_slope", "assert_slope", "finite_pool_bias", "DIVERGENCES",
    "fdpo_closed_form", "fdpo_optimum", "stochastic_ece", "ece_bound", "kl_gradient_by_dimension",
    "plot_figure_3_2", "main",
]


# -- Propositions 1 and 2 (thesis §3.5.2) ---------------------------------------------------------------------------
def _mipo_estimates(fw: np.ndarray, fl: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased (Proposition 1) and plug-in estimates of ``(E f_w − E f_l − c)²`` per row of ``[T, k]`` draws."""
    plug_in = (fw.mean(1) - fl.mean(1) - c) ** 2
    k_w, k_l = fw.shape[1], fl.shape[1]
    var_w = fw.var(1, ddof=1) / k_w if k_w > 1 else 0.0
    var_l = fl.var(1, ddof=1) / k_l if k_l > 1 else 0.0
    return plug_in - var_w - var_l, plug_in


SLOPE_MIN_K = 8  # below this the O(1/k²) term of Proposition 2 still bends the log-log line


def group_estimator_variance(ks=(2, 4, 8, 16, 32, 64, 128, 256), trials: int = 20000, mu_w: float = 1.0,
                             mu_l: float = 0.0, c: float = -1.0, seed: int = 0) -> dict:
    """Monte Carlo of the mIPO estimator with ``f(x) = x²``, ``x ~ N(μ, 1)`` i.i.d. in each group of size k.

    ``E f = μ² + 1`` and ``Var f = 4μ² + 2`` for a unit normal, so the population loss is exact. Returns, per
    k: the estimators' means, variances and mean squared errors, and the true loss.
    """
    rng = np.random.default_rng(seed)
    truth = ((mu_w**2 + 1) - (mu_l**2 + 1) - c) ** 2
    rows = []
    for k in ks:
        fw = rng.normal(mu_w, 1.0, size=(trials, k)) ** 2
        fl = rng.normal(mu_l, 1.0, size=(trials, k)) ** 2
        unbiased, plug_in = _mipo_estimates(fw, fl, c)
        rows.append({
            "k": int(k),
            "unbiased_mean": float(unbiased.mean()), "unbiased_var": float(unbiased.var(ddof=1)),
            "unbiased_mse": float(((unbiased - truth) ** 2).mean()),
            "unbiased_se": float(unbiased.std(ddof=1) / math.sqrt(trials)),
            "plug_in_mean": float(plug_in.mean()), "plug_in_mse": float(((plug_in - truth) ** 2).mean()),
        })
    return {"truth": truth, "trials": trials, "rows": rows}


def loglog_slope(ks, values) -> float:
    """Least-squares slope of ``log(values)`` against ``log(ks)``."""
    return float(np.polyfit(np.log(np.asarray(ks, float)), np.log(np.asarray(values, float)), 1)[0])


def assert_slope(ks, values, expected: float = -1.0, tol: float = 0.1) -> float:
    """Raises AssertionError unless the log-log slope is within ``tol`` of ``expected``; returns the slope."""
    slope = loglog_slope(ks, values)
    if abs(slope - expected) > tol:
        raise AssertionError(f"log-log slope {slope:.3f} is not within {tol} of {expected}")
    return slope


def finite_pool_bias(pool_w, pool_l, k: int, c: float, replace: bool, trials: int = 20000, seed: int = 0) -> dict:
    """The mIPO estimator over groups of ``k`` drawn from fixed pools, with or without replacement.

    The target is the pool-level loss ``(mean(pool_w) − mean(pool_l) − c)²``. With replacement the members are
    i.i.d. draws from the pool's empirical distribution and Proposition 1 applies; without it the group mean's
    variance is smaller by the finite-population factor ``(N − k)/(N − 1)`` while ``s²/k`` still subtracts the
    i.i.d. amount, so the estimate is biased low (at ``k = N`` by the whole ``s_w²/N + s_l²/N``).
    """
    pool_w, pool_l = np.asarray(pool_w, float), np.asarray(pool_l, float)
    rng = np.random.default_rng(seed)

    def draw(pool):
        if replace:
            return pool[rng.integers(0, len(pool), size=(trials, k))]
        return np.stack([rng.choice(pool, size=k, replace=False) for _ in range(trials)])

    unbiased, _ = _mipo_estimates(draw(pool_w), draw(pool_l), c)
    truth = (pool_w.mean() - pool_l.mean() - c) ** 2
    return {"truth": float(truth), "mean": float(unbiased.mean()),
            "se": float(unbiased.std(ddof=1) / math.sqrt(trials)), "bias": float(unbiased.mean() - truth)}


# -- f-DPO Theorem 1 (thesis ch. 2, Table 2.1) -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Divergence:
    f: callable  # generator f(u), u = π/π_ref (torch)
    f_prime_inverse: callable  # (f')⁻¹(v) (numpy)
    sup_dom: float  # (f')⁻¹ is defined for v < sup_dom
    fdpo: dict  # mmalign.objective("fdpo", ...) arguments


def _alpha_divergence(a: float) -> _Divergence:
    return _Divergence(
        f=lambda u: (u ** (1 - a) - (1 - a) * u - a) / (a * (a - 1)),
        f_prime_inverse=lambda v: (1 - a * v) ** (-1 / a), sup_dom=1 / a,
        fdpo={"divergence": "alpha", "alpha": a},
    )


DIVERGENCES: dict[str, _Divergence] = {
    "reverse_kl": _Divergence(lambda u: u * torch.log(u), lambda v: np.exp(v - 1), math.inf,
                              {"divergence": "reverse_kl"}),
    "forward_kl": _Divergence(lambda u: -torch.log(u), lambda v: -1 / v, 0.0, {"divergence": "forward_kl"}),
    "js": _Divergence(lambda u: u * torch.log(u) - (u + 1) * torch.log((u + 1) / 2),
                      lambda v: np.exp(v) / (2 - np.exp(v)), math.log(2), {"divergence": "js"}),
    "alpha=0.3": _alpha_divergence(0.3),
    "alpha=0.5": _alpha_divergence(0.5),
    "alpha=0.7": _alpha_divergence(0.7),
}


def fdpo_closed_form(reward, log_ref, beta: float, divergence: str) -> np.ndarray:
    """Theorem 1's optimum ``π_ref (f')⁻¹((r − λ)/β)``, λ found by bisection so that it sums to 1."""
    div = DIVERGENCES[divergence]
    reward, ref = np.asarray(reward, float), np.exp(np.asarray(log_ref, float))

    def mass(lam: float) -> float:  # decreasing in λ
        return float((ref * div.f_prime_inverse((reward - lam) / beta)).sum())

    # λ must keep every (r − λ)/β inside dom (f')⁻¹; step away from that edge until the mass drops below 1.
    lo = reward.max() - beta * div.sup_dom if math.isfinite(div.sup_dom) else reward.min() - 50 * beta
    lo = np.nextafter(lo, math.inf) if math.isfinite(div.sup_dom) else lo
    hi, step = max(lo, reward.max()) + beta, beta
    while mass(hi) > 1:
        hi, step = hi + step, 2 * step
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mass(mid) > 1 else (lo, mid)
    policy = ref * div.f_prime_inverse((reward - hi) / beta)
    return policy / policy.sum()


def _lbfgs(loss_fn, n: int, init: torch.Tensor) -> np.ndarray:
    logits = init.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([logits], lr=1, max_iter=5000, tolerance_grad=1e-13, tolerance_change=1e-16,
                                  history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = loss_fn(torch.log_softmax(logits, -1))
        loss.backward()
        return loss

    for _ in range(5):
        optimiser.step(closure)
    return torch.softmax(logits.detach(), -1).numpy()


def fdpo_optimum(divergence: str, n_arms: int = 20, beta: float = 0.5, seed: int = 0) -> dict:
    """Closed form vs two optimisers on an ``n_arms`` bandit with ``r ~ N(0, 1)`` and a random ``π_ref``.

    Returns the three policies and their total-variation distances, plus the spread over arms of
    ``r − β f'(π*/π_ref)`` (Theorem 1: a constant).
    """
    div = DIVERGENCES[divergence]
    gen = torch.Generator().manual_seed(seed)
    reward = torch.randn(n_arms, generator=gen, dtype=torch.float64)
    log_ref = torch.log_softmax(0.5 * torch.randn(n_arms, generator=gen, dtype=torch.float64), -1)
    closed = fdpo_closed_form(reward.numpy(), log_ref.numpy(), beta, divergence)

    def regularised(log_pi):  # −(E_π r − β Σ π_ref f(π/π_ref))
        u = torch.exp(log_pi - log_ref)
        return -((log_pi.exp() * reward).sum() - beta * (log_ref.exp() * div.f(u)).sum())

    chosen, rejected = torch.meshgrid(torch.arange(n_arms), torch.arange(n_arms), indexing="ij")
    off = chosen != rejected
    chosen, rejected = chosen[off], rejected[off]
    weights = torch.sigmoid(reward[chosen] - reward[rejected])  # exact Bradley–Terry preference from r
    loss = mmalign.objective("fdpo", beta=beta, **div.fdpo)

    def fdpo_loss(log_pi):
        out = loss(policy_chosen=log_pi[chosen], policy_rejected=log_pi[rejected],
                   ref_chosen=log_ref[chosen], ref_rejected=log_ref[rejected])
        return (out.losses * weights).sum()

    by_rl = _lbfgs(regularised, n_arms, log_ref)
    by_fdpo = _lbfgs(fdpo_loss, n_arms, log_ref)
    tv = lambda a, b: 0.5 * float(np.abs(a - b).sum())  # noqa: E731
    u = torch.tensor(closed) / log_ref.exp()
    implied = reward - beta * _f_prime(divergence, u)
    return {"divergence": divergence, "closed_form": closed, "by_regularised_objective": by_rl,
            "by_fdpo_loss": by_fdpo, "tv_regularised": tv(closed, by_rl), "tv_fdpo": tv(closed, by_fdpo),
            "reward_offset_spread": float(implied.max() - implied.min())}


def _f_prime(divergence: str, u: torch.Tensor) -> torch.Tensor:
    u = u.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(DIVERGENCES[divergence].f(u).sum(), u)
    return grad


# -- ECE bound (thesis §2.8.8, Theorem 2 of ch. 2) ------------------------------------------------------------------
def stochastic_ece(policy, truth, x_weights=None) -> float:
    """ECE of a stochastic predictor (Remark 3): ``E_x Σ_y π_θ(y|x) |π(y|x) − π_θ(y|x)|``; arrays ``[X, Y]``."""
    policy, truth = np.asarray(policy, float), np.asarray(truth, float)
    per_x = (policy * np.abs(truth - policy)).sum(-1)
    w = np.full(len(per_x), 1 / len(per_x)) if x_weights is None else np.asarray(x_weights, float)
    return float((w * per_x).sum())


def ece_bound(n_contexts: int = 8, n_labels: int = 5, pairs: int = 2000, seed: int = 0,
              tv_constant: float = 4.0) -> dict:
    """Random (truth, π₁, π₂) triples: the worst ratio of ``|ECE₁ − ECE₂|`` to ``c·E_x TV`` and to the KL form.

    The theorem holds if both ratios are ≤ 1. The KL form is ``2 E_x ψ(KL)`` with ``ψ(D) = √(2D)``
    (Pinsker: ``TV ≤ √(D/2)``, so ``4 TV ≤ 2√(2D)``). ``tv_constant`` lets a test show a too-small constant fails.
    Half of the π₂ are small perturbations of π₁ (where the bound is tight-ish), half are independent.
    """
    rng = np.random.default_rng(seed)
    worst_tv = worst_kl = 0.0
    for i in range(pairs):
        concentration = 10 ** rng.uniform(-1, 1)
        truth = rng.dirichlet(np.full(n_labels, concentration), size=n_contexts)
        p1 = rng.dirichlet(np.full(n_labels, concentration), size=n_contexts)
        if i % 2:
            p2 = rng.dirichlet(np.full(n_labels, concentration), size=n_contexts)
        else:
            p2 = p1 * np.exp(rng.normal(0, 0.1, size=p1.shape))
            p2 /= p2.sum(-1, keepdims=True)
        p1, p2 = np.clip(p1, 1e-300, None), np.clip(p2, 1e-300, None)
        gap = abs(stochastic_ece(p1, truth) - stochastic_ece(p2, truth))
        tv = (0.5 * np.abs(p1 - p2).sum(-1)).mean()
        kl = np.maximum((p1 * np.log(p1 / p2)).sum(-1), 0.0)
        worst_tv = max(worst_tv, gap / (tv_constant * tv))
        worst_kl = max(worst_kl, gap / (2 * np.sqrt(2 * kl).mean()))
    return {"worst_ratio_tv": worst_tv, "worst_ratio_kl": worst_kl, "pairs": pairs, "tv_constant": tv_constant}


# -- CNRPO Theorem 2 (cnrpo §5.3, App. G) ---------------------------------------------------------------------------
def kl_gradient_by_dimension(dims: int = 4, values: int = 5, differing: int = 0, big: float = 2.0,
                             small: float = 0.05, seed: int = 0) -> dict:
    """Gradient of ``KL(P ‖ Q)`` w.r.t. each factor's logits of a factorised ``P``, computed on the *joint*.

    ``Q``'s factor ``differing`` is P's logits plus ``N(0, big²)`` noise, the other factors plus ``N(0, small²)``.
    The KL is taken over all ``values**dims`` joint outcomes (not the per-factor sum of Eq. 27), so the
    factorisation argument of the proof is checked too. Also reports how far one normalised ascent step
    moves each marginal (TV).
    """
    gen = torch.Generator().manual_seed(seed)
    p_logits = torch.randn(dims, values, generator=gen, dtype=torch.float64)
    scale = torch.full((dims, 1), small, dtype=torch.float64)
    scale[differing] = big
    q_logits = p_logits + scale * torch.randn(dims, values, generator=gen, dtype=torch.float64)

    def joint(logits):
        out = torch.zeros((), dtype=torch.float64)
        for d in range(dims):
            out = out.unsqueeze(-1) + torch.log_softmax(logits[d], -1)
        return out.reshape(-1)

    p = p_logits.clone().requires_grad_(True)
    log_p, log_q = joint(p), joint(q_logits)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    (grad,) = torch.autograd.grad(kl, p)
    norms = grad.norm(dim=-1)
    stepped = (p_logits + 0.1 * grad / grad.norm()).softmax(-1)
    moved = 0.5 * (stepped - p_logits.softmax(-1)).abs().sum(-1)
    return {"kl": float(kl.detach()), "grad_norms": norms.tolist(), "marginal_tv_moved": moved.tolist(),
            "steepest": int(norms.argmax()), "most_moved": int(moved.argmax()), "differing": differing}


# -- Figure 3.2 and the CLI -----------------------------------------------------------------------------------------
def plot_figure_3_2(result: dict, path: Path) -> Path:
    """Left: MSE of the biased (plug-in) and unbiased estimators over k. Right: Var of the unbiased one, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmalign.engine.plots import save_figure

    ks = [r["k"] for r in result["rows"]]
    var = [r["unbiased_var"] for r in result["rows"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    left.plot(ks, [r["plug_in_mse"] for r in result["rows"]], "o-", label="biased (plug-in)")
    left.plot(ks, [r["unbiased_mse"] for r in result["rows"]], "s-", label="unbiased (Prop. 1)")
    left.set(xscale="log", yscale="log", xlabel="group size k", ylabel="mean squared error",
             title="Fig. 3.2: biased vs unbiased estimator, f(x) = x²")
    left.legend()
    fit = [(k, v) for k, v in zip(ks, var) if k >= SLOPE_MIN_K]
    slope = loglog_slope(*zip(*fit))
    right.plot(ks, var, "s-", label=f"empirical (slope {slope:.3f} for k ≥ {SLOPE_MIN_K})")
    right.plot(ks, [var[-1] * ks[-1] / k for k in ks], "--", label="∝ 1/k (through the last point)")
    right.set(xscale="log", yscale="log", xlabel="group size k", ylabel="Var of the unbiased estimator",
              title="Proposition 2: variance O(1/k)")
    right.legend()
    return save_figure(fig, path)


def run_all(trials: int = 20000, seed: int = 0) -> dict:
    variance = group_estimator_variance(trials=trials, seed=seed)
    rows = [r for r in variance["rows"] if r["k"] >= SLOPE_MIN_K]
    fdpo = {name: fdpo_optimum(name, seed=seed) for name in DIVERGENCES}
    return {
        "proposition_2": {**variance, "slope": loglog_slope([r["k"] for r in rows], [r["unbiased_var"] for r in rows]),
                          "slope_min_k": SLOPE_MIN_K},
        "finite_pool": {
            f"{'with' if replace else 'without'}_replacement": finite_pool_bias(
                np.arange(10.0), np.arange(10.0) + 2, k=10, c=-1.0, replace=replace, trials=trials, seed=seed)
            for replace in (True, False)
        },
        "fdpo_theorem_1": {name: {k: v for k, v in r.items() if not isinstance(v, np.ndarray)}
                           for name, r in fdpo.items()},
        "ece_bound": ece_bound(seed=seed),
        "cnrpo_theorem_2": kl_gradient_by_dimension(seed=seed),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmalign_experiments.sim theory", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/theory"), help="output directory")
    parser.add_argument("--trials", type=int, default=20000, help="Monte Carlo trials per group size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    summary = run_all(args.trials, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    png = plot_figure_3_2(summary["proposition_2"], args.out / "figure_3_2.png")
    from mmalign.io import atomic_write_bytes

    atomic_write_bytes(args.out / "theory.json", (json.dumps(summary, indent=2, default=float) + "\n").encode())
    print(json.dumps({"prop2_slope": summary["proposition_2"]["slope"],
                      "fdpo_tv": {n: max(r["tv_regularised"], r["tv_fdpo"]) for n, r in summary["fdpo_theorem_1"].items()},
                      "ece_bound": summary["ece_bound"], "finite_pool": summary["finite_pool"],
                      "cnrpo_theorem_2": summary["cnrpo_theorem_2"]}, indent=1, default=float))
    print(f"wrote {png} and {args.out / 'theory.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
