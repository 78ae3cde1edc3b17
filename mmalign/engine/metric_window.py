"""Metric sums over one logging window, kept on device and checkpointed per process."""
from __future__ import annotations

from typing import Any, Mapping

import torch

WINDOW_STATE_NAME = "metric_window_{}.json"


class MetricWindow:
    """Running sums of metric tensors over a logging window, kept on device (no sync until ``reduce``)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().float()
        previous = self.sums.get(name)
        self.sums[name] = value if previous is None else previous + value
        self.counts[name] = self.counts.get(name, 0) + 1

    def __bool__(self) -> bool:
        return bool(self.sums)

    def state(self) -> dict[str, Any]:
        return {
            "sums": {k: float(v) for k, v in self.sums.items()},
            "counts": dict(self.counts),
        }

    def load(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.sums = {k: torch.tensor(v, device=device) for k, v in state.get("sums", {}).items()}
        self.counts = dict(state.get("counts", {}))

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()
