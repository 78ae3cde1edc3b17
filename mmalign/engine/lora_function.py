"""One autograd function for a LoRA linear layer over a frozen base: ``y = x Wᵀ + b + s · (d(x) Aᵀ) Bᵀ``.

Autograd over the direct forward's three BLAS calls (``addmm``, ``mm``, ``addmm_``) records four nodes per layer
and, in backward, runs the LoRA products in the layouts the forward happened to use: ``A``'s gradient as
``xᵀ · dh`` ([in, N] × [N, r], a skinny product that MKL runs at a small fraction of its peak on CPU) and the
input's gradient as two activation-sized tensors summed by a separate ``add``. :class:`LoraLinearFunction`
computes the same gradients with the skinny products in their fast layouts (``dhᵀ · x``, ``dy · B`` with B
row-major in r) and accumulates the LoRA part of the input gradient into the base part with one in-place
``addmm_``. On the benchmark's tiny GPT-2 layer shapes (1088 tokens, r = 8) one layer's forward + backward is
1.1–1.4× faster (bench/RESULTS.md, session 16). The numbers are the same function and gradients up to float
rounding (tested against peft's forward).

Only for training the adapter over a frozen base (``A`` or ``B`` trained, neither ``W`` nor ``b``: LoRA's usual
case); the caller keeps autograd otherwise (a frozen adapter: the function would keep its input for nothing).
Its backward is ``once_differentiable`` (no double backward / ``create_graph``, no forward-mode AD), which no
preference objective here needs. Under activation checkpointing the taken-count (:data:`LORA_FUNCTION`) counts
the recomputed forwards too.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mmalign.engine.fast_path_log import fast_path_taken, warn_not_taken

__all__ = ["LoraLinearFunction", "lora_linear", "lora_gradients", "LORA_FUNCTION"]

LORA_FUNCTION = "lora.autograd_function"  # the fast path's name (counts, warnings)


class LoraLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b + scaling · (lora_x Aᵀ) Bᵀ`` on 2-D ``x`` [N, in]. ``weight`` is ``nn.Linear``'s [out, in],
    or transformers' ``Conv1D`` [in, out] when ``weight_in_out``. ``lora_x`` is the LoRA dropout's output, or None
    when the dropout is the identity (then ``x`` itself, and the input gradient is accumulated in place)."""

    @staticmethod
    def forward(ctx, x, lora_x, weight, bias, lora_a, lora_b, scaling: float, weight_in_out: bool):
        if weight_in_out:
            y = torch.addmm(bias, x, weight) if bias is not None else torch.mm(x, weight)
        else:
            y = F.linear(x, weight, bias)
        lora_input = x if lora_x is None else lora_x
        lora_h = F.linear(lora_input, lora_a)  # [N, r]
        y.addmm_(lora_h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(lora_input, weight, lora_a, lora_b, lora_h)
        ctx.scaling, ctx.weight_in_out, ctx.separate_lora_input = scaling, weight_in_out, lora_x is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        lora_input, weight, lora_a, lora_b, lora_h = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad.contiguous()
        grad_h, grad_a, grad_b = lora_gradients(grad, lora_input, lora_a, lora_b, lora_h, ctx.scaling, need[4], need[5])
        grad_x = grad_lora_x = None
        if need[0]:
            grad_x = torch.mm(grad, weight.t() if ctx.weight_in_out else weight)
            if not ctx.separate_lora_input:
                grad_x.addmm_(grad_h, lora_a)
        if ctx.separate_lora_input and need[1]:
            grad_lora_x = torch.mm(grad_h, lora_a)
        return grad_x, grad_lora_x, None, None, grad_a, grad_b, None, None


def lora_gradients(grad: torch.Tensor, lora_input: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   lora_h: torch.Tensor, scaling: float, need_a: bool, need_b: bool):
    """The LoRA part of a linear layer's backward, given its output gradient ``grad`` [N, out] (contiguous):
    ``dh = s · grad B`` [N, r] (the caller adds ``dh A`` to the input gradient), ``dA = dhᵀ · lora_input`` and
    ``dB = s · (hᵀ grad)ᵀ``, each skinny product in its fast layout. Also the lean gated MLP's down projection
    (:mod:`mmalign.text.modeling.gated_mlp`), so both give the same bits."""
    # dh with B as a transposed view of its row-major-in-r copy (the faster layout)
    grad_h = torch.mm(grad, lora_b.t().contiguous().t())
    if scaling != 1.0:
        grad_h.mul_(scaling)
    grad_b = None
    if need_b:
        grad_b = torch.mm(lora_h.t(), grad).t().contiguous()
        if scaling != 1.0:
            grad_b.mul_(scaling)
    grad_a = torch.mm(grad_h.t(), lora_input) if need_a else None
    return grad_h, grad_a, grad_b


def lora_linear(x: torch.Tensor, lora_x: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, weight_in_out: bool) -> Optional[torch.Tensor]:
    """:class:`LoraLinearFunction` (counted as taken) when the adapter is trained and the base frozen, else None:
    the caller then runs its plain calls (a trained base is warned once: autograd runs it)."""
    if not torch.is_grad_enabled() or not (lora_a.requires_grad or lora_b.requires_grad):
        return None  # no adapter gradient wanted (a no-grad forward, a frozen adapter): the plain calls suffice
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        warn_not_taken(LORA_FUNCTION, "the LoRA layer's base weight or bias is trained; autograd runs the layer")
        return None
    fast_path_taken(LORA_FUNCTION)
    return LoraLinearFunction.apply(x, lora_x, weight, bias, lora_a, lora_b, scaling, weight_in_out)
