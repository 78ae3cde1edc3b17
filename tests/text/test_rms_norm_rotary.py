"""Llama-family RMSNorm and RoPE as one autograd function each (issue #20): the same values as transformers' code
(the norm's forward bit-identical, RoPE's to float rounding), gradients checked against float64, used only where
they apply, and a replaced RoPE function is reported instead of silently running transformers' code."""
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import mmalign.text.modeling.logprobs as logprobs
from mmalign.testing import build_tiny_tokenizer, tiny_preference_rows
from mmalign.text.data import PreferenceCollator, PreferenceTokenizer, parse_preference_rows
from mmalign.text.modeling import fallbacks
from mmalign.text.modeling.fast_paths import fast_path_report
from mmalign.text.modeling.loading import apply_lora, fuse_activations
from mmalign.text.modeling.rms_norm import RMSNormFunction, is_fused_rms_norm, use_fused_rms_norms
from mmalign.text.modeling.rotary import FUSED_ROTARY, RotaryFunction, enable_fused_rotary, fused_rotary

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _transformers_rope(q, k, cos, sin):
    original = modeling_llama.apply_rotary_pos_emb
    return getattr(original, "__wrapped__", original)(q, k, cos, sin)


def _norm(hidden: int, dtype=torch.float32) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    return norm


@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen-weight", "trained-weight"])
def test_the_fused_norm_gives_transformers_outputs_and_float64_gradients(train_weight):
    torch.manual_seed(0)
    norm = _norm(24)
    norm.weight.requires_grad_(train_weight)
    x = (torch.randn(3, 5, 24) * 3).requires_grad_()
    grad = torch.randn(3, 5, 24)
    assert use_fused_rms_norms(torch.nn.ModuleList([norm])) == 1 and is_fused_rms_norm(norm)
    fused = norm(x)
    assert fused.grad_fn.name() == "RMSNormFunctionBackward"
    assert torch.equal(fused, LlamaRMSNorm.forward(norm, x))  # the same operations in the same order
    fused.backward(grad)
    x64, norm64 = x.detach().double().requires_grad_(), _norm(24, torch.float64)
    with torch.no_grad():
        norm64.weight.copy_(norm.weight.double())
    norm64.weight.requires_grad_(train_weight)
    LlamaRMSNorm.forward(norm64, x64).backward(grad.double())
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-6)
    if train_weight:
        torch.testing.assert_close(norm.weight.grad, norm64.weight.grad.float(), rtol=1e-5, atol=1e-5)
    else:
        assert norm.weight.grad is None


def test_the_fused_norm_passes_gradcheck_and_leaves_other_dtypes_to_transformers():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-6), (x, weight))
    for dtype in (torch.bfloat16, torch.float64):  # transformers computes these in float32: its own forward runs
        norm = _norm(6, dtype)
        use_fused_rms_norms(torch.nn.ModuleList([norm]))
        x_other = torch.randn(4, 6, dtype=dtype, requires_grad=True)
        out = norm(x_other)
        assert out.grad_fn.name() != "RMSNormFunctionBackward"
        assert torch.equal(out, LlamaRMSNorm.forward(norm, x_other))


def test_rope_as_one_function_matches_transformers_and_passes_gradcheck():
    torch.manual_seed(1)
    q = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 7, 8, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(2, 7, 4, dtype=torch.float64)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    expected_q, expected_k = _transformers_rope(q, k, cos, sin)
    got_q = RotaryFunction.apply(q, cos.unsqueeze(1), sin.unsqueeze(1))
    got_k = RotaryFunction.apply(k, cos.unsqueeze(1), sin.unsqueeze(1))
    torch.testing.assert_close(got_q, expected_q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_k, expected_k, rtol=1e-12, atol=1e-12)
    # unequal halves of cos/sin too (the formula does not assume transformers' cat(freqs, freqs))
    cos2, sin2 = torch.randn(2, 1, 7, 8, dtype=torch.float64), torch.randn(2, 1, 7, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: RotaryFunction.apply(t, cos2, sin2), (q,))


