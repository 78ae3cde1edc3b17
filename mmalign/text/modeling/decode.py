"""A lean KV-cache decoder for the Llama layout: the sampler's fast path for online training.

Each token of ``model(input_ids=token, past_key_values=cache)`` costs a transformers Llama forward of many small
Python calls (mask creation, cache bookkeeping, RoPE for every position, one module call per projection and, with
LoRA, three more per adapted projection). On the small models online training samples from, that overhead is
most of a decode step (the tiny bench model: ~1.5 ms of 11.6 ms is matrix work). :class:`LlamaDecoder` runs the
same function from the model's own weights with the per-call work done once per sampler call:

- Q/K/V and gate/up weights concatenated (one matmul each), the attention scale folded into Q's rows;
- LoRA merged into those per-call weights (``W + s·B A``; the policy does not change during one call, and the
  model's parameters are never touched);
- a preallocated KV cache, the left-padding mask built once, RoPE for the current position only;
- grouped-query attention without repeating K/V (queries grouped per K/V head).

Only the exact layout is taken (``LlamaForCausalLM`` with transformers' own Llama modules, static RoPE, plain
``nn.Linear`` or peft ``lora.Linear`` projections, no hooks); anything else returns a reason and the sampler
keeps the transformers forward (:func:`lean_decoder` warns once and counts). Tests: per-step logits equal the
transformers forward's within float tolerance (tiny Llama/SmolLM2 layouts, with and without LoRA, left padding).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mmalign.text.modeling.fallbacks import fast_path_taken, warn_not_taken
from mmalign.text.modeling.fast_layers import is_direct_lora_forward
from mmalign.text.modeling.gated_mlp import is_lean_gated_mlp
from mmalign.text.modeling.rms_norm import is_fused_rms_norm
from mmalign.text.modeling.lora_parts import lora_parts

__all__ = ["LlamaDecoder", "Unsupported", "lean_decoder", "FAST_PATH", "FUSE_BELOW_BYTES"]

FAST_PATH = "sampling.lean_decode"
_MODULE_CLASSES = {"LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm", "LlamaRotaryEmbedding",
                   "LlamaModel", "LlamaForCausalLM", "Embedding", "Linear", "SiLU", "SiLUActivation",
                   "ModuleList", "ModuleDict", "Identity", "Dropout", "ParameterDict", "BufferDict"}
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inv_freq fixed at load; dynamic/longrope change with length


class Unsupported(Exception):
    """The model's layout is not the one :class:`LlamaDecoder` computes (the message says why)."""


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)  # peft's PeftModel
    return get_base() if callable(get_base) else model


def _check_module(module: torch.nn.Module, name: str) -> None:
    if module._forward_hooks or module._forward_pre_hooks:
        raise Unsupported(f"hooks on {name or 'the model'}")
    own_forward = module.__dict__.get("forward")
    if own_forward is not None and not (is_lean_gated_mlp(module) or is_direct_lora_forward(module)
                                        or is_fused_rms_norm(module)):
        raise Unsupported(f"{name} has a replaced forward")


def _linear(module: torch.nn.Module, name: str) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[tuple]]:
    """(weight, bias, lora) of a projection: a plain ``nn.Linear``, or peft's ``lora.Linear`` over one, whose
    ``lora`` = (B, A, scaling) is merged by the caller (None when the adapter is disabled, merged or absent). The
    adapter's tensors come from :func:`~mmalign.text.modeling.lora_parts.lora_parts`, the same cases as the
    training forward's direct LoRA path."""
    if type(module) is torch.nn.Linear:
        return module.weight, module.bias, None
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(module) is not LoraLinear or type(module.base_layer) is not torch.nn.Linear:
        raise Unsupported(f"{name} is a {type(module).__name__} (only nn.Linear and peft's lora.Linear over it)")
    _check_module(module.base_layer, name + ".base_layer")
    base = module.base_layer
    if module.merged_adapters:  # the base weight already holds the adapter
        return base.weight, base.bias, None
    parts = lora_parts(module, base.weight)
    if isinstance(parts, str):
        raise Unsupported(f"{name}: {parts}")
    return parts.weight, parts.bias, None if parts.lora_a is None else (parts.lora_b, parts.lora_a, parts.scaling)


