"""The optimizer's fast-path check and the learning-rate schedules of the training loop."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

# parameter dtypes torch's fused AdamW kernel takes (CPU and CUDA)
_FUSED_ADAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)



def fused_adamw_blocker(params: Sequence[torch.nn.Parameter]) -> Optional[str]:
    """Why torch's fused AdamW cannot take ``params`` (None: it can): it needs CPU/CUDA floating-point tensors."""
    if not params:
        return "no trainable parameters"
    odd = sorted({f"{p.device.type}/{str(p.dtype).replace('torch.', '')}" for p in params
                  if p.device.type not in ("cpu", "cuda") or p.dtype not in _FUSED_ADAM_DTYPES})
    return f"parameters on {', '.join(odd)} (the fused kernel takes CPU/CUDA floating point)" if odd else None


def lr_lambda(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def schedule(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return schedule
