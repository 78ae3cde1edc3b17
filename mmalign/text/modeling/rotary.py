"""Rotary position embedding as one autograd function on CPU, during mmalign's scoring forwards.

transformers applies RoPE as ``x·cos + rotate_half(x)·sin`` with ``rotate_half(x) = cat(−x₂, x₁)``: a negation,
a concatenation, two products and a sum in forward, and autograd's mirror of them (slice gradients filled with
zeros, then copied) in backward. On a 2-core CPU each pass costs a thread wake-up beside its arithmetic;
:class:`RotaryFunction` writes each half of the result straight into the output with a product and a fused
multiply-add (forward + backward of SmolLM2's query [8, 9, 68, 64]: 1.3 ms → 0.67 ms, measured):

    y₁ = x₁·cos₁ − x₂·sin₁,   y₂ = x₂·cos₂ + x₁·sin₂;    dx₁ = g₁·cos₁ + g₂·sin₂,   dx₂ = g₂·cos₂ − g₁·sin₁

The fused multiply-add rounds once where transformers rounds twice, so outputs differ from transformers' by
float rounding (tested against float64). The module function ``apply_rotary_pos_emb`` of the Llama-family
modeling modules is wrapped once; the wrapper takes this path only for float32/float64 CPU tensors while a
:func:`fused_rotary` block runs in the calling thread, and otherwise calls transformers' function, so other
forwards (another thread, a user's own) see transformers' code.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from typing import Iterator, Optional

import torch
from torch.autograd.function import once_differentiable

from mmalign.text.modeling.fallbacks import fast_path_taken, warn_not_taken

__all__ = ["RotaryFunction", "rotary", "fused_rotary", "enable_fused_rotary", "is_fused_rotary", "FUSED_ROTARY",
           "rotary_modules"]

FUSED_ROTARY = "rotary embedding as one function"
# the modeling modules whose apply_rotary_pos_emb is x·cos + cat(−x₂, x₁)·sin with cos/sin unsqueezed at dim 1
_ROTARY_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_ENABLED = "_mmalign_fused_rotary"
_WRAPPER_MARK = "mmalign_fused_rotary"
_ACTIVE = threading.local()
_INSTALL_LOCK = threading.Lock()
_FUSED_DTYPES = (torch.float32, torch.float64)
USE_FUSED_ROTARY = True  # module switch for in-process A/B measurements (bench/ab_step.py --change fused_norm_rope)


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = t.shape[-1] // 2
    return t[..., :half], t[..., half:]


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """out₁ = x₁·cos₁ − x₂·sin₁, out₂ = x₂·cos₂ + x₁·sin₂."""
    (x1, x2), (out1, out2), (cos1, cos2), (sin1, sin2) = _halves(x), _halves(out), _halves(cos), _halves(sin)
    torch.mul(x1, cos1, out=out1).addcmul_(x2, sin1, value=-1.0)
    torch.mul(x2, cos2, out=out2).addcmul_(x1, sin2)


def _rotate_back_into(out: torch.Tensor, grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """The transpose of :func:`_rotate_into`: out₁ = g₁·cos₁ + g₂·sin₂, out₂ = g₂·cos₂ − g₁·sin₁."""
    (g1, g2), (out1, out2), (cos1, cos2), (sin1, sin2) = _halves(grad), _halves(out), _halves(cos), _halves(sin)
    torch.mul(g1, cos1, out=out1).addcmul_(g2, sin2)
    torch.mul(g2, cos2, out=out2).addcmul_(g1, sin1, value=-1.0)


class RotaryFunction(torch.autograd.Function):
    """RoPE of ``x`` [..., D] with ``cos``/``sin`` broadcastable to it (not differentiated: they are constants)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        out = torch.empty_like(x)
        _rotate_into(out, x, cos, sin)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        grad_x = torch.empty_like(grad)
        _rotate_back_into(grad_x, grad, cos, sin)
        return grad_x, None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return RotaryFunction.apply(x, cos, sin)
    out = torch.empty_like(x)
    _rotate_into(out, x, cos, sin)
    return out


