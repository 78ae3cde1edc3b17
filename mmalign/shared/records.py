"""The one record objectives consume (SPEC §0): per-sample log-likelihoods of every member of every chosen and
rejected group, for the policy and the reference, ``[B, k]`` each. The text backend fills it with summed
response-token log-probabilities, the image backend with the denoising surrogate ``−e`` (SPEC §7)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor

__all__ = ["LogLikelihoods"]


@dataclass
class LogLikelihoods:
    """``policy_*`` carry the gradient, ``ref_*`` do not. ``chosen_mask`` / ``rejected_mask``: valid members of
    ragged groups (None: every member is valid); ``chosen_lengths``: response lengths for per-token terms (the nll
    term, sft); ``extra``: the objective's further inputs by name (``triggered_chosen`` / ``triggered_rejected`` of
    cnrpo, ``bins`` of causal_dpo); ``details``: what a backend records besides (e.g. the diffusion timesteps),
    never passed to the objective."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_mask: Optional[Tensor] = None
    rejected_mask: Optional[Tensor] = None
    chosen_lengths: Optional[Tensor] = None
    extra: dict[str, Tensor] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def objective_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments for ``mmalign.objective(...)(**inputs)``."""
        inputs = {"policy_chosen": self.policy_chosen, "policy_rejected": self.policy_rejected,
                  "ref_chosen": self.ref_chosen, "ref_rejected": self.ref_rejected}
        for name in ("chosen_mask", "rejected_mask", "chosen_lengths"):
            value = getattr(self, name)
            if value is not None:
                inputs[name] = value
        inputs.update(self.extra)
        return inputs
