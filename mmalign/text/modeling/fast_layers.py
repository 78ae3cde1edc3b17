"""Faster, numerically equivalent forwards for layers that dominate small-model training on CPU.

Both swap module *behaviour* only: configs, parameters, saved weights and adapters are unchanged, and each is
tested to give the same outputs and gradients as the code it replaces (up to float rounding).

- :func:`fuse_activations` — transformers' Python tanh-GELUs (GPT-2 family) become torch's fused tanh-GELU, and
  SiLU-gated MLPs keep one activation fewer for backward (:mod:`mmalign.text.modeling.gated_mlp`).
- :func:`use_direct_lora_forward` — peft LoRA ``Linear`` layers run as base + one in-place ``addmm_``.
"""
from __future__ import annotations

import types
from typing import Any

import torch

from mmalign.text.modeling.fallbacks import lora_fallback
from mmalign.text.modeling.gated_mlp import use_lean_gated_mlps

__all__ = ["fuse_activations", "use_direct_lora_forward", "is_python_tanh_gelu", "is_direct_lora_forward"]

# transformers' Python-level tanh-approximate GELUs (GPT-2, GPT-J, GPT-Neo, CodeGen, Phi-1/2: "gelu_new",
# "gelu_fast", "gelu_python_tanh") compute 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) in ~8 elementwise ops forward
# and more backward; torch's GELU(approximate="tanh") is the same function in one fused kernel. (Computing it as
# x·σ(2u) with a hand-written backward is faster in isolation on one CPU thread but was 4-9 % slower per DPO step,
# measured; not used.)
_PYTHON_TANH_GELUS = ("NewGELUActivation", "FastGELUActivation")


def fuse_activations(model: torch.nn.Module) -> int:
    """Replaces Python-level tanh-GELU modules by ``torch.nn.GELU(approximate="tanh")`` (the same function, float
    rounding aside; forward + backward on CPU about half the Python version's time); returns how many
    were replaced. SiLU-gated MLPs (Llama family) get the forward that keeps one activation fewer for backward
    (:func:`mmalign.text.modeling.gated_mlp.use_lean_gated_mlps`). Only module objects and their forwards change:
    the config and the saved weights do not."""
    use_lean_gated_mlps(model)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_python_tanh_gelu(child):
                setattr(parent, name, torch.nn.GELU(approximate="tanh"))
                replaced += 1
    return replaced


def is_python_tanh_gelu(module: torch.nn.Module) -> bool:
    """Whether ``module`` is one of transformers' Python-level tanh-GELUs (what :func:`fuse_activations` replaces)."""
    return type(module).__name__ in _PYTHON_TANH_GELUS or (
        type(module).__name__ == "GELUTanh" and getattr(module, "act", None) == getattr(module, "_gelu_tanh_python", ()))


def _peft_forward(layer, reason: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's own forward for a call the direct forward does not cover; counted and warned once per reason."""
    lora_fallback(reason)
    return type(layer).forward(layer, x, *args, **kwargs)


def _base_has_hooks(base: torch.nn.Module) -> bool:
    return bool(base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__)


def _direct_lora_linear_forward(layer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's ``lora.Linear.forward`` in three BLAS calls on 2-D views for the common case:
    ``y = x Wᵀ + b`` (the base layer's own weights), ``h = dropout(x) Aᵀ``, then ``y += scaling · h Bᵀ`` accumulated
    in place by ``addmm_``. On CPU, peft's separate ``B(h)``, ``· scaling`` and ``+`` (two fresh activation-sized
    tensors) are most of LoRA's extra forward time, and accumulating into a non-view output keeps the backward as
    cheap as peft's.

    Taken only when it is exactly peft's function: one active plain adapter (no DoRA or other variant, no LoRA
    bias), not merged, no extra arguments, a hook-free ``nn.Linear``/``Conv1D`` base, every dtype equal and no
    autocast. Everything else — including any change of adapter state during training — goes through peft's own
    forward."""
    base = layer.base_layer
    if args or kwargs:
        return _peft_forward(layer, "extra forward arguments", x, *args, **kwargs)
    if layer.merged_adapters or _base_has_hooks(base):
        return _peft_forward(layer, "merged adapter" if layer.merged_adapters else "hooks on the base layer", x)
    if layer._disable_adapters:
        return base(x)
    active_adapters = layer.active_adapters
    active = active_adapters[0] if len(active_adapters) == 1 else None
    if active is None or active in layer.lora_variant or active not in layer.lora_A:
        why = (f"{len(active_adapters)} active adapters" if active is None else
               "adapter variant (DoRA, ...)" if active in layer.lora_variant else "no LoRA weights for the active adapter")
        return _peft_forward(layer, why, x)
    if torch.is_autocast_enabled(x.device.type):
        return _peft_forward(layer, "autocast", x)
    lora_a, lora_b = layer.lora_A[active], layer.lora_B[active]
    if lora_b.bias is not None or not (x.dtype == lora_a.weight.dtype == lora_b.weight.dtype == base.weight.dtype):
        return _peft_forward(layer, "LoRA bias" if lora_b.bias is not None else "mixed dtypes", x)
    flat = x.reshape(-1, x.shape[-1])
    if type(base) is torch.nn.Linear:
        result = torch.nn.functional.linear(flat, base.weight, base.bias)
    else:  # transformers' Conv1D: weight [in, out], bias always present
        result = torch.addmm(base.bias, flat, base.weight)
    dropout = layer.lora_dropout[active]
    lora_input = flat if isinstance(dropout, torch.nn.Identity) else dropout(flat)
    result.addmm_(lora_input @ lora_a.weight.t(), lora_b.weight.t(), alpha=layer.scaling[active])
    return result.view(*x.shape[:-1], result.shape[-1])


def use_direct_lora_forward(model: torch.nn.Module) -> int:
    """Gives every peft LoRA ``Linear`` layer over a plain ``nn.Linear``/``Conv1D`` of ``model``
    :func:`_direct_lora_linear_forward` (same function and gradients up to float rounding; a LoRA DPO step on a
    0.6M-parameter GPT-2 is ~10 % faster on CPU, bench/RESULTS.md); returns how many layers. The weights, the saved adapter and
    peft's API are unchanged."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for module in model.modules():
        # exact types: subclasses (quantised layers, custom bases) keep peft's forward
        if type(module) is LoraLinear and type(module.base_layer) in (torch.nn.Linear, Conv1D):
            module.forward = types.MethodType(_direct_lora_linear_forward, module)
            replaced += 1
    return replaced


def is_direct_lora_forward(module: torch.nn.Module) -> bool:
    """Whether ``module`` runs :func:`_direct_lora_linear_forward` (given by :func:`use_direct_lora_forward`)."""
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _direct_lora_linear_forward