def _merged(parts: list[tuple], scale_rows: Optional[tuple[int, float]] = None) -> tuple:
    """One projection (weight, bias, None) for projections stacked along the output, each ``W + s·B A`` (a fresh
    tensor); the first ``scale_rows[0]`` output rows (and bias) multiplied by ``scale_rows[1]``."""
    weight = torch.cat([w.detach() for w, _, _ in parts])
    row = 0
    for w, _, lora in parts:
        if lora is not None:
            lora_b, lora_a, scaling = lora
            weight[row:row + w.shape[0]].addmm_(lora_b.detach(), lora_a.detach(), alpha=scaling)
        row += w.shape[0]
    bias = None
    if any(b is not None for _, b, _ in parts):
        bias = torch.cat([b.detach() if b is not None else w.new_zeros(w.shape[0]) for w, b, _ in parts])
    if scale_rows is not None:
        rows, factor = scale_rows
        weight[:rows].mul_(factor)
        if bias is not None:
            bias[:rows].mul_(factor)
    return weight, bias, None


def _direct(part: tuple) -> tuple:
    """The projection as it is: the parameters themselves (never written) and the LoRA factors unmerged."""
    weight, bias, lora = part
    if lora is not None:
        lora = (lora[0].detach(), lora[1].detach(), lora[2])
    return weight.detach(), None if bias is None else bias.detach(), lora


def _project(x: torch.Tensor, projection: tuple) -> torch.Tensor:
    weight, bias, lora = projection
    y = F.linear(x, weight, bias)
    if lora is not None:  # y += s · (x Aᵀ) Bᵀ, in place
        lora_b, lora_a, scaling = lora
        y.view(-1, y.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]) @ lora_a.t(), lora_b.t(), alpha=scaling)
    return y


# Below this many weight bytes the per-call copies (concatenated, LoRA-merged projections) cost less than the
# calls they save; above it a decode step is bound by reading the weights and one extra pass over them (the copy)
# costs about a step, so the parameters are used as they are (measured on SmolLM2-135M + LoRA: the copies took
# ~15 % of an 8-token call).
FUSE_BELOW_BYTES = 32 * 2 ** 20


