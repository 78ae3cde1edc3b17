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
    def __init__(self, device: torch.device):
        self.device = device
        self._step = torch.zeros((), dtype=torch.int64, device=device)  # optimizer steps seen, on device
        self._first_loss = torch.full((), -1, dtype=torch.int64, device=device)
        self._first_grad = torch.full((), -1, dtype=torch.int64, device=device)

    def start(self, global_step: int) -> None:
        self._step.fill_(global_step)

    def _mark(self, first: torch.Tensor, value: torch.Tensor) -> None:
        bad = ~torch.isfinite(value.detach().float()).all()
        first.copy_(torch.where((first < 0) & bad, self._step + 1, first))

    def observe_loss(self, loss: torch.Tensor) -> None:
        self._mark(self._first_loss, loss)

    def observe_grad_norm(self, grad_norm: torch.Tensor) -> None:
        self._mark(self._first_grad, grad_norm)

    def step_done(self) -> None:
        self._step.add_(1)

    def check(self, accelerator=None, *, last_checkpoint: Optional[str] = None, learning_rate: float = 0.0) -> None:
        """Raises :class:`NonFiniteError` if any step so far had a non-finite loss or gradient norm (one sync)."""
        both = torch.stack([self._first_loss, self._first_grad])
        if accelerator is not None and accelerator.num_processes > 1:
            both = accelerator.reduce(both, reduction="max")  # every process stops together
        first_loss, first_grad = (int(v) for v in both.tolist())
        if first_loss < 0 and first_grad < 0:
            return
        if first_loss >= 0 and (first_grad < 0 or first_loss <= first_grad):
            what, step = "the loss", first_loss
        else:
            what, step = "the gradient norm", first_grad
        saved = (f"the last checkpoint written before it is {last_checkpoint}" if last_checkpoint
                 else "no checkpoint was written")
        raise NonFiniteError(
            f"step {step}: {what} is not finite (NaN or inf); the run stops and nothing is saved from step {step} "
            f"on ({saved}). Likely causes: a learning rate too high for this model (training.learning_rate = "
            f"{learning_rate:g}) or no gradient clipping (training.max_grad_norm), fp16 overflow "
            "(training.mixed_precision: bf16 or no), an objective hyperparameter at an extreme value, or an "
            "empty/degenerate batch"
        )
