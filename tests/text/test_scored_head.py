"""The LM head run on the scored rows only (mmalign.text.modeling.scored_head) gives the log-probs and gradients of the full
[B, K, V] logits followed by a gather, in both batch layouts, with and without LoRA; a model whose output layer
cannot be hooked falls back to the gather, with a warning."""
import logging

import pytest
import torch

from mmalign.testing import build_tiny_causal_lm, tiny_preference_rows
from mmalign.text.modeling import fallbacks, logprobs, scored_head
from mmalign.text.data import PreferenceCollator, PreferenceTokenizer, parse_preference_rows
from mmalign.text.modeling.logprobs import batch_logprobs
from mmalign.text.modeling.loading import apply_lora


def _batch(tokenizer, share_prompt):
    examples, _ = parse_preference_rows(tiny_preference_rows(6, kind="groups", seed=5))
    return PreferenceCollator(tokenizer.pad_token_id, share_prompt=share_prompt)(PreferenceTokenizer(tokenizer)(examples))


def _logprobs_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    sums, counts = batch_logprobs(model, batch)
    (sums * torch.linspace(0.5, 1.5, sums.shape[0])).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return sums.detach(), counts, grads


@pytest.mark.parametrize("all_positions", [True, False], ids=["rows-from-all-positions", "after-logits-to-keep"])
@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared", "padded"])
@pytest.mark.parametrize("arch,lora", [("llama", False), ("gpt2", True), ("llama", True)])
def test_scored_rows_head_matches_the_full_logits(tiny_tokenizer, share_prompt, arch, lora, all_positions, monkeypatch):
    monkeypatch.setattr(logprobs, "HOOK_ON_ALL_POSITIONS", all_positions)  # the default, and the A/B benches' old side
    model = build_tiny_causal_lm(arch=arch, tokenizer=tiny_tokenizer, seed=1)
    if lora:
        model = apply_lora(model, r=4, alpha=8, dropout=0.0,
                           target_modules=["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "up_proj"])
        for name, p in model.named_parameters():  # non-zero B: the adapters change the logits
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    batch = _batch(tiny_tokenizer, share_prompt)
    calls = []
    original = scored_head._RowsHook.__call__
    monkeypatch.setattr(scored_head._RowsHook, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    direct = _logprobs_and_grads(model, batch)
    assert len(calls) == 1  # the head saw the scored rows, once
    monkeypatch.setattr(scored_head._RowsHook, "__call__", lambda self, module, args: None)  # hook never applies
    fallbacks.reset_warnings()
    gathered = _logprobs_and_grads(model, batch)
    torch.testing.assert_close(direct[0], gathered[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(direct[1], gathered[1])
    for a, b in zip(direct[2], gathered[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_an_unhookable_head_falls_back_to_the_gather_with_a_warning(tiny_tokenizer, monkeypatch, caplog):
    model = build_tiny_causal_lm(arch="llama", tokenizer=tiny_tokenizer)
    batch = _batch(tiny_tokenizer, True)
    expected, _ = batch_logprobs(model, batch)
    monkeypatch.setattr(type(model), "get_output_embeddings", lambda self: None)
    fallbacks.reset_warnings()
    with caplog.at_level(logging.WARNING, logger="mmalign"):
        got, _ = batch_logprobs(model, batch)
        batch_logprobs(model, batch)
    torch.testing.assert_close(got, expected)
    warnings = [r.getMessage() for r in caplog.records if "LM head on the scored rows" in r.getMessage()]
    assert len(warnings) == 1


def test_a_head_the_hook_misses_goes_back_to_logits_to_keep(tiny_tokenizer, monkeypatch, caplog):
    """An output layer that is not what computes the logits: the first forward gathers from the full logits (warned),
    every later one passes logits_to_keep again instead of computing logits at every position."""
    model = build_tiny_causal_lm(arch="llama", tokenizer=tiny_tokenizer)
    batch = _batch(tiny_tokenizer, True)
    expected, _ = batch_logprobs(model, batch)
    unused = torch.nn.Linear(2, 2)
    monkeypatch.setattr(type(model), "get_output_embeddings", lambda self: unused)
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **kw: seen.append("logits_to_keep" in kw) or forward(*a, **kw))
    fallbacks.reset_warnings()
    with caplog.at_level(logging.WARNING, logger="mmalign"):
        first, _ = batch_logprobs(model, batch)
        second, _ = batch_logprobs(model, batch)
    assert seen == [False, True]
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert len([r for r in caplog.records if "LM head on the scored rows" in r.getMessage()]) == 1
