"""Grouped-query attention without transformers' ``repeat_kv`` copies, during mmalign's scoring forwards.

Models with fewer key/value heads than query heads (SmolLM2-135M: 9 query, 3 key/value heads) reach torch's
``scaled_dot_product_attention`` through transformers' ``sdpa_attention_forward``, which copies every key/value
head once per query head (``repeat_kv``) unless ``use_gqa_in_sdpa`` allows sdpa's own ``enable_gqa``; transformers
allows it on CPU only without a mask, and mmalign's shared-prompt layout always has one. The copies are what
sdpa keeps for backward: 48 MiB of a SmolLM2 LoRA forward of 544 tokens (2 × [tokens, 576] per layer instead of
2 × [tokens, 192]). torch's CPU kernels take ``enable_gqa`` with a mask: the outputs are bit-identical, the
key/value gradients differ by float rounding (the sum over the query heads of a group is taken in another
order; about 1e-6 relative, tested).

:func:`grouped_query_sdpa` lets ``use_gqa_in_sdpa`` say yes for CPU tensors while one forward runs in the calling
thread. transformers' function is wrapped once and never restored: the wrapper asks the original outside such a
block, so concurrent or nested forwards (another thread, a callback's forward) see exactly their own setting,
whatever order their blocks close in. When transformers no longer has that function the forward runs as
transformers does it, and the fast path is reported not taken (once, with the reason).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

from mmalign.text.modeling.fallbacks import fast_path_taken, warn_not_taken

__all__ = ["grouped_query_sdpa", "GROUPED_QUERY_SDPA", "uses_grouped_query_sdpa"]

GROUPED_QUERY_SDPA = "grouped-query sdpa without repeat_kv"


def _sdpa_module():
    try:
        import transformers.integrations.sdpa_attention as module
    except ImportError:
        return None
    return module if callable(getattr(module, "use_gqa_in_sdpa", None)) else None


def uses_grouped_query_sdpa(model: torch.nn.Module) -> bool:
    """Whether ``model`` has grouped key/value heads and runs transformers' sdpa attention."""
    config = getattr(model, "config", None)
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    return (getattr(config, "_attn_implementation", None) == "sdpa" and isinstance(heads, int)
            and isinstance(kv_heads, int) and 0 < kv_heads < heads)


@contextlib.contextmanager
def grouped_query_sdpa(model: torch.nn.Module) -> Iterator[None]:
    """While the block runs, transformers' sdpa attention hands the key/value heads of CPU tensors to torch's
    ``scaled_dot_product_attention(..., enable_gqa=True)`` instead of repeating them. Other models: no change."""
    if not uses_grouped_query_sdpa(model):
        yield
        return
    module = _sdpa_module()
    if module is None:
        warn_not_taken(GROUPED_QUERY_SDPA, "transformers.integrations.sdpa_attention.use_gqa_in_sdpa is gone "
                                           "(transformers changed): key/value heads are copied per query head")
        yield
        return
    _install_wrapper(module)
    _ACTIVE.depth = getattr(_ACTIVE, "depth", 0) + 1
    fast_path_taken(GROUPED_QUERY_SDPA)
    try:
        yield
    finally:
        _ACTIVE.depth -= 1


# how many grouped_query_sdpa blocks the current thread is inside
_ACTIVE = threading.local()
_WRAPPER_MARK = "mmalign_grouped_query"
_INSTALL_LOCK = threading.Lock()


def _install_wrapper(module) -> None:
    with _INSTALL_LOCK:
        original = module.use_gqa_in_sdpa
        if getattr(original, _WRAPPER_MARK, False):
            return

        def use_gqa_in_sdpa(attention_mask, key, value):
            if getattr(_ACTIVE, "depth", 0) and key.device.type == "cpu" and key.shape[-1] == value.shape[-1]:
                return True
            return original(attention_mask, key, value)

        setattr(use_gqa_in_sdpa, _WRAPPER_MARK, True)
        module.use_gqa_in_sdpa = use_gqa_in_sdpa
