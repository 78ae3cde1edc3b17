"""The last decoder layer run on the scored positions only, during mmalign's shared-prompt scoring forwards.

Only the positions whose logits are scored reach the LM head, and after the last decoder layer nothing mixes
positions: so that layer needs its keys and values at every position (its attention reads them), but its
queries, attention output, output projection, MLP and residual only at the scored ones. In the shared-prompt
layout the prompt tokens are 30-40 % of the positions (benchmark data: 400 of 1,088 on the tiny GPT-2, 192 of
544 on SmolLM2), so the last layer does a third less work in the reference forward, the policy forward and its
backward; on a 2-layer model that is a sixth of the model's work. The result at the scored positions is the same
computation on the same rows (rows of a product are independent; float rounding may differ where a kernel blocks
rows differently); the other positions of the layer's output are zeros, which nothing reads.

:func:`last_layer_on_scored_rows` gives the last layer this forward while the block runs, in the thread that
opened it (a forward of the same model in another thread runs the layer as it is), for transformers'
``GPT2Block`` and ``LlamaDecoderLayer`` (the benchmarked layouts; transformers' own classes and forwards for the
layer, its attention and its MLP) with sdpa or eager attention, no cache, no activation checkpointing and no hooks
in the layer; otherwise the layer runs as it is (reported once, with why).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
import types
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from mmalign.text.modeling.fallbacks import fast_path_taken, warn_not_taken

__all__ = ["last_layer_on_scored_rows", "SCORED_LAST_LAYER", "scored_position_table", "last_layer", "is_compiled"]

SCORED_LAST_LAYER = "last decoder layer on the scored positions"
USE_SCORED_LAST_LAYER = True  # module switch for in-process A/B measurements (bench/ab_step.py --change last_layer)


def last_layer(model: torch.nn.Module) -> tuple[Optional[torch.nn.Module], list]:
    """(the last decoder layer, all the layers) of a transformers causal LM (``transformer.h`` or
    ``model.layers``; under peft too), or (None, [])."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    for outer, inner in (("transformer", "h"), ("model", "layers")):
        layers = getattr(getattr(base, outer, None), inner, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return layers[-1], list(layers)
    return None, []


def scored_position_table(rows: torch.Tensor, columns: torch.Tensor, batch: int, length: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, P] positions, [K] flat indices into the [B·P] rows that are real): the distinct scored positions of
    each row, padded to the longest row by repeating its last one (padding rows are computed, never written)."""
    flat = torch.unique(rows * length + columns)  # sorted: row-major
    row_of, position = flat // length, flat % length
    counts = torch.bincount(row_of, minlength=batch)
    width = max(int(counts.max()), 1)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(flat.numel(), device=flat.device) - starts[row_of]
    table = torch.zeros(batch, width, dtype=torch.long, device=flat.device)
    table[row_of, slot] = position
    # pad each row with its last scored position (a row without any: position 0)
    last = table.gather(1, (counts - 1).clamp_min(0).unsqueeze(1))
    filler = torch.arange(width, device=flat.device).unsqueeze(0) >= counts.unsqueeze(1)
    table = torch.where(filler, last, table)
    return table, row_of * width + slot


def _gather_rows(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] -> [B, P, ...] at ``table`` [B, P] positions."""
    index = table.view(*table.shape, *([1] * (x.dim() - 2))).expand(*table.shape, *x.shape[2:])
    return x.gather(1, index)


def _query_mask(mask: Optional[torch.Tensor], table: torch.Tensor) -> Optional[torch.Tensor]:
    """A [B, 1, T, S] attention mask's query rows at ``table`` -> [B, 1, P, S]."""
    if mask is None:
        return None
    index = table[:, None, :, None].expand(mask.shape[0], mask.shape[1], table.shape[1], mask.shape[3])
    return mask.expand(table.shape[0], *mask.shape[1:]).gather(2, index)


