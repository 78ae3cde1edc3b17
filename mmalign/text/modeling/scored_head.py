"""The LM head run on the scored positions only: [M, H] hidden rows -> [M, V] logits.

``logits_to_keep`` trims the positions a causal LM projects to the vocabulary, but only per column: every row of a
batch gets the same positions (those any row needs), so the model returns [B, K, V] logits of which only M < B·K
are scored, and the caller copies those M rows out (an [M, V] gather forward, an [B, K, V] zero-fill + scatter in
backward). On a 49k-token vocabulary (SmolLM2) these are the largest tensors of a DPO step. A forward pre-hook on
the output layer hands it the M scored hidden rows instead, so it computes exactly the [M, V] logits that are
scored, with the same numbers (the same rows through the same layer).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch

__all__ = ["lm_head_on_rows", "has_output_layer"]


class _RowsHook:
    def __init__(self, select: Callable[[torch.Tensor], torch.Tensor], expected_shape: tuple[int, ...]):
        self.select, self.expected_shape, self.calls = select, expected_shape, 0

    def __call__(self, module, args):
        hidden = args[0]
        if tuple(hidden.shape[:-1]) != self.expected_shape:  # not the call this hook was set for: leave it
            return None
        self.calls += 1
        return (self.select(hidden),) + tuple(args[1:])


def _output_layer(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, torch.nn.Module) else None


def has_output_layer(model: torch.nn.Module) -> bool:
    """Whether :func:`lm_head_on_rows` can hook ``model`` (unwrapped)."""
    return _output_layer(model) is not None


@contextmanager
def lm_head_on_rows(model: torch.nn.Module, select: Callable[[torch.Tensor], torch.Tensor],
                    expected_shape: tuple[int, ...]) -> Iterator[Optional[_RowsHook]]:
    """``model``: unwrapped of DDP/compile wrappers (PEFT models pass the call on). While active, the model's output layer gets ``select(hidden)`` ([M, H]) in place of its input ``hidden``
    when that has shape ``expected_shape + (H,)``; yields the hook (``.calls``: how often it applied; the logits
    are [M, V] only when it applied exactly once) or None when the model has no output layer to hook."""
    head = _output_layer(model)
    if head is None:
        yield None
        return
    hook = _RowsHook(select, tuple(expected_shape))
    handle = head.register_forward_pre_hook(hook)
    try:
        yield hook
    finally:
        handle.remove()
