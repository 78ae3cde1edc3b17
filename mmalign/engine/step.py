"""What a backend's ``compute_loss`` returns to the engine for one micro-batch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class StepOutput:
    """What ``compute_loss`` returns for one micro-batch.

    ``loss`` is the scalar to back-propagate; ``metrics`` are scalars (0-dim tensors preferred: they are averaged
    on device without a sync); ``num_tokens`` is the number of tokens processed (for tokens/s), a host int.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
    num_tokens: Optional[int] = None
