"""The validated inputs of every objective (``PreferenceBatch``), its output (``ObjectiveOutput``), the masked
group statistics and the pieces every objective shares: the NLL term, the reward metrics, the stable −log σ."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


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


def chosen_nll(name: str, batch: PreferenceBatch, chosen_lengths: Tensor) -> Tensor:
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


def reward_metrics(beta: float, batch: PreferenceBatch) -> dict[str, Tensor]:
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


def build_batch(
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


def neg_log_sigmoid(logits: Tensor) -> Tensor:
    """`−log σ(z)` in the stable form `softplus(−z)` (SPEC §0)."""
    return F.softplus(-logits)
