"""The sharded held-out evaluation both backends run during training: one loop, each backend supplying only its
forward on a batch.

Every process evaluates its shard of the data (the loader goes through ``accelerator.prepare``, once: accelerate
keeps a reference to every prepared loader); each batch's metric tensors are summed on the device, and ONE
collective reduces them at the end, so an evaluation costs one host sync whatever its length. An evaluation
consumes nothing of the global RNG, so a run's training draws are those of the same run without evaluation.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Mapping, Optional, Protocol

import torch

__all__ = ["EvaluationPass", "ShardedEvaluation"]


class EvaluationPass(Protocol):
    """One evaluation over the held-out data, built afresh for each evaluation (it may accumulate state)."""

    def batch(self, model: torch.nn.Module, batch: Any) -> Mapping[str, torch.Tensor]:
        """The backend's forward on one batch: 0-dim metric tensors (summed over batches on the device)."""

    def result(self, reduced: dict[str, float], accelerator: Any) -> dict[str, float]:
        """The logged metrics from the reduced values (see :class:`ShardedEvaluation`'s ``reduction``)."""


class ShardedEvaluation:
    """``evaluate(model) -> dict[str, float]`` for :class:`~mmalign.engine.trainer.Trainer`.

    Args:
        trainer: the trainer whose ``accelerator`` shards the data and reduces the metrics.
        dataset, collate_fn, batch_size: the held-out data, in order (no shuffling).
        new_pass: ``() -> EvaluationPass`` for each evaluation.
        reduction: ``"mean"``: each metric's mean over a process's batches, then the mean across processes (the
            per-batch means of a loss); ``"sum"``: the sums over every batch of every process (counts and totals,
            which the pass's ``result`` turns into ratios).
    """

    def __init__(self, trainer: Any, dataset: Any, collate_fn: Callable[[list], Any], batch_size: int,
                 new_pass: Callable[[], EvaluationPass], *, reduction: Literal["mean", "sum"] = "mean"):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
        self.trainer = trainer
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.new_pass = new_pass
        self.reduction = reduction
        self._loader: Optional[Any] = None

    def loader(self) -> Any:
        if self._loader is None:
            # A private generator: a DataLoader draws a base seed per iterator from the global RNG otherwise, and an
            # evaluation would shift the training's later random draws (dropout, noise) against a run without it.
            loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False,
                                                 collate_fn=self.collate_fn, generator=torch.Generator())
            self._loader = self.trainer.accelerator.prepare(loader)
        return self._loader

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        acc = self.trainer.accelerator
        evaluation = self.new_pass()
        sums: dict[str, torch.Tensor] = {}
        batches = 0
        for batch in self.loader():
            for name, value in evaluation.batch(model, batch).items():
                sums[name] = sums.get(name, 0) + value.float()
            batches += 1
        names = sorted(sums)
        reduced: dict[str, float] = {}
        if names:
            if self.reduction == "mean":
                stacked = torch.stack([sums[n] / max(1, batches) for n in names])
            else:
                stacked = torch.stack([sums[n] for n in names])
            if acc.num_processes > 1:
                stacked = acc.reduce(stacked, reduction=self.reduction)
            reduced = dict(zip(names, stacked.tolist()))
        return evaluation.result(reduced, acc)
