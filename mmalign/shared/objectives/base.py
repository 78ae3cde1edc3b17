"""The base class of every objective: input validation, the NLL term and the common metrics; subclasses give
``losses``."""
from __future__ import annotations

import inspect
from typing import ClassVar

from torch import Tensor

from mmalign.shared.objectives.batch import ObjectiveOutput, PreferenceBatch, build_batch, chosen_nll, reward_metrics
from mmalign.shared.objectives.hyperparameters import finite_number, positive_number


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
    #: "members" when a pairwise objective trains on the member pairs of groups (`MemberPairs`); else None.
    pairs: ClassVar[str | None] = None

    def __init__(self, beta: float, nll: float = 0.0) -> None:
        self.beta = positive_number("beta", beta, self.name)
        self.nll = finite_number("nll", nll, self.name)
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
        batch = build_batch(
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
        metrics = {**reward_metrics(self.beta, batch), **metrics}
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
        return chosen_nll(self.name, batch, chosen_lengths)
