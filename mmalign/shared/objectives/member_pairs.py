"""A pairwise objective (SPEC §1, §2) trained on the member pairs of groups (SPEC §3's data): ``objective.pairs:
members``.

Groups ``G_w = {y_w,i}`` and ``G_l = {y_l,i}`` of equal size ``k`` for one prompt hold the ``k`` pairs
``(y_w,i, y_l,i)``. :class:`MemberPairs` flattens ``[B, k]`` inputs to the ``B·k`` pairs — a pair counts only where
both members are valid (``chosen_mask & rejected_mask``) — and applies the pairwise objective to them, so its loss
(the mean over the pairs) and metrics are exactly those of the same objective on a pairs batch of those pairs. The
data stays in groups, so a backend encodes each prompt once per group instead of once per pair (issue #17).
"""
from __future__ import annotations

import torch
from torch import Tensor

from mmalign.shared.objectives.base import Objective
from mmalign.shared.objectives.batch import ObjectiveOutput, build_batch

__all__ = ["MemberPairs", "PAIRS_MODES", "with_pairs"]

#: the values of ``objective.pairs`` (``mmalign.objective(name, pairs=...)``); None / "off": the plain objective
PAIRS_MODES = ("members",)


class MemberPairs(Objective):
    """``inner`` (a pairwise objective without extra inputs) on the member pairs of equal-size groups (SPEC §1, §3).

    Inputs ``[B, k]`` (or ``[B]``, k = 1) with optional masks and ``chosen_lengths`` of the same shape; member ``i``
    of the chosen group is paired with member ``i`` of the rejected group. ``loss`` is the mean over the valid
    pairs, ``losses`` has one entry per valid pair (row-major: row 0's pairs first), metrics are the pairwise
    objective's own on those pairs. ``name``, ``beta``, ``nll`` are the inner objective's.
    """

    accepts_groups = True
    pairs = "members"

    def __init__(self, inner: Objective) -> None:  # noqa: D107 - no super().__init__: the inner one validated
        if not isinstance(inner, Objective):
            raise ValueError(f"objective.pairs: members wraps an objective; got {type(inner).__name__}")
        if inner.accepts_groups:
            raise ValueError(f"objective.pairs: members applies a pairwise objective to the member pairs of groups; "
                             f"{inner.name!r} takes groups itself: remove objective.pairs")
        inputs = sorted(set(inner.extra_inputs) | set(inner.optional_inputs))
        if inputs or inner.takes_lengths:
            raise ValueError(f"objective.pairs: members does not support {inner.name!r}: it takes extra inputs "
                             f"{inputs or ['chosen_lengths']} that have no member-pair form; remove objective.pairs "
                             "and train it on a pairs file")
        self.inner = inner
        self.name = inner.name
        self.beta = inner.beta
        self.nll = inner.nll

    @property
    def uses_chosen_lengths(self) -> bool:
        return self.inner.uses_chosen_lengths

    @property
    def hparams(self) -> dict[str, object]:
        return {**self.inner.hparams, "pairs": self.pairs}

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
        if extra:
            raise ValueError(f"{self.name} with objective.pairs: members takes no extra inputs; got {sorted(extra)} "
                             "(triggers, bins and other extra inputs have no member-pair form)")
        batch = build_batch(self.name, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                            chosen_mask, rejected_mask)
        k_w, k_l = batch.group_sizes
        if k_w != k_l:
            raise ValueError(f"{self.name} with objective.pairs: members pairs member i of the chosen group with "
                             f"member i of the rejected group, so the groups need equal sizes; got {k_w} chosen and "
                             f"{k_l} rejected")
        lengths = None
        if chosen_lengths is not None:  # reshaped as the log-likelihoods; the inner objective checks the values
            lengths = torch.as_tensor(chosen_lengths, device=batch.policy_chosen.device)
            lengths = lengths.unsqueeze(-1) if lengths.dim() == 1 else lengths
            if lengths.shape != batch.policy_chosen.shape:
                raise ValueError(f"{self.name}: chosen_lengths must have the shape of policy_chosen "
                                 f"{tuple(batch.policy_chosen.shape)}; got {tuple(chosen_lengths.shape)}")
        if chosen_mask is None and rejected_mask is None:  # every pair valid: a reshape, no device sync
            def pick(t: Tensor) -> Tensor:
                return t.reshape(-1)
        else:
            valid = batch.chosen_mask & batch.rejected_mask
            if not bool(valid.any()):
                raise ValueError(f"{self.name} with objective.pairs: members: no member pair has both its chosen "
                                 "and its rejected member present in this batch")

            def pick(t: Tensor) -> Tensor:
                return t[valid]
        return self.inner(
            policy_chosen=pick(batch.policy_chosen), policy_rejected=pick(batch.policy_rejected),
            ref_chosen=pick(batch.ref_chosen), ref_rejected=pick(batch.ref_rejected),
            chosen_lengths=None if lengths is None else pick(lengths),
        )


def with_pairs(inner: Objective, pairs: object) -> Objective:
    """``inner`` as ``objective.pairs`` says: None / "off" leaves it, "members" wraps it in :class:`MemberPairs`."""
    if pairs is None or pairs == "off":
        return inner
    if pairs not in PAIRS_MODES:
        raise ValueError(f"objective.pairs: invalid value {pairs!r}; expected 'members' (a pairwise objective on the "
                         "member pairs of equal-size groups) or null / 'off'")
    return MemberPairs(inner)
