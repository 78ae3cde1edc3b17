"""The SiLU-gated MLP (Llama, Mistral, Qwen2/3: ``down(silu(gate(x)) · up(x))``) with one activation fewer kept for
backward.

Autograd keeps three [tokens, intermediate] tensors of the gate for backward: ``gate(x)`` (for SiLU's gradient),
``silu(gate(x))`` and ``up(x)`` (for the product's), besides the product itself (the down projection's input).
:class:`SiluMul` keeps only ``gate(x)`` and ``up(x)`` and recomputes ``silu`` in backward (one fused elementwise
kernel; the gate's gradient still comes from torch's fused ``silu_backward``). On SmolLM2-135M that is 96 MiB less
kept per forward of 8 prompt + 16 response rows (544 tokens × 1536 × 30 layers), for one extra elementwise pass
over the gate in backward. The function and its gradients are the same numbers (the same kernels, tested).

The product ``h = silu(gate)·up`` is kept too when the down projection needs it for a weight gradient: by a LoRA
adapter's ``A`` (``h Aᵀ``) or a trained weight. :class:`SiluGatedDown` runs ``down(silu(gate)·up)`` in one function
that keeps only ``gate``, ``up`` and the [tokens, r] LoRA product, and recomputes ``h`` in backward from the
``silu(gate)`` it needs anyway (one extra elementwise multiply): another 96 MiB less on the SmolLM2 batch above. Its
backward runs the matrix products of the plain layers in the same layouts (autograd's for the base, those of
:class:`~mmalign.engine.lora_function.LoraLinearFunction` for the LoRA adapter), so outputs and gradients are
bit-identical to the plain layers' (tested) wherever the plain LoRA layer runs that function (a trained adapter over
a frozen base, the usual case); elsewhere they agree up to float rounding. Taken when the down projection is a
hook-free ``nn.Linear``, or a peft LoRA layer running the direct forward with no LoRA dropout; otherwise it is
counted, warned once, and the plain path runs.
"""
from __future__ import annotations

import types

from typing import Optional, Union

import torch
import torch.nn.functional as F

from mmalign.engine.lora_function import lora_gradients
from mmalign.text.modeling.fallbacks import fast_path_taken, warn_not_taken
from mmalign.text.modeling.lora_parts import LoraParts, base_has_hooks, lora_parts, runs_direct_forward

__all__ = ["SiluMul", "SiluGatedDown", "silu_mul", "use_lean_gated_mlps", "is_lean_gated_mlp", "GATED_MLP_CLASSES",
           "RECOMPUTED_DOWN_INPUT"]

RECOMPUTED_DOWN_INPUT = "gated MLP down-projection input recomputed"  # the fast path's name (counts, warnings)

# transformers' MLP classes whose forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``
GATED_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
_SILU_MODULES = ("SiLU", "SiLUActivation")


class SiluMul(torch.autograd.Function):
    """``silu(gate) * up``, saving only ``gate`` and ``up`` for backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SiluMul.apply(gate, up)
    return F.silu(gate) * up


class SiluGatedDown(torch.autograd.Function):
    """``y = h Wᵀ + b [+ scaling · (h Aᵀ) Bᵀ]`` with ``h = silu(gate)·up``, keeping ``gate``, ``up`` and ``h Aᵀ``
    for backward, not ``h``. Forward and backward are the plain layers' operations in the same order and layouts."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_a, lora_b, scaling: float):
        h = F.silu(gate).mul_(up)
        flat = h.reshape(-1, h.shape[-1])
        y = F.linear(flat, weight, bias)
        lora_h = None
        if lora_a is not None:
            lora_h = F.linear(flat, lora_a)
            y.addmm_(lora_h, lora_b.t(), alpha=scaling)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        ctx.save_for_backward(gate, up, weight, lora_a, lora_b, lora_h)
        return y.view(*h.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up, weight, lora_a, lora_b, lora_h = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad.reshape(-1, grad.shape[-1]).contiguous()
        silu = F.silu(gate)
        flat_h = (silu * up).reshape(grad.shape[0], -1) if need[2] or need[4] else None
        grad_h = grad.mm(weight)  # what F.linear's backward computes for its input
        grad_weight = grad.t().mm(flat_h) if need[2] else None
        grad_bias = grad.sum(0) if ctx.has_bias and need[3] else None
        grad_a = grad_b = None
        if lora_a is not None:  # the LoRA products as the direct LoRA forward's autograd function runs them
            grad_lora_h, grad_a, grad_b = lora_gradients(grad, flat_h, lora_a, lora_b, lora_h, ctx.scaling, need[4],
                                                         need[5])
            grad_h.addmm_(grad_lora_h, lora_a)
        grad_h = grad_h.view(gate.shape)
        grad_gate = torch.ops.aten.silu_backward(grad_h * up, gate) if need[0] else None
        grad_up = grad_h * silu if need[1] else None
        return grad_gate, grad_up, grad_weight, grad_bias, grad_a, grad_b, None


def _down_parts(down: torch.nn.Module, x: torch.Tensor) -> Union[LoraParts, str]:
    """The down projection's tensors for :class:`SiluGatedDown`, or why it keeps its own forward."""
    if type(down) is torch.nn.Linear:
        return "hooks on down_proj" if base_has_hooks(down) else LoraParts(down.weight, down.bias, None, None, 1.0, None)
    if not runs_direct_forward(down):
        return f"down_proj is a {type(down).__name__} without the direct LoRA forward"
    if type(down.base_layer) is not torch.nn.Linear:
        return f"down_proj's LoRA base is a {type(down.base_layer).__name__}"
    parts = lora_parts(down, x)
    if not isinstance(parts, str) and parts.dropout is not None and not isinstance(parts.dropout, torch.nn.Identity):
        return "LoRA dropout on down_proj (its mask would have to be kept)"
    return parts


def _lean_gated_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        parts: Optional[Union[LoraParts, str]] = _down_parts(self.down_proj, gate)
        if isinstance(parts, str):
            warn_not_taken(RECOMPUTED_DOWN_INPUT, f"{parts}; silu(gate)·up is kept for backward")
        else:
            fast_path_taken(RECOMPUTED_DOWN_INPUT)
            return SiluGatedDown.apply(gate, up, parts.weight, parts.bias, parts.lora_a, parts.lora_b, parts.scaling)
    return self.down_proj(silu_mul(gate, up))


def use_lean_gated_mlps(model: torch.nn.Module) -> int:
    """Gives every SiLU-gated MLP of ``model`` (transformers' Llama/Mistral/Qwen2/Qwen3 MLP with a plain SiLU,
    no hooks on it) the forward :func:`_lean_gated_forward`; returns how many. Weights and config are unchanged."""
    replaced = 0
    for module in model.modules():
        act = getattr(module, "act_fn", None)
        if (type(module).__name__ in GATED_MLP_CLASSES and type(act).__name__ in _SILU_MODULES
                and not (act._forward_hooks or act._forward_pre_hooks or "forward" in act.__dict__)
                and all(isinstance(getattr(module, n, None), torch.nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))):
            module.forward = types.MethodType(_lean_gated_forward, module)
            replaced += 1
    return replaced


def is_lean_gated_mlp(module: torch.nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _lean_gated_forward
