"""Preference objectives on per-sample log-likelihoods: one implementation for text and images (SPEC §0–§5).

Every objective consumes the policy's and the reference's per-sample log-likelihoods of the chosen and the
rejected outputs (for diffusion, the denoising surrogate of SPEC §7), shape `[B]` for pairs or `[B, k]` for
groups, and returns an :class:`ObjectiveOutput`. Objectives live in a registry::

    obj = mmalign.objective("mdpo", beta=0.1)
    out = obj(policy_chosen=pc, policy_rejected=pr, ref_chosen=rc, ref_rejected=rr, chosen_mask=m_w)
    out.loss.backward()

Conventions shared by all objectives:
- `ρ = logp_θ − logp_ref` per sample; a group's implicit reward is the mean of its members' ρ (SPEC §3). For
  pairs this is ρ itself, so every pairwise formula below is the k = 1 case of the group formula.
- Inputs are upcast to float32 (float64 stays): bf16 log-likelihoods of long responses lose the digits that a
  DPO margin lives in. The reference inputs are detached: the reference is frozen by definition.
- `nll=λ` adds `λ · (−logp_θ(x, y_w) / |y_w|)` to any objective (SPEC §1) and needs `chosen_lengths`.
- Metrics use the names of the common ecosystem: `rewards/chosen = β·R_w`, `rewards/rejected`,
  `rewards/margins`, `rewards/accuracies` (share of examples with `R_w > R_l`), `logps/chosen`, `logps/rejected`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.shared.mmd import binned_mmd_penalty

# exp(50) ≈ 5e21 is finite in float32 with room for β and the sigmoid's gradient; beyond it the f-DPO links
# (forward KL, α) are clamped, where the loss is already saturated.
_MAX_EXPONENT = 50.0


@dataclass
class ObjectiveOutput:
    """What an objective returns: `loss` (scalar mean over the batch), `losses` ([B]) and metrics.

    `metric_tensors` are detached 0-dim tensors (no device synchronisation; average these in training loops);
    `metrics` converts them to Python floats on access.
    """

    loss: Tensor
    losses: Tensor
    metric_tensors: dict[str, Tensor] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        return {name: float(value) for name, value in self.metric_tensors.items()}


@dataclass
class PreferenceBatch:
    """Validated, float32 inputs as `[B, k]` groups with boolean masks, and the groups' implicit rewards."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_mask: Tensor
    rejected_mask: Tensor

    @property
    def ratio_chosen(self) -> Tensor:
        return self.policy_chosen - self.ref_chosen

    @property
    def ratio_rejected(self) -> Tensor:
        return self.policy_rejected - self.ref_rejected

    @property
    def reward_chosen(self) -> Tensor:
        """`R(G_w)`: the mean log-ratio over each chosen group's valid members, [B]."""
        return masked_mean(self.ratio_chosen, self.chosen_mask)

    @property
    def reward_rejected(self) -> Tensor:
        return masked_mean(self.ratio_rejected, self.rejected_mask)

    @property
    def group_sizes(self) -> tuple[int, int]:
        return self.policy_chosen.shape[1], self.policy_rejected.shape[1]


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over the last dimension counting only `mask`ed entries (padding may hold anything, even NaN)."""
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return torch.where(mask, values, zero).sum(-1) / mask.sum(-1)


def masked_sample_variance(values: Tensor, mask: Tensor) -> Tensor:
    """Per-row sample variance with the n−1 denominator over `mask`ed entries; 0 for a group of one."""
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    count = mask.sum(-1).to(values.dtype)
    centred = torch.where(mask, values - masked_mean(values, mask).unsqueeze(-1), zero)
    return (centred * centred).sum(-1) / (count - 1).clamp_min(1.0)


# ----------------------------------------------------------------------------------------------------------
# Hyperparameter checks: each says what was wrong and what is allowed.


def _number(name: str, value: object, objective: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{objective}: {name} must be a finite number; got {value!r}")
    return float(value)


def _positive(name: str, value: object, objective: str) -> float:
    value = _number(name, value, objective)
    if value <= 0:
        raise ValueError(f"{objective}: {name} must be > 0; got {value}")
    return value


def _noise_rate(value: object, objective: str) -> float:
    value = _number("eps", value, objective)
    if not 0 <= value < 0.5:
        raise ValueError(f"{objective}: eps (the label-flip rate) must be in [0, 0.5); got {value}")
    return value


# ----------------------------------------------------------------------------------------------------------
# The base class: input validation, the NLL term and the common metrics. Subclasses give `losses`.


class Objective:
    """A preference objective. Subclasses set `name`, implement `losses(batch, **extra)` and validate hparams."""

    name: ClassVar[str] = ""
    #: pairwise objectives accept groups of size 1 only; group objectives any size and ragged masks.
    accepts_groups: ClassVar[bool] = False
    #: extra keyword inputs the objective requires when called.
    extra_inputs: ClassVar[tuple[str, ...]] = ()
    #: extra keyword inputs it accepts but does not require.
    optional_inputs: ClassVar[tuple[str, ...]] = ()
    #: whether `losses` receives `chosen_lengths` (None when not given) among its keyword inputs.
    takes_lengths: ClassVar[bool] = False

    def __init__(self, beta: float, nll: float = 0.0) -> None:
        self.beta = _positive("beta", beta, self.name)
        self.nll = _number("nll", nll, self.name)
        if self.nll < 0:
            raise ValueError(f"{self.name}: nll (the weight of the NLL term) must be >= 0; got {self.nll}")

    @property
    def uses_chosen_lengths(self) -> bool:
        """Whether `chosen_lengths` enters the loss: the NLL term (nll > 0) or an objective built on it (sft)."""
        return self.nll > 0 or self.takes_lengths

    @property
    def hparams(self) -> dict[str, object]:
        return {key: getattr(self, key) for key in inspect.signature(type(self).__init__).parameters if key != "self"}

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.hparams.items())
        return f"objective({self.name!r}, {args})"

    def losses(self, batch: PreferenceBatch, **extra: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-example losses [B] and objective-specific metric tensors."""
        raise NotImplementedError

    def __call__(
        self,
        *,
        policy_chosen: Tensor,
        policy_rejected: Tensor,
        ref_chosen: Tensor,
        ref_rejected: Tensor,
        chosen_mask: Tensor | None = None,
        rejected_mask: Tensor | None = None,
        chosen_lengths: Tensor | None = None,
        **extra: Tensor,
    ) -> ObjectiveOutput:
        self._check_extra(extra)
        batch = _build_batch(
            self.name, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_mask, rejected_mask
        )
        if not self.accepts_groups and batch.group_sizes != (1, 1):
            k_w, k_l = batch.group_sizes
            raise ValueError(
                f"{self.name} is a pairwise objective: it takes inputs of shape [B] or [B, 1], got groups of "
                f"{k_w} chosen and {k_l} rejected; use 'mdpo' or 'mipo' for groups"
            )
        if self.takes_lengths:
            extra = {**extra, "chosen_lengths": chosen_lengths}
        losses, metrics = self.losses(batch, **extra)
        if self.nll > 0:
            nll = self._nll_term(batch, chosen_lengths)
            losses = losses + self.nll * nll
            metrics["nll"] = nll.mean().detach()
        metrics = {**_reward_metrics(self.beta, batch), **metrics}
        return ObjectiveOutput(loss=losses.mean(), losses=losses, metric_tensors=metrics)

    def _check_extra(self, extra: dict[str, Tensor]) -> None:
        allowed = set(self.extra_inputs) | set(self.optional_inputs)
        unknown = sorted(set(extra) - allowed)
        if unknown:
            raise ValueError(
                f"{self.name}: unknown input(s) {unknown}; besides policy_chosen, policy_rejected, ref_chosen, "
                f"ref_rejected, chosen_mask, rejected_mask and chosen_lengths it takes {sorted(allowed) or 'nothing'}"
            )
        missing = [name for name in self.extra_inputs if extra.get(name) is None]
        if missing:
            raise ValueError(f"{self.name}: missing required input(s) {missing}")

    def _nll_term(self, batch: PreferenceBatch, chosen_lengths: Tensor | None) -> Tensor:
        if chosen_lengths is None:
            raise ValueError(
                f"{self.name}: nll={self.nll} needs chosen_lengths (tokens per chosen response, shape of "
                "policy_chosen) to normalise −logp_θ(x, y_w) by |y_w| (SPEC §1)"
            )
        return _chosen_nll(self.name, batch, chosen_lengths)


