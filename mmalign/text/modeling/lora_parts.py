"""When a peft LoRA ``Linear`` can run as plain tensor algebra, and with which tensors. A leaf module (no mmalign
imports) shared by the direct LoRA forward (:mod:`mmalign.text.modeling.fast_layers`) and the gated MLP that
recomputes its down projection's input (:mod:`mmalign.text.modeling.gated_mlp`), so both take exactly the same
cases and give the same reasons for the others."""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

__all__ = ["LoraParts", "lora_parts", "base_has_hooks", "DIRECT_FORWARD_MARK", "runs_direct_forward"]

# set on the direct LoRA forward function, so modules that must not import fast_layers can recognise it
DIRECT_FORWARD_MARK = "mmalign_direct_lora_forward"


class LoraParts(NamedTuple):
    """``y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ``; ``lora_a`` is None when the adapter is disabled."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    lora_a: Optional[torch.Tensor]
    lora_b: Optional[torch.Tensor]
    scaling: float
    dropout: Optional[torch.nn.Module]


def base_has_hooks(base: torch.nn.Module) -> bool:
    return bool(base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__)


def lora_parts(layer, x: torch.Tensor) -> Union[LoraParts, str]:
    """The tensors of peft LoRA layer ``layer`` applied to ``x``, or why its own forward must run instead: one
    active plain adapter (no DoRA or other variant, no LoRA bias), not merged, a hook-free base, every dtype equal,
    no autocast. The base may be ``nn.Linear`` or transformers' ``Conv1D`` (weight [in, out]); the caller checks
    which it supports."""
    base = layer.base_layer
    if layer.merged_adapters or base_has_hooks(base):
        return "merged adapter" if layer.merged_adapters else "hooks on the base layer"
    if layer._disable_adapters:
        return LoraParts(base.weight, base.bias, None, None, 1.0, None)
    active_adapters = layer.active_adapters
    active = active_adapters[0] if len(active_adapters) == 1 else None
    if active is None or active in layer.lora_variant or active not in layer.lora_A:
        return (f"{len(active_adapters)} active adapters" if active is None else
                "adapter variant (DoRA, ...)" if active in layer.lora_variant else "no LoRA weights for the active adapter")
    if torch.is_autocast_enabled(x.device.type):
        return "autocast"
    lora_a, lora_b = layer.lora_A[active], layer.lora_B[active]
    if lora_b.bias is not None or not (x.dtype == lora_a.weight.dtype == lora_b.weight.dtype == base.weight.dtype):
        return "LoRA bias" if lora_b.bias is not None else "mixed dtypes"
    return LoraParts(base.weight, base.bias, lora_a.weight, lora_b.weight, layer.scaling[active], layer.lora_dropout[active])


def runs_direct_forward(module: torch.nn.Module) -> bool:
    """Whether ``module`` was given the direct LoRA forward (``lora.direct_forward``)."""
    forward = module.__dict__.get("forward")
    return getattr(getattr(forward, "__func__", None), DIRECT_FORWARD_MARK, False)
