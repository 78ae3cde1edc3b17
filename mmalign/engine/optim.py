"""The optimizer (fused AdamW when the parameters allow it) and the learning-rate schedules of the training loop."""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Sequence

import torch

logger = logging.getLogger("mmalign.engine")

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


def build_adamw(params: Sequence[torch.nn.Parameter], cfg) -> torch.optim.AdamW:
    """AdamW over ``params`` with the training config's hyperparameters; no weight decay on vectors (biases,
    norms); torch's fused kernel when :func:`fused_adamw_blocker` allows it (warned once otherwise)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    if cfg.weight_decay == 0.0:  # one group: one fused kernel call per step instead of two, the same update
        # (matrices, then vectors: the order of the two groups, so older checkpoints map onto it, checkpoints.py)
        groups = [{"params": decay + no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
    kwargs = {}
    blocker = fused_adamw_blocker(params)
    if blocker is None:
        # one kernel over all parameters (CPU too: 4x faster than the per-tensor loop, the CPU default)
        kwargs["fused"] = True
    elif params:
        logger.warning("fast path fused AdamW not taken: %s", blocker)
    return torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, **kwargs
    )
