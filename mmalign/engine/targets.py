"""The no-grad target forwards of a preference step, once for both backends: the adapter-disabled reference
(SPEC §0, ``logp_ref``) and CNRPO's stop-gradient triggered log-likelihoods (SPEC §4, ``SG(h_θ(x ⊕ t_i))``).

Both are fixed targets, not samples: they run under ``no_grad`` and, when the model has active dropout, in eval
mode (train mode is restored after). Each backend supplies only its scoring forward: the text backend the summed
response log-probabilities, the image backend the denoising surrogate ``−e`` (SPEC §7).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from mmalign.shared.objectives.batch import masked_mean

__all__ = ["has_active_dropout", "eval_mode", "adapters_disabled", "reference_forward", "triggered_log_likelihoods"]


def has_active_dropout(model: torch.nn.Module, *, include_adapters: bool = False) -> bool:
    """Whether a forward in train mode would be random: a dropout module with ``p > 0`` (LoRA's own dropout counts
    only with ``include_adapters``: the adapter-disabled reference does not run it)."""
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for name, m in model.named_modules()
               if include_adapters or "lora_" not in name)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module, needed: bool) -> Iterator[None]:
    """Eval mode for a no-grad target forward when ``needed`` (the model has active dropout; the targets must be
    deterministic); train mode is restored after."""
    if not needed or not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The LoRA adapters of ``model`` switched off for the block, then on again, for models whose adapters are
    enabled (as during training). A ``peft.PeftModel`` (text) through its tuner's ``disable_adapter_layers``:
    ``PeftModel.disable_adapter()`` would scan the model status on every entry (~3 ms per call on a 0.6M-parameter
    GPT-2, 5 % of a training step there); a diffusers model with PEFT adapters (image) through
    ``disable_adapters`` / ``enable_adapters``."""
    tuner = getattr(model, "base_model", None) if hasattr(model, "peft_config") else None
    if tuner is not None and hasattr(tuner, "disable_adapter_layers"):
        off, on = tuner.disable_adapter_layers, tuner.enable_adapter_layers
    elif getattr(model, "_hf_peft_config_loaded", False) and hasattr(model, "disable_adapters"):
        off, on = model.disable_adapters, model.enable_adapters
    else:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to disable: the adapter-disabled reference "
                         "needs a LoRA model (use a frozen reference model for full fine-tuning)")
    off()
    try:
        yield
    finally:
        on()


@contextlib.contextmanager
def reference_forward(adapted: torch.nn.Module, *, deterministic: bool,
                      mode_of: Optional[torch.nn.Module] = None) -> Iterator[torch.nn.Module]:
    """The block computes the reference of LoRA training: the policy ``adapted`` with its adapters disabled, under
    ``no_grad``, in eval mode when ``deterministic`` (``has_active_dropout(adapted)``, computed once by the caller).
    The frozen base IS the initial policy, so no copy of the weights is held. ``mode_of``: the module whose
    train/eval mode the forward sees, when it wraps ``adapted`` (e.g. a distributed wrapper); default ``adapted``."""
    with torch.no_grad(), adapters_disabled(adapted), eval_mode(mode_of if mode_of is not None else adapted,
                                                                deterministic):
        yield adapted


def triggered_log_likelihoods(
    model: torch.nn.Module,
    score: Callable[[], tuple[Tensor, Tensor]],
    *,
    n_triggers: int,
    chosen_mask: Optional[Tensor] = None,
    rejected_mask: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """CNRPO's triggered inputs (SPEC §4): the current policy's log-likelihoods of each group's outputs behind the
    prompt with trigger ``t_i``, as the objective takes them.

    ``score()`` is the backend's forward of the current policy on every triggered prompt, returning per-member
    log-likelihoods ``(chosen [B, n_triggers, k_w], rejected [B, n_triggers, k_l])``. It runs under ``no_grad`` in
    eval mode (no dropout, LoRA's included: these are fixed targets). A group's value is the mean over its valid
    members (``chosen_mask`` / ``rejected_mask`` ``[B, k]``; None: all valid), so pairs keep their one value.
    Returns ``{"triggered_chosen": [B, n_triggers], "triggered_rejected": [B, n_triggers]}``.
    """
    with torch.no_grad(), eval_mode(model, True):
        chosen, rejected = score()
    out = {}
    for name, values, mask in (("triggered_chosen", chosen, chosen_mask), ("triggered_rejected", rejected, rejected_mask)):
        if values.dim() != 3 or values.shape[1] != n_triggers:
            raise ValueError(f"{name}: the triggered forward must give [B, {n_triggers}, k] per-member values; got "
                             f"{tuple(values.shape)}")
        if mask is None:
            mask = torch.ones(values.shape[0], values.shape[2], dtype=torch.bool, device=values.device)
        out[name] = masked_mean(values, mask.unsqueeze(1).expand_as(values))
    return out
