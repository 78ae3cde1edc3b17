"""Per-sequence response log-likelihoods of a causal LM (SPEC §0: prompt tokens masked), memory-efficiently.

``sequence_logprobs`` runs ONE forward over a batch that concatenates every chosen and rejected member, then
scores only the response tokens:

1. only the logits of positions that predict a response token are kept (``logits_to_keep`` where the model
   supports it trims the prompt-only prefix before the LM head; then a row selection);
2. the token log-prob ``log_softmax(logits)[label]`` is computed by :class:`SelectedTokenLogProb`, an autograd
   function that works in float32 on row chunks (16 MiB of float32 each) and saves only the (model-dtype) logits
   for backward, where the softmax is recomputed chunk by chunk — never a full-vocabulary float32 ``log_softmax``
   copy, only one chunk at a time; for the logits the LM head just produced (nothing else holds them) the
   backward writes the gradient into the saved float32 logits in place, so no second [M, V] tensor is allocated
   at the start of backward, where a step's memory peaks;
3. token log-probs are summed per sequence (``index_add_``).

During the forward, grouped key/value heads go to sdpa without copies
(:mod:`mmalign.text.modeling.grouped_query`) and RMSNorm outputs are recomputed in backward instead of kept
(:mod:`mmalign.text.modeling.norm_recompute`).

``shared_prompt_logprobs`` scores the collator's shared-prompt layout (``PreferenceCollator(share_prompt=True)``):
one row per example holding the prompt once and then every response, with a block attention mask (each response
sees the prompt and itself, never another response) and position ids that restart each response where the prompt
ends — the same log-probs as the padded layout with the prompt encoded once instead of once per group member.
``batch_logprobs`` picks the function for a collated batch.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, ContextManager, Iterator, Mapping, Optional

import torch

from mmalign.text.modeling.fallbacks import fast_path_taken, warn_not_taken
from mmalign.text.modeling.grouped_query import grouped_query_sdpa
from mmalign.text.modeling.norm_recompute import recompute_norm_outputs
from mmalign.text.modeling.rotary import fused_rotary
from mmalign.text.modeling.scored_last_layer import is_compiled, last_layer_on_scored_rows
from mmalign.text.modeling.scored_head import has_output_layer, lm_head_on_rows

from mmalign.text.modeling.loading import unwrap

__all__ = [
    "SelectedTokenLogProb", "token_logprobs", "sequence_logprobs", "shared_prompt_logprobs", "batch_logprobs",
    "shared_prompt_attention_mask", "attention_implementation", "SHARED_PROMPT_ATTENTION", "gather_groups",
    "shared_prompt_slower_on",
]

# attention implementations that take an arbitrary 4D mask as given (transformers hands a 4D mask through as-is)
SHARED_PROMPT_ATTENTION = ("eager", "sdpa")

# with the LM-head row hook, the head's input rows are taken straight from the [B, T, H] hidden states instead of
# first trimming them to [B, K, H] through ``logits_to_keep`` (one index forward and backward fewer). False: trim
# first (A/B benches)
HOOK_ON_ALL_POSITIONS = True
_HOOK_MISSED = "_mmalign_head_hook_missed"  # set on a model whose output layer the row hook did not reach


def shared_prompt_slower_on(device: torch.device) -> Optional[str]:
    """Why ``training.share_prompt: auto`` keeps the padded layout on ``device`` (None: the shared layout is used).

    The shared layout saves the prompt's repeated compute but attends through a dense [T, T] block mask: on CPU
    that wins (bench/RESULTS.md), on CUDA the mask rules out the flash kernel and causal block skipping, and a row
    holds the prompt and all 2k responses, so attention grows with the square of the whole group."""
    if device.type == "cuda":
        return ("on CUDA its dense block mask has no flash kernel: measured on an H200 (Llama-3.2-1B shape, bf16), "
                "the DPO step took 1.14x and the mDPO (k = 4) step 1.69x the padded layout's at 2048 tokens "
                "(at 512, 0.5-2.8% less: bench/RESULTS.md, GPU); set training.share_prompt: on to use it anyway")
    return None


# float32 elements per chunk in the log-softmax. CPU: 4 Mi elements = 16 MiB of float32 at a time (SmolLM2's 49k
# vocabulary gives 85-row chunks; a larger chunk only adds a transient [chunk, V] tensor on top of the step's
# activations). Accelerators: 64 Mi (a float32 chunk and its softmax: ~0.5 GiB transient), because with a 128k
# vocabulary 4 Mi is 32 rows and the H200 run's 12k scored rows per step became ~400 chunks of small kernels in each
# direction (~5k launches; estimated at a few % of that 0.45 s step, not measured: bench/gpu's focused plan times
# the old size as "mmalign-noshare-smallchunks").
_CHUNK_ELEMENTS = 1 << 22
_CHUNK_ELEMENTS_ACCELERATOR = 1 << 26


def default_chunk_rows(logits: torch.Tensor) -> int:
    """Rows per log-softmax chunk for ``logits`` [M, V] on their device."""
    elements = _CHUNK_ELEMENTS if logits.device.type == "cpu" else _CHUNK_ELEMENTS_ACCELERATOR
    return max(1, elements // max(1, logits.shape[-1]))

# autograd nodes whose output tensor no backward saves: logits made by one of them can take their own gradient
# in place (the LM head's matmul on 2-D rows, its 3-D reshape, the row gather of the fallback path)
_FRESH_OUTPUT_NODES = ("MmBackward0", "AddmmBackward0", "UnsafeViewBackward0", "IndexBackward0")


class SelectedTokenLogProb(torch.autograd.Function):
    """``log_softmax(logits)[label]`` per row, float32, chunked; backward = ``onehot(label) − softmax``.

    ``in_place``: backward overwrites the saved logits with their gradient (in their dtype) instead of
    allocating one; only for logits nothing else uses (a second backward through the same graph then fails loudly
    on autograd's version check instead of reading overwritten values)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int, in_place: bool = False) -> torch.Tensor:
        rows = logits.shape[0]
        out = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for start in range(0, rows, chunk_rows):
            end = min(rows, start + chunk_rows)
            # the fused log_softmax kernel on one chunk (a chunk-sized float32 temporary, freed right away)
            out[start:end] = torch.log_softmax(logits[start:end].float(), dim=-1).gather(
                -1, labels[start:end].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, labels)
        ctx.chunk_rows = chunk_rows
        ctx.in_place = in_place
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, labels = ctx.saved_tensors
        grad_logits = logits if ctx.in_place else torch.empty_like(logits)
        grad_output = grad_output.float()
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            end = min(logits.shape[0], start + ctx.chunk_rows)
            g = grad_output[start:end].unsqueeze(-1)
            if ctx.in_place and logits.dtype == torch.float32:  # the softmax written over its own logits chunk
                chunk = torch.softmax(logits[start:end], dim=-1, out=grad_logits[start:end]).mul_(-g)
                chunk.scatter_add_(-1, labels[start:end].unsqueeze(-1), g)
                continue
            # recomputed softmax (fused kernel) instead of a stored [M, V] float32 one
            chunk = torch.softmax(logits[start:end].float(), dim=-1).mul_(-g)
            chunk.scatter_add_(-1, labels[start:end].unsqueeze(-1), g)
            grad_logits[start:end] = chunk  # (in place: over the chunk just read, in the logits' dtype)
        if ctx.in_place:
            fast_path_taken("LM-head gradient in place")
        return grad_logits, None, None, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: Optional[int] = None, *,
                   reuse_logits: bool = False) -> torch.Tensor:
    """log-probs [M] (float32) of ``labels`` [M] under ``logits`` [M, V] without a float32 [M, V] copy.

    ``reuse_logits``: the caller hands over ``logits`` (nothing else reads them later); the backward then writes
    their gradient into them instead of a new [M, V] tensor when they are contiguous and the output of a layer that
    saves no output (``_FRESH_OUTPUT_NODES``); otherwise a warning says once why not."""
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(logits)
    in_place = reuse_logits and logits.is_contiguous() and type(logits.grad_fn).__name__ in _FRESH_OUTPUT_NODES
    if reuse_logits and logits.requires_grad and not in_place:
        warn_not_taken("LM-head gradient in place", f"the logits ({type(logits.grad_fn).__name__}, "
                       f"{'contiguous' if logits.is_contiguous() else 'strided'}) may be saved by another backward "
                       "node; their gradient gets its own [M, V] tensor")
    return SelectedTokenLogProb.apply(logits, labels, chunk_rows, in_place)


