"""Fast batched sampling of many completions per prompt from a causal LM (evaluation, RNG data).

``model.generate(num_return_sequences=n)`` copies each prompt n times and pre-fills every copy; for short
answers the pre-fill dominates. :func:`sample_completions` pre-fills each distinct prompt once, copies its KV
cache to the n sample rows, then decodes all rows together, stopping as soon as every row has ended. It also
records each sampled token's predictive entropy (SPEC §6) at no extra cost.

``fast_decode=True`` (online training's rollouts) decodes Llama-layout models with the lean decoder of
:mod:`mmalign.text.modeling.decode` (other layouts keep the model's forward, with a warning once) and draws each
token by inverse CDF from one uniform per row, which on CPU is 6-25x cheaper than ``torch.multinomial`` (same
distribution, another random stream: the samples of a seed differ from ``fast_decode=False``'s).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmalign.text.modeling.decode import lean_decoder

__all__ = ["Samples", "sample_completions", "stop_token_ids"]


@dataclass
class Samples:
    """``texts[i][j]``: the j-th completion for prompt i (decoded, special tokens dropped);
    ``num_tokens[i][j]``: its length in tokens (the end-of-sequence token not counted);
    ``token_entropy[i][j]``: mean entropy (nats) of the sampling distribution over its tokens (0 if empty);
    ``finished[i][j]``: whether it ended with an end-of-sequence token within ``max_new_tokens``;
    ``token_ids[i][j]``: the sampled ids, the end-of-sequence token included when finished (online training);
    ``logprob[i][j]``: their summed log-probability under the sampling distribution (temperature applied,
    before top-p)."""

    texts: list[list[str]]
    num_tokens: list[list[int]]
    token_entropy: list[list[float]]
    finished: list[list[bool]]
    token_ids: list[list[list[int]]] = field(default_factory=list)
    logprob: list[list[float]] = field(default_factory=list)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The end-of-sequence ids of the tokenizer and the model's generation config (chat models have several)."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else list(source))
    if not ids:
        raise ValueError("sampling: neither the tokenizer nor the model defines an end-of-sequence token")
    return sorted(ids)


def _filter_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the smallest set of tokens whose mass reaches ``top_p`` (nucleus sampling)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def _draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row from (unnormalised) ``probs`` by inverse CDF: the first index whose cumulative mass
    exceeds ``u · total`` (float64 sums, so no float32 rounding of the tail; a zero-mass token is never drawn)."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def _chunks(counts: list[int], batch_size: int) -> list[list[tuple[int, int]]]:
    """Split (prompt, n samples) work into chunks of at most ``batch_size`` rows; a prompt may span chunks."""
    chunks: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    rows = 0
    for prompt_index, count in enumerate(counts):
        while count > 0:
            take = min(count, batch_size - rows)
            current.append((prompt_index, take))
            rows += take
            count -= take
            if rows == batch_size:
                chunks.append(current)
                current, rows = [], 0
    if current:
        chunks.append(current)
    return chunks


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: list[str],
    *,
    n: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    add_special_tokens: bool = False,
    fast_decode: bool = False,
) -> Samples:
    """Sample ``n`` completions for each prompt (already formatted, e.g. with the chat template applied).

    Args:
        temperature: 0 means greedy decoding (then all n samples agree).
        top_p: nucleus sampling mass, in (0, 1].
        seed: the samples are a deterministic function of the seed, the prompts and ``batch_size``.
        batch_size: rows (prompt copies) decoded together; bounds the KV-cache memory.
        add_special_tokens: passed to the tokenizer (False for chat-formatted prompts that already hold BOS).
        fast_decode: the lean decoder and the inverse-CDF draw (module docstring); the same distribution, a
            different stream of samples for a seed.
    """
    if n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"sample_completions: n, max_new_tokens and batch_size must be >= 1 (got {n}, "
                         f"{max_new_tokens}, {batch_size})")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"sample_completions: need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    if not prompts:
        return Samples([], [], [], [], [], [])
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    stop_tensor = torch.tensor(stops, device=device)

    texts = [[] for _ in prompts]
    num_tokens = [[] for _ in prompts]
    entropies = [[] for _ in prompts]
    finished_flags = [[] for _ in prompts]
    token_ids = [[] for _ in prompts]
    logprob_sums = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # every row's last prompt token sits in the last column
    try:
        decoder = lean_decoder(model) if fast_decode else None
        for chunk in _chunks([n] * len(prompts), batch_size):
            distinct = [prompt_index for prompt_index, _ in chunk]
            encoded = tokenizer(
                [prompts[i] for i in distinct], return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
            ).to(device)
            attention = encoded["attention_mask"]
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            rows = torch.repeat_interleave(
                torch.arange(len(chunk), device=device), torch.tensor([count for _, count in chunk], device=device)
            )
            if decoder is not None:
                logits = decoder.prefill(encoded["input_ids"], attention, rows, max_new_tokens)
            else:
                out = model(
                    input_ids=encoded["input_ids"], attention_mask=attention, position_ids=positions, use_cache=True
                )
                cache = out.past_key_values
                cache.reorder_cache(rows)  # copy each prompt's cache to its sample rows (index_select)
                logits = out.logits[:, -1, :].float()[rows]
            attention = attention[rows]
            next_position = positions[rows, -1:] + 1
            num_rows = rows.numel()
            generated = torch.full((num_rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
            entropy_sum = torch.zeros(num_rows, device=device)
            logprob_sum = torch.zeros(num_rows, device=device)
            lengths = torch.zeros(num_rows, dtype=torch.long, device=device)
            done = torch.zeros(num_rows, dtype=torch.bool, device=device)
            for step in range(max_new_tokens):
                if temperature == 0:
                    log_probs = torch.log_softmax(logits, dim=-1)
                    token = log_probs.argmax(dim=-1)
                else:
                    log_probs = torch.log_softmax(logits / temperature, dim=-1)
                    probs = log_probs.exp()
                    if top_p < 1:
                        probs = _filter_top_p(probs, top_p)
                    token = (_draw(probs, generator) if fast_decode
                             else torch.multinomial(probs, 1, generator=generator).squeeze(-1))
                step_entropy = -(log_probs.exp() * log_probs).nan_to_num().sum(-1)
                is_stop = torch.isin(token, stop_tensor)
                active = ~done
                logprob_sum += torch.where(active, log_probs.gather(-1, token[:, None]).squeeze(-1), 0.0)
                token = torch.where(active, token, torch.full_like(token, pad_id))
                generated[:, step] = token
                counts_now = active & ~is_stop
                entropy_sum += torch.where(counts_now, step_entropy, torch.zeros_like(step_entropy))
                lengths += counts_now.long()
                done |= is_stop
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                if decoder is not None:
                    logits = decoder.step(token)
                    continue
                attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
                out = model(
                    input_ids=token[:, None], attention_mask=attention, position_ids=next_position,
                    past_key_values=cache, use_cache=True,
                )
                cache = out.past_key_values
                logits = out.logits[:, -1, :].float()
                next_position = next_position + 1
            row = 0
            for prompt_index, count in chunk:
                for _ in range(count):
                    length = int(lengths[row])
                    texts[prompt_index].append(
                        tokenizer.decode(generated[row, :length].tolist(), skip_special_tokens=True)
                    )
                    num_tokens[prompt_index].append(length)
                    entropies[prompt_index].append(float(entropy_sum[row]) / length if length else 0.0)
                    finished_flags[prompt_index].append(bool(done[row]))
                    token_ids[prompt_index].append(generated[row, :length + int(done[row])].tolist())
                    logprob_sums[prompt_index].append(float(logprob_sum[row]))
                    row += 1
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return Samples(texts, num_tokens, entropies, finished_flags, token_ids, logprob_sums)
