"""RMSNorm forward + backward as one autograd function on CPU (``model.fused_activations``).

transformers' Llama-family RMSNorm, ``w · x · rsqrt(mean(x²) + ε)``, is six tensor operations in forward, and
autograd differentiates each one: about ten [tokens, hidden] passes in backward. On a 2-core CPU every such
pass costs a thread wake-up beside its arithmetic, so the norm's forward + backward on one SmolLM2 layer's
[544, 576] took 1.9 ms against 0.7 ms as one function (measured). :class:`RMSNormFunction` keeps the input and
the [tokens, 1] reciprocal root for backward, and computes

    dx = r · (g ⊙ w) − x · r³ · ⟨g ⊙ w, x⟩ / H,        dw = Σ_rows g ⊙ x · r      (only when w trains)

The forward runs transformers' operations in their order (the product with ``w`` is commutative per element),
so outputs are bit-identical to the module's own; gradients agree to float rounding (tested against float64).
Applies to float32 CPU tensors outside autocast (transformers computes other dtypes in float32 and casts back);
anything else runs the module's own forward.
"""
from __future__ import annotations

import types

import torch
from torch.autograd.function import once_differentiable

__all__ = ["RMSNormFunction", "rms_norm", "use_fused_rms_norms", "is_fused_rms_norm", "RMS_NORM_CLASSES"]

# transformers' RMSNorm classes whose forward is w · x · rsqrt(mean(x²) + ε) in float32 (not Gemma's 1 + w)
RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
USE_FUSED_FORWARD = True  # module switch for in-process A/B measurements (bench/ab_step.py --change fused_norm_rope)


def _normalised(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, r) with r = rsqrt(mean(x²) + ε) [..., 1], in transformers' operation order."""
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return torch.mul(x, r).mul_(weight), r


class RMSNormFunction(torch.autograd.Function):
    """``w · x · rsqrt(mean(x²) + ε)`` over the last dimension, saving ``x``, ``w`` and the [..., 1] root."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, r = _normalised(x, weight, eps)
        ctx.save_for_backward(x, weight, r)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_w_scaled = grad * weight
            dot = torch.linalg.vecdot(grad_w_scaled, x, dim=-1).unsqueeze(-1)
            coefficient = dot.mul_(r.pow(3)).div_(-x.shape[-1])
            grad_x = grad_w_scaled.mul_(r).addcmul_(x, coefficient)
        if ctx.needs_input_grad[1]:
            grad_w = torch.mul(x, r).mul_(grad).sum(tuple(range(grad.dim() - 1)))
        return grad_x, grad_w, None


def fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (USE_FUSED_FORWARD and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == x.dtype
            and weight.device.type == "cpu" and not torch.is_autocast_enabled("cpu"))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The RMSNorm of ``x``; as :class:`RMSNormFunction` when gradients are recorded."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return RMSNormFunction.apply(x, weight, eps)
    return _normalised(x, weight, eps)[0]


def _fused_rms_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if fusable(hidden_states, self.weight):
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def use_fused_rms_norms(model: torch.nn.Module) -> int:
    """Gives every Llama-family RMSNorm of ``model`` (no forward of its own set) the fused forward; returns how
    many. Weights and config are unchanged."""
    replaced = 0
    for module in model.modules():
        if (type(module).__name__ in RMS_NORM_CLASSES and "forward" not in module.__dict__
                and isinstance(getattr(module, "weight", None), torch.Tensor)
                and isinstance(getattr(module, "variance_epsilon", None), float)):
            module.forward = types.MethodType(_fused_rms_forward, module)
            replaced += 1
    return replaced


def is_fused_rms_norm(module: torch.nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _fused_rms_forward