def _takes_kwarg(module: torch.nn.Module, name: str) -> tuple[bool, bool]:
    """(``name`` is a named parameter of ``module.forward``, the forward takes ``**kwargs``)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False, False
    return name in params, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model(..., logits_to_keep=k)`` reaches a causal-LM forward that understands it.

    Wrappers (DDP/DeepSpeed ``module``, PEFT ``PeftModel.base_model`` -> ``LoraModel.model``) are unwrapped through
    their registered submodules (``_modules``), not attribute lookup: PEFT forwards unknown attributes to the
    wrapped model, so ``hasattr(peft_model, "lm_head")`` is true and would stop the search at the wrapper, whose
    ``forward(*args, **kwargs)`` does not name the argument. A wrapper is only crossed when its forward passes
    ``**kwargs`` on; the search stops at the module owning the LM head.
    """
    cached = getattr(model, "_mmalign_logits_to_keep", None)
    if cached is not None:
        return cached
    inner, accepted = model, False
    for _ in range(8):  # wrappers nest a few levels at most
        named, passes_kwargs = _takes_kwarg(inner, "logits_to_keep")
        if named:
            accepted = True
            break
        if not passes_kwargs or "lm_head" in inner._modules:
            break
        children = inner._modules
        inner = next((children[a] for a in ("module", "base_model", "model") if isinstance(children.get(a), torch.nn.Module)), None)
        if inner is None:
            break
    try:
        model._mmalign_logits_to_keep = accepted
    except AttributeError:
        pass
    return accepted


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Public form of :func:`_accepts_logits_to_keep` (the fast-path report asks it)."""
    return _accepts_logits_to_keep(model)


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    logits_start: Optional[int] = None,
    chunk_rows: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of response-token log-probs per sequence [N] (float32) and response token counts [N].

    ``loss_mask`` [N, T] marks the tokens to score (the responses). Token ``t`` is scored with the logits at
    ``t − 1``, so the first position can never be scored (a prompt always has >= 1 token).
    ``logits_start``: the first position whose logits are needed (shortest prompt − 1), a host int from the
    collator; when None it is read from ``loss_mask`` (one small device sync).
    """
    target_mask = loss_mask[:, 1:]
    if logits_start is None:
        any_scored = target_mask.any(0)
        first = int(any_scored.float().argmax()) if bool(any_scored.any()) else 0
    else:
        first = int(logits_start)
    seq_len = input_ids.shape[1]
    kwargs = {}
    if first > 0 and _accepts_logits_to_keep(model):
        # Logits for positions first .. T-2 (they predict tokens first+1 .. T-1); the LM head skips the rest.
        kwargs["logits_to_keep"] = seq_len - first
    if "logits_to_keep" in kwargs:  # logits for positions first .. T-2 (the last one predicts nothing)
        labels, mask = input_ids[:, first + 1 :], target_mask[:, first:]
    else:
        labels, mask = input_ids[:, 1:], target_mask
    # the LM head on the M scored rows only (mmalign.text.modeling.scored_head), not on every kept position, then a gather
    shape = (input_ids.shape[0], kwargs.get("logits_to_keep", seq_len))
    inner = unwrap(model)
    with lm_head_on_rows(inner, lambda hidden: hidden[:, :-1][mask], shape) as hook, _scoring_forward(inner):
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    logits = outputs.logits
    del outputs
    selected_logits = _scored_logits(logits, hook, labels[mask].shape[0], lambda: logits[:, :-1][mask])  # [M, V]
    selected_labels = labels[mask]
    del logits
    token_lp = token_logprobs(selected_logits, selected_labels, chunk_rows, reuse_logits=True)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(mask)[mask]
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    sums = sums.index_add(0, rows, token_lp)
    counts = mask.sum(-1)
    return sums, counts


