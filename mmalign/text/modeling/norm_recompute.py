"""RMSNorm outputs recomputed in backward instead of kept, during mmalign's scoring forwards.

In a Llama-layout decoder layer each RMSNorm output feeds the projections after it (q/k/v, gate/up); with LoRA
(or full fine-tuning) their weight gradients need that input, so autograd keeps every norm output until
backward: 2 × [tokens, hidden] per layer (SmolLM2-135M, 544 tokens: 75 MiB of a LoRA forward's 505 MiB). The
norm's own input is kept anyway (its backward needs it), and the norm is a few elementwise operations, so
:func:`recompute_norm_outputs` stores, in place of each saved norm output, a recipe (the norm module and its
input) and recomputes the output when backward first asks for it. The recomputation runs the module's own
forward on the same tensor, so the values — and every gradient — are bit-identical (tested). One recomputed
output serves all its consumers (q, k and v) and is freed with the last of them.

Applies to transformers' RMSNorm classes of the Llama family without hooks, while gradients are recorded and
activation checkpointing is off (that uses its own saved-tensor hooks); otherwise the forward runs as is, and the
fast path is reported not taken (once, with the reason).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, Optional

import torch

from mmalign.text.modeling.fallbacks import fast_path_taken, warn_not_taken
from mmalign.text.modeling.rms_norm import RMS_NORM_CLASSES, is_fused_rms_norm

__all__ = ["recompute_norm_outputs", "NORM_RECOMPUTE", "rms_norms"]

NORM_RECOMPUTE = "RMSNorm output recomputed in backward"


def rms_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The Llama-family RMSNorm modules of ``model`` (cached on the model: the module tree does not change)."""
    cached = model.__dict__.get("_mmalign_rms_norms")
    if cached is None:
        cached = [m for m in model.modules() if type(m).__name__ in RMS_NORM_CLASSES]
        model.__dict__["_mmalign_rms_norms"] = cached
    return cached


class _Output:
    """One norm output: how to recompute it, and the recomputed tensor while a consumer's backward may need it."""

    __slots__ = ("norm", "source", "value", "__weakref__")

    def __init__(self, norm: torch.nn.Module, source: torch.Tensor):
        self.norm, self.source, self.value = norm, source, None

    def recomputed(self) -> torch.Tensor:
        if self.value is None:
            with torch.no_grad():
                # the forward in use: transformers' own, or the fused one (bit-identical outputs, fewer passes)
                self.value = self.norm.forward(self.source)
        return self.value


class _Saved:
    """What autograd keeps for a saved view of a norm output: the output's recipe and the view's geometry."""

    __slots__ = ("output", "size", "stride", "offset")

    def __init__(self, output: _Output, tensor: torch.Tensor):
        self.output, self.size, self.stride, self.offset = output, tensor.size(), tensor.stride(), tensor.storage_offset()


class _Hooks:
    def __init__(self):
        # storage address -> (the live output tensor, its version, its recipe); an address only counts while that
        # tensor lives and is unmodified (an in-place change would make the recipe's values stale)
        self.live: dict[int, tuple[weakref.ref, int, _Output]] = {}
        self.applied = 0

    def after_norm(self, module, args, output) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and args
                and output.is_contiguous() and output.storage_offset() == 0):
            return
        self.live[output.untyped_storage().data_ptr()] = (weakref.ref(output), output._version, _Output(module, args[0]))

    def pack(self, tensor: torch.Tensor):
        if tensor.layout is not torch.strided or tensor.device.type == "meta":
            return tensor
        entry = self.live.get(tensor.untyped_storage().data_ptr())
        if entry is None:
            return tensor
        output = entry[0]()
        if (output is None or output._version != entry[1] or tensor._version != entry[1]
                or output.dtype != tensor.dtype or output.device != tensor.device):
            return tensor
        self.applied += 1
        return _Saved(entry[2], tensor)

    @staticmethod
    def unpack(packed):
        if not isinstance(packed, _Saved):
            return packed
        return packed.output.recomputed().as_strided(packed.size, packed.stride, packed.offset)


def _checkpointable(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that carry transformers' ``gradient_checkpointing`` flag (cached: the module tree
    does not change, the flags may)."""
    cached = model.__dict__.get("_mmalign_checkpointable")
    if cached is None:
        cached = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        model.__dict__["_mmalign_checkpointable"] = cached
    return cached


def _not_eligible(model: torch.nn.Module, norms: list[torch.nn.Module]) -> Optional[str]:
    if any(n._forward_hooks or n._forward_pre_hooks or ("forward" in n.__dict__ and not is_fused_rms_norm(n))
           for n in norms):
        return "hooks or a forward of its own on an RMSNorm module"
    if any(getattr(m, "gradient_checkpointing", False) is True for m in _checkpointable(model)):
        return "activation checkpointing keeps its own saved tensors"
    return None


@contextlib.contextmanager
def recompute_norm_outputs(model: torch.nn.Module) -> Iterator[None]:
    """While the block runs (one forward with gradients), saved RMSNorm outputs of ``model`` are kept as
    recipes and recomputed in backward. Models without Llama-family RMSNorms, and forwards without gradients,
    run unchanged."""
    norms = rms_norms(model) if torch.is_grad_enabled() else []
    if not norms:
        yield
        return
    why = _not_eligible(model, norms)
    if why is not None:
        warn_not_taken(NORM_RECOMPUTE, f"{why}: norm outputs are kept for backward")
        yield
        return
    hooks = _Hooks()
    handles = [n.register_forward_hook(hooks.after_norm) for n in norms]
    try:
        with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
            yield
    finally:
        for handle in handles:
            handle.remove()
        hooks.live.clear()
    if hooks.applied:
        fast_path_taken(NORM_RECOMPUTE)
