"""The CNRPO bandit check (SPEC §4 "Bandit check"; cnrpo §6.1 and its Figure 1).

A 20-arm bandit, one context. The true and the bias Bradley–Terry rewards are (SPEC §4, arms ``i = 1..n``)

    r*(a_i)  = exp(n − i) / Σ_j exp(j)      (prefers low indices)
    r^b(a_i) = exp(i)     / Σ_j exp(j)      (prefers high indices)

and the observed preference is the mixture ``p_ε = (1 − ε) p* + ε p^b`` (cnrpo Eq. 4). Every policy is a
softmax of a logit vector trained by autograd on the *expected* loss over the data distribution: a pair
``{a, b}`` drawn uniformly from the ``n(n−1)/2`` unordered pairs and labelled ``a ≻ b`` with probability
``p_ε(a ≻ b)``. That is, each ordered pair's per-sample loss (from :func:`mmalign.objective`, fed the arms'
log-probabilities) is weighted by its preference probability, and the weighted sum is divided by the number
of unordered pairs. There is no sampling noise, so one "epoch" is one full-batch step.

Choices where the paper is silent (also in ``docs/bandit.md``):

* Reference policy ``π_ref``: uniform (``reference="uniform"``); ``reference="random"`` draws its logits from
  ``N(0, 1)`` with ``seed`` to check that conclusions do not hinge on that choice. ``π_θ`` starts at ``π_ref``
  (Algorithm 1, line 1). The seed is unused with the uniform reference: everything else is deterministic.
* Biased policy ``π_φ = π_θ(· | x ⊕ t)``: in a bandit the triggered prompt is a second context with its own
  logits, so the bias-learning stage (cnrpo Eq. 7) is DPO on the auxiliary preference
  ``(1 − λ) p* + λ p^b`` (Eq. 5) with ``λ = bias_mix = 1`` (pure bias), from ``π_ref``, same β, optimiser and
  epochs. It is frozen in the main stage: no parameter is shared between the two contexts.
* Optimiser: Adam, ``lr = 0.05`` with cosine decay to 0, 1000 epochs (the paper's count), float64. The
  objectives are convex in the logits; the returned ``max_grad_norm`` says how close to stationary each run
  ended (≈ 5e-18 with the defaults).
* Distance δ: total variation ``½ Σ |π − π_target|`` (``distance="tv"``) or ``KL(π_target ‖ π)``
  (``distance="kl"``), against two targets, both reported:

  - ``shared``: the same target for both methods, the optimum of the KL-regularised *true* reward at the DPO
    temperature, ``π*_β ∝ π_ref · exp(r*/β)`` — the policy clean-data DPO converges to;
  - ``own``: each method against the optimum of its own objective under the true reward — DPO against
    ``π*_β``, CNRPO against Theorem 1 with ``r = r*``: ``π ∝ π_ref^{β/γ} · π_φ^{−α/γ} · exp(r*/γ)``. This
    is the reading of "the optimal policy ... in closed form" (cnrpo §6.1) under which the paper's Figure 1
    statement (no difference without noise) holds exactly.

Figure 1 plots ``δ_DPO − δ_CNRPO`` over ε × α (positive = CNRPO closer). Run ``python -m mmalign_experiments.sim.bandit
--help``; results go to ``runs/bandit`` (CSV, heatmap PNG, summary JSON, training log JSONL).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml

import mmalign
from mmalign.cli import build_parser as build_command_parser
from mmalign.cli import load_from_args
from mmalign.config import save_config, to_dict
from mmalign.engine.plots import save_figure
from mmalign.io import atomic_write_bytes

__all__ = ["BanditConfig", "BanditResult", "bandit_rewards", "run_bandit", "main"]

TARGETS = ("shared", "own")


def _default_epsilons() -> list[float]:
    return [round(0.1 * i, 2) for i in range(10)]  # 0.0 … 0.9


def _default_alphas() -> list[float]:
    return [round(0.03 * i, 2) for i in range(10)]  # 0, 0.1β … 0.9β with β = 0.3


@dataclass
class BanditConfig:
    """Settings of the bandit check; defaults follow cnrpo §6.1 where it gives them."""

    n_arms: int = field(default=20, metadata={"help": "number of arms n (paper: 20)"})
    beta: float = field(default=0.3, metadata={"help": "β of DPO and of CNRPO's reference term (paper: 0.3)"})
    gamma: float = field(default=0.2, metadata={"help": "CNRPO entropy weight γ (paper: 0.2)"})
    epsilons: list[float] = field(
        default_factory=_default_epsilons, metadata={"help": "noise levels ε: share of the bias preference, in [0, 1)"}
    )
    alphas: list[float] = field(
        default_factory=_default_alphas, metadata={"help": "CNRPO bias-aversion weights α (paper advice: 0.1β–0.9β)"}
    )
    bias_mix: float = field(
        default=1.0, metadata={"help": "λ of the auxiliary set (1 − λ) p* + λ p^b used to learn π_φ (cnrpo Eq. 5)"}
    )
    epochs: int = field(default=1000, metadata={"help": "full-batch Adam steps per stage (paper: 1000 epochs)"})
    lr: float = field(default=0.05, metadata={"help": "Adam learning rate"})
    distance: Literal["tv", "kl"] = field(
        default="tv", metadata={"help": "δ: total variation, or KL(target ‖ policy)"}
    )
    reference: Literal["uniform", "random"] = field(
        default="uniform", metadata={"help": "π_ref: uniform, or softmax of N(0,1) logits drawn with seed"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random reference policy (unused when uniform)"})

    def __post_init__(self) -> None:
        if self.n_arms < 2:
            raise ValueError(f"n_arms must be >= 2; got {self.n_arms}")
        for name in ("beta", "gamma", "lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0; got {value}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1; got {self.epochs}")
        if not self.epsilons:
            raise ValueError("epsilons must list at least one noise level")
        if not self.alphas:
            raise ValueError("alphas must list at least one bias-aversion weight")
        bad_eps = [e for e in self.epsilons if not 0 <= e < 1]
        if bad_eps:
            raise ValueError(f"every epsilon must be in [0, 1) (cnrpo Eq. 4 needs Σε < 1); got {bad_eps}")
        bad_alpha = [a for a in self.alphas if not (math.isfinite(a) and a >= 0)]
        if bad_alpha:
            raise ValueError(f"every alpha must be a finite number >= 0; got {bad_alpha}")
        if not 0 < self.bias_mix <= 1:
            raise ValueError(f"bias_mix (λ) must be in (0, 1]; got {self.bias_mix}")


@dataclass
class BanditResult:
    """Converged policies and distances. Arrays are indexed ``[epsilon]`` (DPO) or ``[alpha, epsilon]`` (CNRPO)."""

    config: BanditConfig
    epsilons: np.ndarray
    alphas: np.ndarray
    log_ref: np.ndarray  # [n]
    log_bias_policy: np.ndarray  # [n], π_φ after the bias-learning stage
    log_dpo: np.ndarray  # [E, n]
    log_cnrpo: np.ndarray  # [A, E, n]
    delta_dpo: dict[str, np.ndarray]  # target -> [E]
    delta_cnrpo: dict[str, np.ndarray]  # target -> [A, E]
    max_grad_norm: float  # over every run's final full-batch gradient, both stages
    seconds: float

    def advantage(self, target: str = "own") -> np.ndarray:
        """``δ_DPO − δ_CNRPO`` as ``[A, E]`` (positive: CNRPO is closer to its target)."""
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}; got {target!r}")
        return self.delta_dpo[target][None, :] - self.delta_cnrpo[target]

    def rows(self) -> list[dict[str, float]]:
        """One row per (ε, α) grid point, for the CSV."""
        out = []
        for a, alpha in enumerate(self.alphas):
            for e, eps in enumerate(self.epsilons):
                row = {"epsilon": float(eps), "alpha": float(alpha)}
                for target in TARGETS:
                    row[f"delta_dpo_{target}"] = float(self.delta_dpo[target][e])
                    row[f"delta_cnrpo_{target}"] = float(self.delta_cnrpo[target][a, e])
                    row[f"advantage_{target}"] = row[f"delta_dpo_{target}"] - row[f"delta_cnrpo_{target}"]
                out.append(row)
        return out


def bandit_rewards(n_arms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r*, r^b)`` of SPEC §4 for arms ``1..n`` (float64). The shared denominator is computed in log space."""
    index = torch.arange(1, n_arms + 1, dtype=torch.float64)
    log_norm = torch.logsumexp(index, dim=0)
    return torch.exp((n_arms - index) - log_norm), torch.exp(index - log_norm)