@contextlib.contextmanager
def _scoring_forward(inner: torch.nn.Module, last_layer: Optional[ContextManager] = None) -> Iterator[None]:
    """The forward-time fast paths of a scoring forward of ``inner`` (the model unwrapped of DDP/compile), with
    the last-layer block, when given, entered before the norm recomputation hooks the layer's norms (it refuses
    hooked layers)."""
    with grouped_query_sdpa(inner), last_layer or contextlib.nullcontext(), recompute_norm_outputs(inner), \
            fused_rotary(inner):
        yield


def attention_implementation(model: torch.nn.Module) -> str:
    config = getattr(unwrap(model), "config", None)  # PEFT models forward ``config`` to the base model
    return getattr(config, "_attn_implementation", None) or "eager"


def shared_prompt_attention_mask(segment_ids: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] mask of the shared-prompt layout: query i sees key j <= i when j is a prompt token or in i's
    own segment. Every token also sees itself, so padding rows are never fully masked (no NaN in the softmax).
    Boolean (True = attend) for sdpa; additive float (0 / dtype min) for eager, which adds the mask to the scores."""
    if implementation not in SHARED_PROMPT_ATTENTION:
        raise ValueError(f"the shared-prompt layout needs attn_implementation in {SHARED_PROMPT_ATTENTION}, "
                         f"not {implementation!r}: set training.share_prompt: off or model.attn_implementation")
    length = segment_ids.shape[1]
    positions = torch.arange(length, device=segment_ids.device)
    causal = positions[None, :] <= positions[:, None]  # [T(query), T(key)]
    key_segment = segment_ids[:, None, :]
    visible = (key_segment == 0) | (key_segment == segment_ids[:, :, None])
    allowed = (causal & visible) | torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    allowed = allowed[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _mask_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    parameter = next(model.parameters(), None)
    return parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32


def shared_prompt_logprobs(model: torch.nn.Module, batch: Mapping[str, Any], chunk_rows: Optional[int] = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member response log-likelihood sums [N] (float32) and token counts [N] for a shared-prompt batch.

    One forward over B rows (not N member sequences); the LM head runs only on the M scored rows (a pre-hook on
    the output layer), or, without an output layer to hook, at ``logit_positions`` when the model takes
    ``logits_to_keep`` as an index tensor.
    """
    input_ids = batch["input_ids"]
    device = input_ids.device
    implementation, dtype = attention_implementation(model), _mask_dtype(model, device)
    # the policy and the reference forward of a step see the same batch: build its [B, 1, T, T] mask once
    masks = batch.setdefault("_attention_masks", {}) if isinstance(batch, dict) else {}
    mask = masks.get((implementation, dtype))
    if mask is None:
        mask = masks[(implementation, dtype)] = shared_prompt_attention_mask(batch["segment_ids"], implementation, dtype)
    kwargs = {}
    inner = unwrap(model)
    # rows from all positions only while the row hook applies: once it missed, trim through logits_to_keep again
    hooked = HOOK_ON_ALL_POSITIONS and has_output_layer(inner) and not getattr(inner, _HOOK_MISSED, False)
    keep = _accepts_logits_to_keep(model) and not hooked
    if keep:
        kwargs["logits_to_keep"] = batch["logit_positions"]
    rows, columns = batch["score_rows"], batch["score_logit_index"] if keep else batch["score_positions"]
    # the LM head on the M scored rows only (mmalign.text.modeling.scored_head), not on B x K positions then a gather
    shape = (input_ids.shape[0], batch["logit_positions"].shape[0] if keep else input_ids.shape[1])
    last_layer = last_layer_on_scored_rows(inner, batch["score_rows"], batch["score_positions"], *input_ids.shape,
                                           cache=masks, compiled=is_compiled(model))
    with lm_head_on_rows(inner, lambda hidden: hidden[rows, columns], shape) as hook, _scoring_forward(inner, last_layer):
        outputs = model(input_ids=input_ids, attention_mask=mask, position_ids=batch["position_ids"],
                        use_cache=False, **kwargs)
    logits = outputs.logits
    del outputs
    if hooked and hook is not None and not hook.calls:
        setattr(inner, _HOOK_MISSED, True)
    selected_logits = _scored_logits(logits, hook, rows.shape[0], lambda: logits[rows, columns])  # [M, V]
    del logits
    token_lp = token_logprobs(selected_logits, batch["score_labels"], chunk_rows, reuse_logits=True)
    members = batch["score_members"]
    num_members = int(batch["num_members"])
    sums = torch.zeros(num_members, dtype=torch.float32, device=device).index_add(0, members, token_lp)
    counts = torch.bincount(members, minlength=num_members)
    return sums, counts


