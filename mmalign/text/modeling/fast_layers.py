"""Faster, numerically equivalent forwards for layers that dominate small-model training on CPU.

Both swap module *behaviour* only: configs, parameters, saved weights and adapters are unchanged, and each is
tested to give the same outputs and gradients as the code it replaces (up to float rounding).

- :func:`fuse_activations` — transformers' Python tanh-GELUs (GPT-2 family) become torch's fused tanh-GELU, and
  SiLU-gated MLPs keep one activation fewer for backward (:mod:`mmalign.text.modeling.gated_mlp`); Llama-family
  RMSNorms and RoPE run as one autograd function each on CPU (:mod:`~mmalign.text.modeling.rms_norm`,
  :mod:`~mmalign.text.modeling.rotary`).
- :func:`use_direct_lora_forward` — peft LoRA ``Linear`` layers run as base + one in-place ``addmm_`` (now in
  :mod:`mmalign.engine.lora_forward`, shared with the image backend; re-exported here).
"""
from __future__ import annotations

import torch

from mmalign.engine.lora_forward import runs_direct_forward, use_direct_lora_forward
from mmalign.text.modeling.gated_mlp import use_lean_gated_mlps
from mmalign.text.modeling.rms_norm import use_fused_rms_norms
from mmalign.text.modeling.rotary import enable_fused_rotary
from mmalign.text.modeling.tanh_gelu import SigmoidFormTanhGELU

__all__ = ["fuse_activations", "use_direct_lora_forward", "is_python_tanh_gelu", "is_direct_lora_forward"]

# transformers' Python-level tanh-approximate GELUs (GPT-2, GPT-J, GPT-Neo, CodeGen, Phi-1/2: "gelu_new",
# "gelu_fast", "gelu_python_tanh") compute 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) in ~8 elementwise ops forward
# and more backward; torch's GELU(approximate="tanh") is the same function in one fused kernel, here with its
# forward written as x·σ(2u) on CPU (mmalign.text.modeling.tanh_gelu: faster; the backward stays torch's kernel —
# a hand-written backward was 4-9 % slower per DPO step, measured).
_PYTHON_TANH_GELUS = ("NewGELUActivation", "FastGELUActivation")


def fuse_activations(model: torch.nn.Module) -> int:
    """Replaces Python-level tanh-GELU modules by ``torch.nn.GELU(approximate="tanh")`` (the same function, float
    rounding aside; forward + backward on CPU about half the Python version's time; its σ-form forward subclass,
    :class:`~mmalign.text.modeling.tanh_gelu.SigmoidFormTanhGELU`); returns how many
    were replaced. SiLU-gated MLPs (Llama family) get the forward that keeps one activation fewer for backward
    (:func:`mmalign.text.modeling.gated_mlp.use_lean_gated_mlps`); Llama-family RMSNorms get the fused forward
    (:func:`~mmalign.text.modeling.rms_norm.use_fused_rms_norms`) and the model is marked for the fused RoPE of
    its scoring forwards (:func:`~mmalign.text.modeling.rotary.enable_fused_rotary`). Only module objects and
    their forwards change: the config and the saved weights do not."""
    use_lean_gated_mlps(model)
    use_fused_rms_norms(model)
    enable_fused_rotary(model)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_python_tanh_gelu(child):
                setattr(parent, name, SigmoidFormTanhGELU())
                replaced += 1
    return replaced


def is_python_tanh_gelu(module: torch.nn.Module) -> bool:
    """Whether ``module`` is one of transformers' Python-level tanh-GELUs (what :func:`fuse_activations` replaces)."""
    return type(module).__name__ in _PYTHON_TANH_GELUS or (
        type(module).__name__ == "GELUTanh" and getattr(module, "act", None) == getattr(module, "_gelu_tanh_python", ()))


def is_direct_lora_forward(module: torch.nn.Module) -> bool:
    """Whether ``module`` runs the direct LoRA forward (given by :func:`use_direct_lora_forward`)."""
    return runs_direct_forward(module)