def _bt_preference(reward: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry ``P[a, b] = σ(r_a − r_b)``."""
    return torch.sigmoid(reward[:, None] - reward[None, :])


def _distance(log_policy: torch.Tensor, log_target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "tv":
        return 0.5 * (log_policy.exp() - log_target.exp()).abs().sum(-1)
    return (log_target.exp() * (log_target - log_policy)).sum(-1)


class _PairLoss:
    """Expected loss over all ordered arm pairs under a preference matrix, through an mmalign objective."""

    def __init__(self, n_arms: int, log_ref: torch.Tensor) -> None:
        chosen, rejected = torch.meshgrid(torch.arange(n_arms), torch.arange(n_arms), indexing="ij")
        off_diagonal = chosen != rejected
        self.chosen, self.rejected = chosen[off_diagonal], rejected[off_diagonal]
        self.n_unordered = n_arms * (n_arms - 1) / 2
        self.log_ref = log_ref

    def weights(self, preference: torch.Tensor) -> torch.Tensor:
        """``[..., n, n]`` preference matrices to ``[..., n_pairs]`` weights of the ordered pairs."""
        return preference[..., self.chosen, self.rejected]

    def __call__(self, objective, log_policy: torch.Tensor, weights: torch.Tensor, **extra) -> torch.Tensor:
        """Sum over the rows of ``log_policy`` [R, n] of each row's expected loss (rows are independent runs)."""
        rows = log_policy.shape[0]
        flat = lambda t: t.reshape(-1)  # noqa: E731
        ref = self.log_ref
        out = objective(
            policy_chosen=flat(log_policy[:, self.chosen]),
            policy_rejected=flat(log_policy[:, self.rejected]),
            ref_chosen=ref[self.chosen].expand(rows, -1).reshape(-1),
            ref_rejected=ref[self.rejected].expand(rows, -1).reshape(-1),
            **extra,
        )
        return (out.losses.reshape(rows, -1) * weights).sum() / self.n_unordered


def _train(logits: torch.Tensor, loss_fn, epochs: int, lr: float, progress=None) -> tuple[torch.Tensor, float, list]:
    """Full-batch Adam on ``loss_fn(log_softmax(logits))``; returns the final log-policy, grad norm and a log."""
    logits = logits.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=lr)
    # Cosine decay to 0: constant-lr Adam keeps hovering ~1e-4 (in TV) around the optimum.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
    log = []
    for epoch in range(epochs):
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(torch.log_softmax(logits, dim=-1))
        loss.backward()
        if epoch % 100 == 0 or epoch == epochs - 1:
            grad_norm = float(logits.grad.detach().norm(dim=-1).max())
            log.append({"epoch": epoch, "loss": float(loss.detach()), "max_grad_norm": grad_norm})
        optimiser.step()
        schedule.step()
        if progress is not None:
            progress.update(1)
    optimiser.zero_grad(set_to_none=True)
    loss_fn(torch.log_softmax(logits, dim=-1)).backward()
    grad_norm = float(logits.grad.norm(dim=-1).max())
    return torch.log_softmax(logits.detach(), dim=-1), grad_norm, log