def _attention_function(attention: torch.nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules[type(attention).__module__], "eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager)


def _gpt2_rows(block, hidden: torch.Tensor, mask, table: torch.Tensor, kwargs: dict) -> torch.Tensor:
    attention = block.attn
    normed = block.ln_1(hidden)
    query, key, value = attention.c_attn(normed).split(attention.split_size, dim=2)
    heads = (-1, attention.head_dim)
    query = _gather_rows(query, table)
    query = query.view(*query.shape[:-1], *heads).transpose(1, 2)
    key = key.view(*key.shape[:-1], *heads).transpose(1, 2)
    value = value.view(*value.shape[:-1], *heads).transpose(1, 2)
    out, _ = _attention_function(attention)(attention, query, key, value, _query_mask(mask, table),
                                            dropout=attention.attn_dropout.p if attention.training else 0.0,
                                            scaling=attention.scaling, **kwargs)
    out = attention.resid_dropout(attention.c_proj(out.reshape(*out.shape[:-2], -1).contiguous()))
    hidden_rows = out + _gather_rows(hidden, table)
    return hidden_rows + block.mlp(block.ln_2(hidden_rows))


def _llama_rows(layer, hidden: torch.Tensor, mask, table: torch.Tensor, kwargs: dict) -> torch.Tensor:
    attention = layer.self_attn
    normed = layer.input_layernorm(hidden)
    heads = (-1, attention.head_dim)
    query = attention.q_proj(_gather_rows(normed, table))
    query = query.view(*query.shape[:-1], *heads).transpose(1, 2)
    key = attention.k_proj(normed).view(*normed.shape[:-1], *heads).transpose(1, 2)
    value = attention.v_proj(normed).view(*normed.shape[:-1], *heads).transpose(1, 2)
    cos, sin = (t.expand(hidden.shape[0], *t.shape[1:]) for t in kwargs.pop("position_embeddings"))
    # RoPE through the modeling module's own function (mmalign's fused one when that block is active); it rotates
    # a query and a key with one cos/sin, so each call gets a one-head stand-in for the other
    rope = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    query = rope(query, query[:, :1], _gather_rows(cos, table), _gather_rows(sin, table))[0]
    key = rope(key[:, :1], key, cos, sin)[1]
    out, _ = _attention_function(attention)(attention, query, key, value, _query_mask(mask, table),
                                            dropout=attention.attention_dropout if attention.training else 0.0,
                                            scaling=attention.scaling, **kwargs)
    out = attention.o_proj(out.reshape(*out.shape[:-2], -1).contiguous())
    hidden_rows = out + _gather_rows(hidden, table)
    return hidden_rows + layer.mlp(layer.post_attention_layernorm(hidden_rows))


_ROWS = {"GPT2Block": _gpt2_rows, "LlamaDecoderLayer": _llama_rows}
_SUBMODULES = {"GPT2Block": ("attn", "mlp"), "LlamaDecoderLayer": ("self_attn", "mlp")}
# arguments the layer's forward may receive with a value for this path to apply; any other must be None or False
_PASSED_THROUGH = {"GPT2Block": (), "LlamaDecoderLayer": ("position_embeddings",)}
_IGNORED = ("self", "hidden_states", "attention_mask", "position_ids")


@dataclass
class _Block:
    """One open block: the position table of its batch, for the forwards of the thread that opened it."""

    table: torch.Tensor
    destinations: torch.Tensor  # [K] flat [B·T] positions the real table entries are written to
    real: torch.Tensor
    batch: int
    length: int
    calls: int = 0


# the blocks open in this thread, per layer (a stack: a nested block of the same layer is served first)
_THREAD = threading.local()
# id(layer) -> blocks open in any thread; the layer carries the scored forward while this is > 0
_OPEN: dict[int, int] = {}
_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _current_block(layer: torch.nn.Module) -> Optional[_Block]:
    blocks = getattr(_THREAD, "blocks", {}).get(id(layer))
    return blocks[-1] if blocks else None


def _scored_forward(self, *args, **kwargs):
    """The layer's forward while a block is open: the scored rows for the opening thread's batch, the layer's
    own forward for anything else (another thread, another shape, arguments this path does not handle)."""
    original, block = type(self).forward, _current_block(self)
    if block is None:
        return original(self, *args, **kwargs)
    bound = _signature(type(self)).bind(self, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.update(arguments.pop("kwargs", {}))
    hidden, mask = arguments.get("hidden_states"), arguments.get("attention_mask")
    kind = type(self).__name__
    passed = {k: arguments[k] for k in _PASSED_THROUGH[kind] if arguments.get(k) is not None}
    others = [v for k, v in arguments.items() if k not in _IGNORED and k not in passed]
    if not (all(v is None or v is False for v in others) and isinstance(hidden, torch.Tensor)
            and tuple(hidden.shape[:2]) == (block.batch, block.length) and isinstance(mask, torch.Tensor)
            and mask.dim() == 4 and tuple(mask.shape[-2:]) == (block.length, block.length)):
        return original(*bound.args, **bound.kwargs)
    rows = _ROWS[kind](self, hidden, mask, block.table, passed)
    block.calls += 1
    out = hidden.new_zeros(block.batch * block.length, hidden.shape[2])
    out = out.index_copy(0, block.destinations, rows.reshape(-1, rows.shape[-1])[block.real])
    return out.view(hidden.shape)


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether ``model`` or a wrapper or module under it runs through ``torch.compile`` (whose guards would see a
    new layer forward in every call and recompile)."""
    while True:
        if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
            return True
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return False
        model = inner


def _is_ours(layer: torch.nn.Module) -> bool:
    return getattr(layer.__dict__.get("forward"), "__func__", None) is _scored_forward


def _transformers_class(module: Optional[torch.nn.Module]) -> bool:
    """A transformers modeling class whose forward is transformers' own (not a class-level patch)."""
    return (module is not None and type(module).__module__.startswith("transformers.models.")
            and getattr(type(module).forward, "__module__", "").startswith("transformers."))


def _not_eligible(model: torch.nn.Module, layer: Optional[torch.nn.Module], layers_using_it: int) -> Optional[str]:
    if layer is None:
        return "no decoder layer list (transformer.h or model.layers) found"
    kind = type(layer).__name__
    if kind not in _ROWS:
        return f"the last layer is a {kind} (only {', '.join(_ROWS)})"
    if layers_using_it != 1:
        return "the last layer's module object appears more than once in the layer list"
    parts = [layer] + [getattr(layer, name, None) for name in _SUBMODULES[kind]]
    if not all(_transformers_class(part) for part in parts):
        return "the last layer, its attention or its MLP is not transformers' class and forward"
    if "forward" in layer.__dict__ and not _is_ours(layer):
        return "a forward of its own on the last decoder layer"
    if any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules()):
        return "hooks on the last decoder layer or a module in it"
    if getattr(layer, "gradient_checkpointing", False) and torch.is_grad_enabled():
        return "activation checkpointing on the last decoder layer"
    config = model.config
    if config._attn_implementation not in ("sdpa", "eager"):
        return f"attention implementation {config._attn_implementation!r} (sdpa or eager only)"
    if getattr(config, "add_cross_attention", False) or getattr(config, "reorder_and_upcast_attn", False):
        return "GPT-2 cross-attention or reordered attention"
    return None


@contextlib.contextmanager
def last_layer_on_scored_rows(model: torch.nn.Module, rows: torch.Tensor, columns: torch.Tensor,
                              batch: int, length: int, cache: Optional[dict] = None,
                              compiled: bool = False) -> Iterator[None]:
    """While the block runs, the last decoder layer of ``model`` (unwrapped of DDP; peft passes through)
    computes only the positions ``(rows, columns)`` of its [batch, length] input in this thread's forwards; other
    layouts, threads and shapes run unchanged. Enter it before any context that hooks the layer's norms.
    ``cache``: a dict kept with the batch, to build the position table once for its forwards; ``compiled``:
    the model as called runs through ``torch.compile`` (:func:`is_compiled`)."""
    if not USE_SCORED_LAST_LAYER:
        yield
        return
    layer, layers = last_layer(model)
    why = "a torch.compile'd model (a new layer forward per call would recompile)" if compiled else None
    why = why or _not_eligible(model, layer, sum(other is layer for other in layers))
    if why is not None:
        warn_not_taken(SCORED_LAST_LAYER, f"{why}: the last layer runs on every position")
        yield
        return
    key = "_scored_position_table"
    tables = cache.get(key) if cache is not None else None
    if tables is None:
        table, real = scored_position_table(rows, columns, batch, length)
        destinations = (torch.arange(batch, device=table.device).unsqueeze(1) * length + table).reshape(-1)[real]
        tables = (table, destinations, real)
        if cache is not None:
            cache[key] = tables
    block = _Block(*tables, batch=batch, length=length)
    with _LOCK:
        if not _OPEN.get(id(layer)):
            layer.forward = types.MethodType(_scored_forward, layer)
        _OPEN[id(layer)] = _OPEN.get(id(layer), 0) + 1
    stack = getattr(_THREAD, "blocks", None)
    if stack is None:
        stack = _THREAD.blocks = {}
    stack.setdefault(id(layer), []).append(block)
    try:
        yield
    finally:
        stack[id(layer)].pop()
        if not stack[id(layer)]:
            del stack[id(layer)]
        with _LOCK:
            _OPEN[id(layer)] -= 1
            if not _OPEN[id(layer)]:
                del _OPEN[id(layer)], layer.forward
        if block.calls:
            fast_path_taken(SCORED_LAST_LAYER)