def _chosen_nll(name: str, batch: PreferenceBatch, chosen_lengths: Tensor) -> Tensor:
    """`−logp_θ(x, y_w) / |y_w|` averaged over each chosen group, [B] (SPEC §1's NLL term)."""
    lengths = _check_lengths(name, chosen_lengths, batch)
    return masked_mean(-batch.policy_chosen / lengths, batch.chosen_mask)


def _check_lengths(name: str, chosen_lengths: Tensor, batch: PreferenceBatch) -> Tensor:
    lengths = torch.as_tensor(chosen_lengths, device=batch.policy_chosen.device)
    lengths = lengths.to(batch.policy_chosen.dtype)
    if lengths.dim() == 1:
        lengths = lengths.unsqueeze(-1)
    if lengths.shape != batch.policy_chosen.shape:
        raise ValueError(
            f"{name}: chosen_lengths must have the shape of policy_chosen {tuple(batch.policy_chosen.shape)}; "
            f"got {tuple(chosen_lengths.shape)}"
        )
    if bool((torch.where(batch.chosen_mask, lengths, torch.ones_like(lengths)) <= 0).any()):
        raise ValueError(f"{name}: chosen_lengths must be > 0 for every valid chosen response")
    return lengths


def _reward_metrics(beta: float, batch: PreferenceBatch) -> dict[str, Tensor]:
    with torch.no_grad():
        reward_chosen, reward_rejected = batch.reward_chosen, batch.reward_rejected
        return {
            "rewards/chosen": beta * reward_chosen.mean(),
            "rewards/rejected": beta * reward_rejected.mean(),
            "rewards/margins": beta * (reward_chosen - reward_rejected).mean(),
            "rewards/accuracies": (reward_chosen > reward_rejected).float().mean(),
            "logps/chosen": masked_mean(batch.policy_chosen, batch.chosen_mask).mean(),
            "logps/rejected": masked_mean(batch.policy_rejected, batch.rejected_mask).mean(),
        }