def run_bandit(config: BanditConfig | None = None, *, progress: bool = False) -> tuple[BanditResult, list[dict]]:
    """Run both stages and both methods on the whole ε × α grid; returns the result and a training log."""
    config = config or BanditConfig()
    start = time.perf_counter()
    dtype = torch.float64
    n = config.n_arms
    epsilons = torch.tensor(config.epsilons, dtype=dtype)
    alphas = list(config.alphas)
    n_eps, n_alpha = len(config.epsilons), len(alphas)

    if config.reference == "uniform":
        ref_logits = torch.zeros(n, dtype=dtype)
    else:
        generator = torch.Generator().manual_seed(config.seed)
        ref_logits = torch.randn(n, generator=generator, dtype=dtype)
    log_ref = torch.log_softmax(ref_logits, dim=-1)

    reward_true, reward_bias = bandit_rewards(n)
    pref_true, pref_bias = _bt_preference(reward_true), _bt_preference(reward_bias)
    pair_loss = _PairLoss(n, log_ref)

    dpo = mmalign.objective("dpo", beta=config.beta)
    # One CNRPO objective for the whole α grid: the multi-source form Σ_i α_i·SG(h_i) (Eq. 14) with one "trigger"
    # column per α, where a row of the α_j block carries h_φ in column j and 0 elsewhere; so every row sees
    # exactly α_j·SG(h_φ), as if built with alphas=[α_j], in one call instead of one per α.
    cnrpo = mmalign.objective("cnrpo", beta=config.beta, gamma=config.gamma, alphas=alphas)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * config.epochs, desc="bandit", unit="epoch", file=sys.stderr)

    # Stage 1 (cnrpo Eq. 7): the triggered context learns the auxiliary (bias) preference with DPO.
    aux_weights = pair_loss.weights((1 - config.bias_mix) * pref_true + config.bias_mix * pref_bias)[None]
    log_bias, grad_bias, bias_log = _train(
        ref_logits[None], lambda lp: pair_loss(dpo, lp, aux_weights), config.epochs, config.lr, bar
    )
    log_bias = log_bias[0]

    # Stage 2, all grid points at once: DPO rows [E] and CNRPO rows [A, E] are independent runs in one tensor
    # (Adam is elementwise, so this equals running them one by one).
    observed = (1 - epsilons)[:, None, None] * pref_true + epsilons[:, None, None] * pref_bias  # [E, n, n]
    weights = pair_loss.weights(observed)  # [E, pairs]
    block = torch.eye(n_alpha, dtype=dtype)[:, None, None, :]  # [A, 1, 1, A]: row block j -> column j

    def triggered(arms: torch.Tensor) -> torch.Tensor:
        """π_φ's log-probabilities of ``arms`` for every CNRPO row, laid out [A·E·pairs, A] as above."""
        per_row = log_bias[arms].expand(n_alpha, n_eps, -1)[..., None]  # [A, E, pairs, 1]
        return (per_row * block).reshape(-1, n_alpha)

    triggered_chosen, triggered_rejected = triggered(pair_loss.chosen), triggered(pair_loss.rejected)
    cnrpo_weights = weights.repeat(n_alpha, 1)  # [A·E, pairs]

    def main_loss(log_policy: torch.Tensor) -> torch.Tensor:
        return pair_loss(dpo, log_policy[:n_eps], weights) + pair_loss(
            cnrpo, log_policy[n_eps:], cnrpo_weights,
            triggered_chosen=triggered_chosen, triggered_rejected=triggered_rejected,
        )

    init = ref_logits.expand(n_eps * (1 + n_alpha), n)
    log_main, grad_main, main_log = _train(init, main_loss, config.epochs, config.lr, bar)
    train_log = [{"stage": "bias", **entry} for entry in bias_log] + [{"stage": "main", **entry} for entry in main_log]
    if bar is not None:
        bar.close()
    log_dpo = log_main[:n_eps]
    log_cnrpo = log_main[n_eps:].reshape(n_alpha, n_eps, n)

    # Targets (see the module docstring).
    log_shared = torch.log_softmax(log_ref + reward_true / config.beta, dim=-1)
    alpha_t = torch.tensor(alphas, dtype=dtype)[:, None]
    log_own_cnrpo = torch.log_softmax(
        (config.beta * log_ref - alpha_t * log_bias + reward_true) / config.gamma, dim=-1
    )  # [A, n], Theorem 1 with r = r*
    delta_dpo = {target: _distance(log_dpo, log_shared, config.distance).numpy() for target in TARGETS}
    delta_cnrpo = {
        "shared": _distance(log_cnrpo, log_shared, config.distance).numpy(),
        "own": _distance(log_cnrpo, log_own_cnrpo[:, None, :], config.distance).numpy(),
    }
    result = BanditResult(
        config=config,
        epsilons=epsilons.numpy(),
        alphas=np.asarray(alphas, dtype=np.float64),
        log_ref=log_ref.numpy(),
        log_bias_policy=log_bias.numpy(),
        log_dpo=log_dpo.numpy(),
        log_cnrpo=log_cnrpo.numpy(),
        delta_dpo=delta_dpo,
        delta_cnrpo=delta_cnrpo,
        max_grad_norm=max(grad_bias, grad_main),
        seconds=time.perf_counter() - start,
    )
    return result, train_log