def _llama(tokenizer, fused: bool):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         rope_theta=100000.0, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if fused:
        fuse_activations(model)
    model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    torch.manual_seed(2)
    for name, p in model.named_parameters():  # LoRA B starts at 0: make the adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


@pytest.mark.parametrize("share_prompt", [False, True], ids=["padded", "shared"])
def test_scoring_with_the_fused_norm_and_rope_matches_transformers(share_prompt):
    tokenizer = build_tiny_tokenizer()
    examples, _ = parse_preference_rows(tiny_preference_rows(4, kind="pairs", seed=5))
    batch = PreferenceCollator(tokenizer.pad_token_id, share_prompt=share_prompt)(PreferenceTokenizer(tokenizer)(examples))
    results = []
    for fused in (False, True):
        model = _llama(tokenizer, fused)
        fallbacks.reset_warnings()
        logps, _ = logprobs.batch_logprobs(model, dict(batch))
        (logps * torch.linspace(-1, 1, logps.numel())).sum().backward()
        assert (fallbacks.FAST_PATH_CALLS[FUSED_ROTARY] == 1) == fused
        results.append((logps.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (plain_logps, plain_grads), (fused_logps, fused_grads) = results
    torch.testing.assert_close(fused_logps, plain_logps, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_rope_is_transformers_outside_the_scoring_block():
    tokenizer = build_tiny_tokenizer()
    model = _llama(tokenizer, fused=True)
    wrapped = modeling_llama.apply_rotary_pos_emb
    assert getattr(wrapped, "mmalign_fused_rotary", False)
    q, k = torch.randn(2, 3, 5, 16, requires_grad=True), torch.randn(2, 1, 5, 16, requires_grad=True)
    cos, sin = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    outside = wrapped(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(outside, wrapped.__wrapped__(q, k, cos, sin)))
    assert outside[0].grad_fn.name() != "RotaryFunctionBackward"
    with fused_rotary(model):
        inside = wrapped(q, k, cos, sin)
    assert inside[0].grad_fn.name() == "RotaryFunctionBackward"
    torch.testing.assert_close(inside[0], outside[0], rtol=1e-6, atol=1e-6)


def test_rope_that_would_broadcast_q_or_k_to_a_larger_shape_stays_transformers():
    tokenizer = build_tiny_tokenizer()
    model = _llama(tokenizer, fused=True)
    q, k = torch.randn(1, 3, 5, 16), torch.randn(1, 1, 5, 16)
    cos, sin = torch.randn(2, 5, 16), torch.randn(2, 5, 16)  # a batch of 2 angles for one query row
    with fused_rotary(model):
        got = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    expected = _transformers_rope(q, k, cos, sin)
    assert got[0].shape == expected[0].shape == (2, 3, 5, 16)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_replaced_rope_function_is_reported_once(monkeypatch, caplog):
    tokenizer = build_tiny_tokenizer()
    model = _llama(tokenizer, fused=True)
    assert enable_fused_rotary(model) is None
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", _transformers_rope)  # somebody else's patch
    fallbacks.reset_warnings()
    with caplog.at_level(logging.WARNING, logger="mmalign"):
        for _ in range(2):
            with fused_rotary(model):
                pass
        report = fast_path_report(model, direct_forward=True, fused_activations=True, share_prompt_setting="off",
                                  share_prompt=False, adamw_blocker=None)
    assert not report.fused_rotary and "model.fused_activations (RoPE)" in report.not_taken
    warnings = [r.getMessage() for r in caplog.records if FUSED_ROTARY in r.getMessage()]
    assert len(warnings) == 1 and "replaced after mmalign wrapped it" in warnings[0]
    assert fallbacks.FAST_PATH_CALLS[FUSED_ROTARY] == 0
