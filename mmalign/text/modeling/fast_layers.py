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
from mmalign.text.modeling.lora_parts import DIRECT_FORWARD_MARK, lora_parts, runs_direct_forward

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


def _direct_lora_linear_forward(layer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's ``lora.Linear.forward`` in three BLAS calls on 2-D views for the common case:
    ``y = x Wᵀ + b`` (the base layer's own weights), ``h = dropout(x) Aᵀ``, then ``y += scaling · h Bᵀ`` accumulated
    in place by ``addmm_``. On CPU, peft's separate ``B(h)``, ``· scaling`` and ``+`` (two fresh activation-sized
    tensors) are most of LoRA's extra forward time, and accumulating into a non-view output keeps the backward as
    cheap as peft's.

    Taken only when it is exactly peft's function (:func:`mmalign.text.modeling.lora_parts.lora_parts`: one active
    plain adapter, not merged, no extra arguments, a hook-free ``nn.Linear``/``Conv1D`` base, every dtype equal, no
    autocast). Everything else — including any change of adapter state during training — goes through peft's own
    forward."""
    if args or kwargs:
        return _peft_forward(layer, "extra forward arguments", x, *args, **kwargs)
    parts = lora_parts(layer, x)
    if isinstance(parts, str):
        return _peft_forward(layer, parts, x)
    if parts.lora_a is None:  # adapter disabled
        return layer.base_layer(x)
    flat = x.reshape(-1, x.shape[-1])
    if type(layer.base_layer) is torch.nn.Linear:
        result = torch.nn.functional.linear(flat, parts.weight, parts.bias)
    else:  # transformers' Conv1D: weight [in, out], bias always present
        result = torch.addmm(parts.bias, flat, parts.weight)
    lora_input = flat if isinstance(parts.dropout, torch.nn.Identity) else parts.dropout(flat)
    result.addmm_(lora_input @ parts.lora_a.t(), parts.lora_b.t(), alpha=parts.scaling)
    return result.view(*x.shape[:-1], result.shape[-1])


setattr(_direct_lora_linear_forward, DIRECT_FORWARD_MARK, True)


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
    return runs_direct_forward(module)