def _scored_logits(logits: torch.Tensor, hook, rows: int, gather: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The [M, V] scored logits: the output as is when the LM head ran on the scored rows, else ``gather()``."""
    if hook is not None and hook.calls == 1 and logits.dim() == 2 and logits.shape[0] == rows:
        return logits
    if hook is not None and hook.calls:
        raise RuntimeError(f"the output layer ran {hook.calls} times in one forward on hidden states of the hooked "
                           f"shape (logits {tuple(logits.shape)}): cannot tell which are the scored rows")
    warn_not_taken("LM head on the scored rows", "the model's output layer did not receive the hidden states "
                   "(get_output_embeddings); the full logits are computed, then the scored rows gathered")
    return gather()


def batch_logprobs(model: torch.nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member response log-likelihoods and token counts of a :class:`~mmalign.text.data.PreferenceCollator`
    batch, in either layout."""
    if "segment_ids" in batch:
        return shared_prompt_logprobs(model, batch)
    return sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                             logits_start=batch.get("logits_start"))


def gather_groups(per_sequence: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[N] per-sequence values -> [B, k] by the collator's member index (-1 = missing member, filled with 0)."""
    values = per_sequence[index.clamp_min(0)]
    return torch.where(index >= 0, values, torch.zeros((), dtype=values.dtype, device=values.device))
