"""Stops a run at the first non-finite loss or gradient norm, naming the step, before anything is saved from it.

The check costs no host sync per step: the first bad step is tracked on the device and read where the engine
syncs anyway (a logging window, before a checkpoint, before the final save).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["NonFiniteError", "NonFiniteGuard"]


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm became NaN/inf; the message names the step and the likely causes."""


class NonFiniteGuard:
    """Keeps one ``isfinite`` flag tensor per observed value (one op, no sync) until the next :meth:`check`."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pending: list[tuple[int, str, torch.Tensor]] = []

    def _observe(self, value: torch.Tensor, step: int, what: str) -> None:
        flag = torch.isfinite(value.detach())
        self._pending.append((step, what, flag.all() if flag.dim() else flag))

    def observe_loss(self, loss: torch.Tensor, step: int) -> None:
        self._observe(loss, step, "the loss")

    def observe_grad_norm(self, grad_norm: torch.Tensor, step: int) -> None:
        self._observe(grad_norm, step, "the gradient norm")

    def check(self, accelerator=None, *, last_checkpoint: Optional[str] = None, learning_rate: float = 0.0) -> None:
        """Raises :class:`NonFiniteError` if any step so far had a non-finite loss or gradient norm (one sync)."""
        pending, self._pending = self._pending, []
        flags = torch.stack([flag for _, _, flag in pending]) if pending else torch.ones(1, dtype=torch.bool,
                                                                                       device=self.device)
        bad = (~flags).to(torch.int32)
        if accelerator is not None and accelerator.num_processes > 1:
            # every process stops together; the lists have the same length on every process (same steps)
            bad = accelerator.reduce(bad, reduction="max")
        host = bad.tolist()
        if not any(host):
            return
        step, what, _ = pending[host.index(1)]
        saved = (f"the last checkpoint written before it is {last_checkpoint}" if last_checkpoint
                 else "no checkpoint was written")
        raise NonFiniteError(
            f"step {step}: {what} is not finite (NaN or inf); the run stops and nothing is saved from step {step} "
            f"on ({saved}). Likely causes: a learning rate too high for this model (training.learning_rate = "
            f"{learning_rate:g}) or no gradient clipping (training.max_grad_norm), fp16 overflow "
            "(training.mixed_precision: bf16 or no), an objective hyperparameter at an extreme value, or an "
            "empty/degenerate batch"
        )