def _fusable(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """(cos and sin already unsqueezed to broadcast against q and k.)"""
    if not (q.device.type == "cpu" and q.dtype in _FUSED_DTYPES and k.dtype == q.dtype == cos.dtype == sin.dtype
            and q.shape[-1] % 2 == 0 and q.shape[-1] == k.shape[-1] == cos.shape[-1] == sin.shape[-1]
            and not cos.requires_grad and not sin.requires_grad and not torch.is_autocast_enabled("cpu")):
        return False
    try:  # the result must have the shape of q and k (transformers' broadcast could also grow them)
        return all(torch.broadcast_shapes(x.shape, cos.shape, sin.shape) == x.shape for x in (q, k))
    except RuntimeError:
        return False


def _wrap(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, **kwargs):
        if USE_FUSED_ROTARY and getattr(_ACTIVE, "depth", 0) and not kwargs:
            cos_u, sin_u = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
            if _fusable(q, k, cos_u, sin_u):
                _ACTIVE.used = getattr(_ACTIVE, "used", 0) + 1
                return rotary(q, cos_u, sin_u), rotary(k, cos_u, sin_u)
        return original(q, k, cos, sin, unsqueeze_dim, **kwargs)

    setattr(apply_rotary_pos_emb, _WRAPPER_MARK, True)
    apply_rotary_pos_emb.__wrapped__ = original
    return apply_rotary_pos_emb


def rotary_modules(model: torch.nn.Module) -> list:
    """The transformers modeling modules of ``model``'s Llama-family attention layers (those with RoPE); the names
    are cached on the model (its module tree does not change)."""
    names = model.__dict__.get("_mmalign_rotary_module_names")
    if names is None:
        names = sorted({type(m).__module__ for m in model.modules() if type(m).__name__.endswith("Attention")})
        model.__dict__["_mmalign_rotary_module_names"] = names
    return [sys.modules[n] for n in names
            if n in sys.modules and n.rsplit(".", 2)[-2] in _ROTARY_MODEL_TYPES
            and callable(getattr(sys.modules[n], "apply_rotary_pos_emb", None))]


def _install(module) -> None:
    with _INSTALL_LOCK:
        original = module.apply_rotary_pos_emb
        if not getattr(original, _WRAPPER_MARK, False):
            module.apply_rotary_pos_emb = _wrap(original)


def _marked_object(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (the object that carries the mark), else ``model``."""
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


def enable_fused_rotary(model: torch.nn.Module) -> Optional[str]:
    """Marks ``model`` for the fused RoPE in its scoring forwards and wraps its modeling module's function once;
    returns why not when the model has no Llama-family attention with transformers' ``apply_rotary_pos_emb``."""
    modules = rotary_modules(model)
    if not modules:
        return "no Llama-family attention module with transformers' apply_rotary_pos_emb"
    for module in modules:
        _install(module)
    _marked_object(model).__dict__[_ENABLED] = True
    return None


def is_fused_rotary(model: torch.nn.Module) -> bool:
    """Whether ``model`` is marked and its modeling modules' function is still mmalign's wrapper."""
    return bool(_marked_object(model).__dict__.get(_ENABLED)) and all(
        getattr(m.apply_rotary_pos_emb, _WRAPPER_MARK, False) for m in rotary_modules(model))


@contextlib.contextmanager
def fused_rotary(model: torch.nn.Module) -> Iterator[None]:
    """While the block runs, the RoPE of ``model``'s CPU forwards in this thread is :class:`RotaryFunction`
    (models marked by :func:`enable_fused_rotary`; others run unchanged)."""
    if not _marked_object(model).__dict__.get(_ENABLED):
        yield
        return
    if not is_fused_rotary(model):
        warn_not_taken(FUSED_ROTARY, "transformers' apply_rotary_pos_emb was replaced after mmalign wrapped it")
        yield
        return
    _ACTIVE.depth = getattr(_ACTIVE, "depth", 0) + 1
    used_before = getattr(_ACTIVE, "used", 0)
    try:
        yield
    finally:
        _ACTIVE.depth -= 1
        if getattr(_ACTIVE, "used", 0) > used_before:  # counted only when a call took it
            fast_path_taken(FUSED_ROTARY)
