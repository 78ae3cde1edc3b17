"""Held-out evaluation of a diffusion preference model: the training objective's loss and metrics on ``data.eval``
(or ``eval_dataset=``), through the engine's sharded loop (:class:`~mmalign.engine.evaluation.ShardedEvaluation`).

The surrogate is a one-sample Monte-Carlo estimate (one timestep and one noise per group, SPEC §7), so each batch
draws its timesteps, noise and VAE samples from a generator seeded by the batch's position: every evaluation of a
run sees the same draws, the numbers are comparable across steps, and the training RNG stream is left untouched.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from mmalign.engine.evaluation import ShardedEvaluation
from mmalign.engine.step import StepOutput

__all__ = ["HeldOutPass", "held_out_evaluation"]


class HeldOutPass:
    """One held-out evaluation: ``compute_loss`` (the training step's forward, objective and metrics) per batch
    under fixed per-batch draws."""

    def __init__(self, trainer: Any, compute_loss: Callable[[torch.nn.Module, Any], StepOutput], seed: int):
        self.trainer = trainer
        self.compute_loss = compute_loss
        self.seed = seed
        self.index = 0

    def batch(self, model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        acc = self.trainer.accelerator
        devices = [acc.device] if acc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + self.index * acc.num_processes + acc.process_index)
            step = self.compute_loss(model, batch)
        self.index += 1
        metrics = {name: value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                   for name, value in step.metrics.items()}
        return {"loss": step.loss.detach(), **{name: value.detach() for name, value in metrics.items()}}

    def result(self, reduced: Mapping[str, float], accelerator: Any) -> dict[str, float]:
        return dict(reduced)


def held_out_evaluation(trainer: Any, dataset: Any, collate_fn: Callable, batch_size: int,
                        compute_loss: Callable[[torch.nn.Module, Any], StepOutput], *, seed: int) -> ShardedEvaluation:
    """``evaluate(model) -> metrics`` over ``dataset`` with the training objective (see the module docstring)."""
    return ShardedEvaluation(trainer, dataset, collate_fn, batch_size, lambda: HeldOutPass(trainer, compute_loss, seed))