class LlamaDecoder:
    """Per-call weights of a Llama-layout causal LM and its decode loop (see the module docstring).

    ``logits = prefill(input_ids, attention_mask, rows, max_new_tokens)`` encodes left-padded prompts once and
    copies each prompt's keys/values to its sample rows (``rows[i]``: the prompt of row i); then each
    ``logits = step(tokens)`` appends one token per row. Logits are float32 [rows, vocab].

    ``fuse``: concatenate Q/K/V and gate/up and merge LoRA into per-call copies (True), use the parameters as they
    are with LoRA as a low-rank side product (False), or choose by the weights' size (None, see
    ``FUSE_BELOW_BYTES``)."""

    def __init__(self, model: torch.nn.Module, fuse: Optional[bool] = None):
        base = _base_model(model)
        if type(base).__name__ != "LlamaForCausalLM":
            raise Unsupported(f"{type(base).__name__} is not the Llama layout")
        for name, module in base.named_modules():
            if type(module).__name__ not in _MODULE_CLASSES and not name.split(".")[-1].startswith("lora_"):
                raise Unsupported(f"{name} is a {type(module).__name__}")
            _check_module(module, name)
        config = base.config
        if config.hidden_act not in ("silu", "swish") or (getattr(config, "pretraining_tp", 1) or 1) != 1:
            raise Unsupported(f"activation {config.hidden_act!r} / pretraining_tp {getattr(config, 'pretraining_tp', 1)}")
        inner = base.model
        rotary = inner.rotary_emb
        if getattr(rotary, "rope_type", "default") not in _STATIC_ROPE:
            raise Unsupported(f"RoPE type {rotary.rope_type!r} (only static RoPE: {', '.join(_STATIC_ROPE)})")
        if type(inner.embed_tokens) is not torch.nn.Embedding:
            raise Unsupported(f"embed_tokens is a {type(inner.embed_tokens).__name__}")
        if fuse is None:
            fuse = sum(p.numel() * p.element_size() for p in inner.layers.parameters()) < FUSE_BELOW_BYTES
        self.fused = fuse
        first = inner.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, first.head_dim
        self.scaling = first.scaling
        self.embed = inner.embed_tokens.weight.detach()
        self.inv_freq = rotary.inv_freq.detach().float()
        self.rope_scale = float(rotary.attention_scaling)
        half = self.head_dim // 2  # rotate_half(x) = x @ rotation (a signed permutation: exact)
        self.rotation = torch.zeros(self.head_dim, self.head_dim, device=self.embed.device, dtype=self.embed.dtype)
        self.rotation[torch.arange(half, self.head_dim), torch.arange(half)] = -1.0
        self.rotation[torch.arange(half), torch.arange(half, self.head_dim)] = 1.0
        self.sizes = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        self.layers = []
        for index, layer in enumerate(inner.layers):
            attn, mlp, prefix = layer.self_attn, layer.mlp, f"model.layers.{index}"
            qkv = [_linear(getattr(attn, p), f"{prefix}.self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj")]
            gate_up = [_linear(getattr(mlp, p), f"{prefix}.mlp.{p}") for p in ("gate_proj", "up_proj")]
            out = _linear(attn.o_proj, f"{prefix}.self_attn.o_proj")
            down = _linear(mlp.down_proj, f"{prefix}.mlp.down_proj")
            if fuse:
                qkv, gate_up = [_merged(qkv, scale_rows=(self.sizes[0], self.scaling))], [_merged(gate_up)]
                out, down = (_merged([out]) if out[2] is not None else _direct(out),
                             _merged([down]) if down[2] is not None else _direct(down))
            else:
                qkv, gate_up, out, down = [_direct(p) for p in qkv], [_direct(p) for p in gate_up], _direct(out), _direct(down)
            norms = [(n.weight.detach(), n.variance_epsilon) for n in (layer.input_layernorm, layer.post_attention_layernorm)]
            self.layers.append((norms[0], qkv, out, norms[1], gate_up, down))
        self.norm = (inner.norm.weight.detach(), inner.norm.variance_epsilon)
        self.head = _direct(_linear(base.lm_head, "lm_head"))
        self.intermediate = mlp.down_proj.in_features
        self.keys = self.values = self.mask = self.positions = None
        self.length = 0

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _norm(x: torch.Tensor, norm) -> torch.Tensor:
        weight, eps = norm
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [..., head_dim] for integer positions [...], as transformers' rotary embedding."""
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), -1)
        return angles.cos() * self.rope_scale, angles.sin() * self.rope_scale

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on x [..., heads, head_dim]: x·cos + rotate_half(x)·sin (transformers' apply_rotary_pos_emb)."""
        return torch.addcmul(x * cos, x @ self.rotation, sin)

    def _attention_inputs(self, x: torch.Tensor, layer, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q (scaled), K (both rotated) and V [..., heads, head_dim] of one layer for hidden states x [..., hidden]."""
        h = self._norm(x, layer[0])
        lead = x.shape[:-1]
        if self.fused:  # one matmul; Q and K rotated together
            projected = _project(h, layer[1][0])
            qk_size = self.sizes[0] + self.sizes[1]
            qk = self._rotate(projected[..., :qk_size].view(*lead, self.heads + self.kv_heads, self.head_dim), cos, sin)
            return (qk[..., :self.heads, :], qk[..., self.heads:, :],
                    projected[..., qk_size:].view(*lead, self.kv_heads, self.head_dim))
        q, k, v = (_project(h, p) for p in layer[1])
        q = self._rotate(q.mul_(self.scaling).view(*lead, self.heads, self.head_dim), cos, sin)
        k = self._rotate(k.view(*lead, self.kv_heads, self.head_dim), cos, sin)
        return q, k, v.view(*lead, self.kv_heads, self.head_dim)

    def _mlp(self, x: torch.Tensor, layer) -> None:
        """x += down(silu(gate(h)) · up(h)), h = post-attention norm of x (in place)."""
        h = self._norm(x, layer[3])
        if self.fused:
            gu = _project(h, layer[4][0])
            gate, up = gu[..., :self.intermediate], gu[..., self.intermediate:]
        else:
            gate, up = (_project(h, p) for p in layer[4])
        x.add_(_project(F.silu(gate).mul_(up), layer[5]))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return _project(self._norm(x, self.norm), self.head).float()

    # ------------------------------------------------------------------ calls
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                max_new_tokens: int) -> torch.Tensor:
        batch, length = input_ids.shape
        device, groups = input_ids.device, self.heads // self.kv_heads
        real = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        # a query sees earlier real tokens and itself (a pad query attends to itself: no all-masked row)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        allowed = (causal & real[:, None, :]) | torch.eye(length, dtype=torch.bool, device=device)
        prefill_mask = torch.zeros(batch, 1, length, length, device=device).masked_fill_(~allowed[:, None], float("-inf"))
        cos, sin = self._rope(positions)  # [B, T, D]
        cos, sin = cos[:, :, None], sin[:, :, None]
        total = length + max_new_tokens
        num_rows = rows.numel()
        x = self.embed[input_ids]
        cache_shape = (len(self.layers), num_rows, self.kv_heads, total, self.head_dim)
        self.keys, self.values = x.new_empty(cache_shape).unbind(0), x.new_empty(cache_shape).unbind(0)
        for index, layer in enumerate(self.layers):
            q, k, v = self._attention_inputs(x, layer, cos, sin)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, kv, T, D]
            self.keys[index][:, :, :length] = k[rows]
            self.values[index][:, :, :length] = v[rows]
            attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(groups, dim=1),
                                                      v.repeat_interleave(groups, dim=1), attn_mask=prefill_mask,
                                                      scale=1.0)  # [B, H, T, D]; Q is pre-scaled
            x = x + _project(attended.transpose(1, 2).reshape(batch, length, -1), layer[2])
            self._mlp(x, layer)
        key_mask = torch.zeros(num_rows, total, device=device)
        key_mask[:, :length].masked_fill_(~real[rows], float("-inf"))
        self.mask = key_mask[:, None, None, :]  # [rows, 1, 1, total]; generated columns are always real
        self.positions = positions[rows, -1] + 1
        self.length = length
        return self._logits(x[rows, -1])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Appends ``tokens`` [rows] at the next column; returns the next logits [rows, vocab]."""
        column, num_rows = self.length, tokens.shape[0]
        if column >= self.keys[0].shape[2]:
            raise RuntimeError("LlamaDecoder.step: more steps than max_new_tokens")
        cos, sin = self._rope(self.positions)  # [rows, D]
        cos, sin = cos[:, None], sin[:, None]
        mask = self.mask[..., :column + 1]
        x = self.embed[tokens]
        for index, layer in enumerate(self.layers):
            q, k, v = self._attention_inputs(x, layer, cos, sin)  # [rows, heads, D]
            keys, values = self.keys[index], self.values[index]
            keys.select(2, column).copy_(k)
            values.select(2, column).copy_(v)
            # queries grouped by their K/V head (transformers' repeat_kv order): no K/V copies
            attended = F.scaled_dot_product_attention(
                q.reshape(num_rows, self.kv_heads, self.heads // self.kv_heads, self.head_dim),
                keys.narrow(2, 0, column + 1), values.narrow(2, 0, column + 1), attn_mask=mask, scale=1.0)
            x = x + _project(attended.reshape(num_rows, -1), layer[2])
            self._mlp(x, layer)
        self.length += 1
        self.positions = self.positions + 1
        return self._logits(x)


def lean_decoder(model: torch.nn.Module, fuse: Optional[bool] = None) -> Optional[LlamaDecoder]:
    """A :class:`LlamaDecoder` for ``model`` (counted as the fast path ``sampling.lean_decode``), or None with a
    once-per-reason warning when the layout is not supported (the sampler then uses the transformers forward)."""
    try:
        decoder = LlamaDecoder(model, fuse)
    except Unsupported as why:
        warn_not_taken(FAST_PATH, f"{why}; the sampler uses the model's own forward")
        return None
    fast_path_taken(FAST_PATH)
    return decoder
