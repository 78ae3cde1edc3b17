"""The direct LoRA forward, shared by both backends: a peft LoRA ``Linear`` over a plain ``nn.Linear`` (or
transformers' ``Conv1D``) runs as base + one in-place ``addmm_`` (``lora.direct_forward``; the text models'
projections, the image backbones' attention projections).

- :func:`lora_parts` — when a peft LoRA layer can run as plain tensor algebra, and with which tensors (also used by
  the text side's gated MLP and lean decoder, so every caller takes exactly the same cases and gives the same
  reasons for the others).
- :func:`use_direct_lora_forward` — gives the layers of a model :func:`direct_lora_linear_forward`.

Model-free: peft and transformers are imported only inside :func:`use_direct_lora_forward`. Moved here from
``mmalign.text.modeling`` (``lora_parts``, ``fast_layers``), which re-export the old names.
"""
from __future__ import annotations

import types
from typing import Any, NamedTuple, Optional, Union

import torch

from mmalign.engine.fast_path_log import lora_fallback
from mmalign.engine.lora_function import lora_linear

__all__ = ["LoraParts", "lora_parts", "base_has_hooks", "DIRECT_FORWARD_MARK", "runs_direct_forward",
           "direct_lora_linear_forward", "use_direct_lora_forward", "lora_layer_count"]

# set on the direct LoRA forward function, so modules can recognise it without comparing functions
DIRECT_FORWARD_MARK = "mmalign_direct_lora_forward"

# False runs the direct forward under plain autograd (the A/B benches' old side); the library keeps it True
USE_LORA_FUNCTION = True


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


def _peft_forward(layer, reason: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's own forward for a call the direct forward does not cover; counted and warned once per reason."""
    lora_fallback(reason)
    return type(layer).forward(layer, x, *args, **kwargs)


def direct_lora_linear_forward(layer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's ``lora.Linear.forward`` in three BLAS calls on 2-D views for the common case:
    ``y = x Wᵀ + b`` (the base layer's own weights), ``h = dropout(x) Aᵀ``, then ``y += scaling · h Bᵀ`` accumulated
    in place by ``addmm_``. On CPU, peft's separate ``B(h)``, ``· scaling`` and ``+`` (two fresh activation-sized
    tensors) are most of LoRA's extra forward time. When the adapter is trained over a frozen base, the three calls
    run as one autograd function (:mod:`mmalign.engine.lora_function`: its backward in faster layouts); otherwise
    (no grad, a trained base) as plain calls under autograd.

    Taken only when it is exactly peft's function (:func:`lora_parts`: one active plain adapter, not merged, no
    extra arguments, a hook-free ``nn.Linear``/``Conv1D`` base, every dtype equal, no autocast). Everything else —
    including any change of adapter state during training — goes through peft's own forward."""
    if args or kwargs:
        return _peft_forward(layer, "extra forward arguments", x, *args, **kwargs)
    parts = lora_parts(layer, x)
    if isinstance(parts, str):
        return _peft_forward(layer, parts, x)
    if parts.lora_a is None:  # adapter disabled
        return layer.base_layer(x)
    flat = x.reshape(-1, x.shape[-1])
    weight_in_out = type(layer.base_layer) is not torch.nn.Linear  # transformers' Conv1D: weight [in, out]
    if getattr(parts.dropout, "inplace", False):  # would overwrite the base layer's input (peft never builds one)
        return _peft_forward(layer, "in-place LoRA dropout", x)
    lora_input = flat if isinstance(parts.dropout, torch.nn.Identity) else parts.dropout(flat)
    if USE_LORA_FUNCTION:
        result = lora_linear(flat, None if lora_input is flat else lora_input, parts.weight, parts.bias,
                             parts.lora_a, parts.lora_b, parts.scaling, weight_in_out)
        if result is not None:
            return result.view(*x.shape[:-1], result.shape[-1])
    if not weight_in_out:
        result = torch.nn.functional.linear(flat, parts.weight, parts.bias)
    else:  # Conv1D's bias is always present
        result = torch.addmm(parts.bias, flat, parts.weight)
    result.addmm_(lora_input @ parts.lora_a.t(), parts.lora_b.t(), alpha=parts.scaling)
    return result.view(*x.shape[:-1], result.shape[-1])


setattr(direct_lora_linear_forward, DIRECT_FORWARD_MARK, True)


def _direct_bases() -> tuple[type, ...]:
    try:  # transformers' Conv1D (GPT-2 family); absent from diffusers-only models
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return (torch.nn.Linear,)
    return (torch.nn.Linear, Conv1D)


def use_direct_lora_forward(model: torch.nn.Module) -> int:
    """Gives every peft LoRA ``Linear`` layer over a plain ``nn.Linear``/``Conv1D`` of ``model``
    :func:`direct_lora_linear_forward` (same function and gradients up to float rounding; a LoRA DPO step on a
    0.6M-parameter GPT-2 is ~10 % faster on CPU, bench/RESULTS.md); returns how many layers. The weights, the saved
    adapter and peft's API are unchanged."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    bases = _direct_bases()
    replaced = 0
    for module in model.modules():
        # exact types: subclasses (quantised layers, custom bases) keep peft's forward
        if type(module) is LoraLinear and type(module.base_layer) in bases:
            module.forward = types.MethodType(direct_lora_linear_forward, module)
            replaced += 1
    return replaced


def lora_layer_count(model: torch.nn.Module) -> int:
    """How many peft LoRA layers (any kind: Linear, Conv2d, ...) ``model`` has."""
    from peft.tuners.lora.layer import LoraLayer

    return sum(isinstance(module, LoraLayer) for module in model.modules())