# -- reporting -----------------------------------------------------------------------------------------------------
def format_table(result: BanditResult, target: str) -> str:
    """Console table of ``δ_DPO − δ_CNRPO``: rows ε, columns α."""
    adv = result.advantage(target)
    head = f"δ_DPO − δ_CNRPO ({result.config.distance}, target={target}); rows ε, columns α"
    cols = "   ε \\ α " + "".join(f"{a:>8.3f}" for a in result.alphas)
    lines = [head, cols]
    for e, eps in enumerate(result.epsilons):
        lines.append(f"{eps:>8.2f} " + "".join(f"{round(adv[a, e], 4) + 0.0:>+8.4f}" for a in range(len(result.alphas))))
    return "\n".join(lines)


def write_csv(result: BanditResult, path: Path) -> None:
    rows = result.rows()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def plot_heatmaps(result: BanditResult, path: Path) -> None:
    """One heatmap per target (ε rows, α columns), colour scale symmetric around 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TARGETS), figsize=(6.2 * len(TARGETS), 5.2), constrained_layout=True)
    titles = {"shared": "both vs π*_β (shared target)", "own": "each vs its own optimum (Theorem 1)"}
    for ax, target in zip(axes, TARGETS):
        adv = result.advantage(target).T  # [E, A]
        limit = float(np.abs(adv).max()) or 1.0
        image = ax.imshow(adv, origin="lower", cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_xticks(range(len(result.alphas)), [f"{a:g}" for a in result.alphas], rotation=45)
        ax.set_yticks(range(len(result.epsilons)), [f"{e:g}" for e in result.epsilons])
        ax.set_xlabel("α (bias aversion)")
        ax.set_ylabel("ε (noise level)")
        ax.set_title(titles[target])
        if adv.size <= 150:
            for (e, a), value in np.ndenumerate(adv):
                ax.text(a, e, f"{round(value, 3) + 0.0:.3f}", ha="center", va="center", fontsize=6)  # no "-0.000"
        fig.colorbar(image, ax=ax, label=f"δ_DPO − δ_CNRPO ({result.config.distance})")
    fig.suptitle(f"CNRPO bandit (n={result.config.n_arms}, β={result.config.beta}, γ={result.config.gamma})")
    save_figure(fig, path, dpi=120)


def write_outputs(result: BanditResult, train_log: list[dict], out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {
        "csv": out_dir / "bandit_grid.csv",
        "png": out_dir / "bandit_heatmap.png",
        "summary": out_dir / "summary.json",
        "log": out_dir / "train_log.jsonl",
        "config": out_dir / "config.yaml",
    }
    write_csv(result, paths["csv"])
    plot_heatmaps(result, paths["png"])
    summary = {
        "config": to_dict(result.config),
        "seconds": result.seconds,
        "max_grad_norm": result.max_grad_norm,
        "bias_policy": np.exp(result.log_bias_policy).tolist(),
        "advantage": {target: result.advantage(target).tolist() for target in TARGETS},
        "advantage_layout": "[alpha][epsilon]",
    }
    atomic_write_bytes(paths["summary"], (json.dumps(summary, indent=2) + "\n").encode())
    atomic_write_bytes(paths["log"], "".join(json.dumps(entry) + "\n" for entry in train_log).encode())
    save_config(result.config, paths["config"])
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = build_command_parser(
        "python -m mmalign_experiments.sim.bandit", "CNRPO vs DPO on the 20-arm bandit of cnrpo §6.1 (Figure 1): "
        "δ_DPO − δ_CNRPO over ε × α.", BanditConfig)
    parser.add_argument("--out", type=Path, default=Path("runs/bandit"), help="output directory (default runs/bandit)")
    parser.add_argument("--epsilons", type=float, nargs="+", help="noise levels ε (overrides the config)")
    parser.add_argument("--alphas", type=float, nargs="+", help="bias-aversion weights α (overrides the config)")
    parser.add_argument("--epochs", type=int, help="Adam steps per stage (overrides the config)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (overrides the config)")
    parser.add_argument("--distance", choices=["tv", "kl"], help="distance δ (overrides the config)")
    parser.add_argument("--reference", choices=["uniform", "random"], help="reference policy (overrides the config)")
    parser.add_argument("--seed", type=int, help="seed of the random reference (overrides the config)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no console table")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("epsilons", "alphas", "epochs", "lr", "distance", "reference", "seed"):
        value = getattr(args, name)
        if value is not None:
            args.overrides.append(f"{name}={json.dumps(value)}")
    config = load_from_args(parser, BanditConfig, args)
    if args.print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return 0
    torch.set_num_threads(1)  # tiny tensors: more threads only add contention
    result, train_log = run_bandit(config, progress=not args.quiet)
    paths = write_outputs(result, train_log, args.out)
    if not args.quiet:
        for target in TARGETS:
            print(format_table(result, target))
            print()
        print(f"trained {1 + len(config.alphas)} × {len(config.epsilons)} policies in {result.seconds:.1f} s; "
              f"largest final gradient norm {result.max_grad_norm:.2e}")
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