def _as_group(name: str, field_name: str, value: Tensor) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name}: {field_name} must be a torch.Tensor; got {type(value).__name__}")
    if value.dim() == 1:
        value = value.unsqueeze(-1)
    if value.dim() != 2 or value.shape[0] == 0 or value.shape[1] == 0:
        raise ValueError(f"{name}: {field_name} must have shape [B] or [B, k] with B, k >= 1; got {tuple(value.shape)}")
    if not torch.is_floating_point(value):
        raise ValueError(f"{name}: {field_name} must be a floating-point tensor; got {value.dtype}")
    return value if value.dtype == torch.float64 else value.float()


def _as_mask(name: str, field_name: str, mask: Tensor | None, like: Tensor) -> Tensor:
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    mask = torch.as_tensor(mask, device=like.device)
    if mask.dim() == 1 and like.shape[1] == 1:
        mask = mask.unsqueeze(-1)
    if mask.shape != like.shape:
        raise ValueError(f"{name}: {field_name} must have shape {tuple(like.shape)}; got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name}: {field_name} must be a boolean tensor; got {mask.dtype}")
    empty = (~mask.any(-1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(
            f"{name}: {field_name} masks out every member of the group in row(s) {empty.tolist()[:10]}; "
            "each group needs at least one valid member"
        )
    return mask


def _build_batch(
    name: str,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    chosen_mask: Tensor | None,
    rejected_mask: Tensor | None,
) -> PreferenceBatch:
    pc = _as_group(name, "policy_chosen", policy_chosen)
    pr = _as_group(name, "policy_rejected", policy_rejected)
    rc = _as_group(name, "ref_chosen", ref_chosen).detach()
    rr = _as_group(name, "ref_rejected", ref_rejected).detach()
    if rc.shape != pc.shape:
        raise ValueError(f"{name}: ref_chosen has shape {tuple(rc.shape)} but policy_chosen {tuple(pc.shape)}")
    if rr.shape != pr.shape:
        raise ValueError(f"{name}: ref_rejected has shape {tuple(rr.shape)} but policy_rejected {tuple(pr.shape)}")
    if pc.shape[0] != pr.shape[0]:
        raise ValueError(f"{name}: {pc.shape[0]} chosen rows but {pr.shape[0]} rejected rows; they must match")
    mc = _as_mask(name, "chosen_mask", chosen_mask, pc)
    mr = _as_mask(name, "rejected_mask", rejected_mask, pr)
    # One check, one device sync: non-finite values in valid entries (padding may hold anything).
    bad = torch.stack(
        [(~torch.isfinite(t) & m).any() for t, m in ((pc, mc), (pr, mr), (rc, mc), (rr, mr))]
    )
    if bool(bad.any()):
        names = [n for n, b in zip(("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"), bad.tolist()) if b]
        raise ValueError(f"{name}: {names} contain NaN or inf; check the log-likelihood computation upstream")
    return PreferenceBatch(pc, pr, rc, rr, mc, mr)


# ----------------------------------------------------------------------------------------------------------
# The registry.

_REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective available to :func:`objective` under `cls.name`."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"objective name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_objectives() -> list[str]:
    return sorted(_REGISTRY)


def objective(name: str, **hparams: object) -> Objective:
    """Build the objective `name` with its hyperparameters, e.g. `objective("fdpo", beta=0.1, divergence="js")`.

    Unknown names or hyperparameters raise a ValueError that lists what is allowed.
    """
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown objective {name!r}; available: {', '.join(available_objectives())}")
    parameters = inspect.signature(cls.__init__).parameters
    allowed = [key for key in parameters if key != "self"]
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise ValueError(f"{name}: unknown hyperparameter(s) {unknown}; allowed: {allowed}")
    missing = [key for key, p in parameters.items() if key != "self" and p.default is p.empty and key not in hparams]
    if missing:
        raise ValueError(f"{name}: missing hyperparameter(s) {missing}; allowed: {allowed}")
    return cls(**hparams)


def _neg_log_sigmoid(logits: Tensor) -> Tensor:
    """`−log σ(z)` in the stable form `softplus(−z)` (SPEC §0)."""
    return F.softplus(-logits)


# ----------------------------------------------------------------------------------------------------------
# SPEC §1: pairwise objectives, z = ρ_w − ρ_l.


@register
class DPO(Objective):
    """DPO (SPEC §1): `−log σ(β z)`."""

    name = "dpo"

    def losses(self, batch, **extra):
        margin = batch.reward_chosen - batch.reward_rejected
        return _neg_log_sigmoid(self.beta * margin), {}


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
        self.eps = _noise_rate(eps, self.name)

    def losses(self, batch, **extra):
        logits = self.beta * (batch.reward_chosen - batch.reward_rejected)
        eps = self.eps
        return ((1 - eps) * _neg_log_sigmoid(logits) - eps * _neg_log_sigmoid(-logits)) / (1 - 2 * eps), {}


@register
class ConservativeDPO(Objective):
    """cDPO, label smoothing (SPEC §1): `(1−ε)·ℓ(βz) + ε·ℓ(−βz)` (cnrpo App. B swaps ε and 1−ε, a typo)."""

    name = "cdpo"

    def __init__(self, beta: float, eps: float = 0.1, nll: float = 0.0) -> None:
        super().__init__(beta, nll)
        self.eps = _noise_rate(eps, self.name)

    def losses(self, batch, **extra):
        logits = self.beta * (batch.reward_chosen - batch.reward_rejected)
        return (1 - self.eps) * _neg_log_sigmoid(logits) + self.eps * _neg_log_sigmoid(-logits), {}


@register
class Hinge(Objective):
    """SLiC hinge (SPEC §1): `max(0, 1 − βz)`."""

    name = "hinge"

    def losses(self, batch, **extra):
        return torch.relu(1.0 - self.beta * (batch.reward_chosen - batch.reward_rejected)), {}


# ----------------------------------------------------------------------------------------------------------
# SPEC §2: f-DPO. Each link maps the log-ratios (ρ_w, ρ_l) to the logit f'(u_w) − f'(u_l), u = exp(ρ).


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
            alpha = _number("alpha", alpha, self.name)
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
        return _neg_log_sigmoid(self.beta * logit), {"fdpo/logit": logit.detach().mean()}


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
        return _chosen_nll(self.name, batch, chosen_lengths), {}


# ----------------------------------------------------------------------------------------------------------
# SPEC §3: multi-sample objectives on group implicit rewards R(G) = mean ρ.


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


# ----------------------------------------------------------------------------------------------------------
# SPEC §4: CNRPO.


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
        self.gamma = self.beta if gamma is None else _positive("gamma", gamma, self.name)
        if isinstance(alphas, (int, float)) or not isinstance(alphas, Sequence):
            raise ValueError(f"cnrpo: alphas must be a list with one weight per trigger; got {alphas!r}")
        self.alphas = [_number("alphas[]", a, self.name) for a in alphas]
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
        return _neg_log_sigmoid(logits), {"cnrpo/bias_term": bias_term.mean(), "cnrpo/logits": logits.detach().mean()}

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


# ----------------------------------------------------------------------------------------------------------
# SPEC §5: causal DPO.


@register
class CausalDPO(Objective):
    """Causal DPO (SPEC §5, thesis Eq. 4.4): DPO plus `λ · Σ_{m<m'} MMD²(P_m, P_{m'})` on the log-ratios.

    Extra input `bins`: [B] (one bin per pair, e.g. the prompt's demographic group) or [B, 2] (chosen's and
    rejected's bins, e.g. by response length). Optional `features`: [B, d] (one per pair) or [B, 2, d] (one per
    response); default the log-ratios ρ_w, ρ_l. Unconditional: one penalty over all responses; conditional: the
    penalty inside the chosen and inside the rejected responses, summed (needs per-response features).
    The penalty is a batch quantity; it is added to every example's loss so that `loss == losses.mean()`.
    Bins with fewer than two members in a batch are left out (no unbiased estimate); `mmd/bins_used` reports how
    many took part. `bandwidth`: None (median heuristic, floored at `min_bandwidth`), a float or a list.
    The floor matters: at the start of training every log-ratio is ≈ 0, the median distance is tiny, and an
    unfloored kernel turns noise-level differences into huge gradients (∝ 1/h). 0.1 nats is below any
    log-ratio difference worth correcting.
    """

    name = "causal_dpo"
    extra_inputs = ("bins",)
    optional_inputs = ("features",)

    def __init__(
        self,
        beta: float,
        lam: float = 1.0,
        conditional: bool = False,
        bandwidth: float | list[float] | None = None,
        min_bandwidth: float = 0.1,
        nll: float = 0.0,
    ) -> None:
        super().__init__(beta, nll)
        self.lam = _number("lam", lam, self.name)
        self.min_bandwidth = _number("min_bandwidth", min_bandwidth, self.name)
        if self.min_bandwidth < 0:
            raise ValueError(f"causal_dpo: min_bandwidth must be >= 0; got {self.min_bandwidth}")
        if self.lam < 0:
            raise ValueError(f"causal_dpo: lam (the MMD weight) must be >= 0; got {self.lam}")
        if not isinstance(conditional, bool):
            raise ValueError(f"causal_dpo: conditional must be true or false; got {conditional!r}")
        self.conditional = conditional
        self.bandwidth = bandwidth

    def losses(self, batch, *, bins, features=None):
        rho_w, rho_l = batch.reward_chosen, batch.reward_rejected
        dpo = _neg_log_sigmoid(self.beta * (rho_w - rho_l))
        samples, sample_bins, groups = self._samples(rho_w, rho_l, bins, features)
        penalty, used = binned_mmd_penalty(
            samples,
            sample_bins,
            groups=groups if self.conditional else None,
            bandwidth=self.bandwidth,
            min_bandwidth=self.min_bandwidth,
        )
        metrics = {"mmd/penalty": penalty.detach(), "mmd/bins_used": torch.tensor(float(used))}
        return dpo + self.lam * penalty, metrics

    def _samples(self, rho_w: Tensor, rho_l: Tensor, bins: Tensor, features: Tensor | None):
        batch_size = rho_w.shape[0]
        bins = torch.as_tensor(bins, device=rho_w.device)
        if torch.is_floating_point(bins) or bins.dtype == torch.bool:
            raise ValueError(f"causal_dpo: bins must be integer bin ids; got dtype {bins.dtype}")
        if bins.dim() == 1:
            bins = bins.unsqueeze(-1).expand(batch_size, 2)
        if tuple(bins.shape) != (batch_size, 2):
            raise ValueError(f"causal_dpo: bins must have shape [B] or [B, 2] with B={batch_size}; got {tuple(bins.shape)}")
        if features is None:
            per_response = torch.stack([rho_w, rho_l], dim=1).unsqueeze(-1)  # [B, 2, 1]
        elif features.dim() == 3 and tuple(features.shape[:2]) == (batch_size, 2):
            per_response = features
        elif features.dim() == 2 and features.shape[0] == batch_size:
            if self.conditional:
                raise ValueError(
                    "causal_dpo: conditional=True needs per-response features [B, 2, d]; got pair features [B, d]"
                )
            if not bool((bins[:, 0] == bins[:, 1]).all()):
                raise ValueError("causal_dpo: pair features [B, d] need one bin per pair (bins of shape [B])")
            return features, bins[:, 0], None
        else:
            raise ValueError(
                f"causal_dpo: features must have shape [B, d] or [B, 2, d] with B={batch_size}; "
                f"got {tuple(features.shape)}"
            )
        is_chosen = torch.tensor([1, 0], device=rho_w.device).expand(batch_size, 2)
        return per_response.reshape(2 * batch_size, -1), bins.reshape(-1), is_chosen.reshape(-1)
