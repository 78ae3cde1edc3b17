"""The sampler's lean decoder (mmalign.text.modeling.decode) computes the transformers forward: per-step logits
equal within float tolerance on the tiny Llama and SmolLM2 layouts (with and without LoRA, fused or direct
weights, left padding); the sampler with it keeps its guarantees (shared prompt = per-sample generation, recorded
log-probabilities = the policy's, determinism under a seed, the inverse-CDF draw's distribution); an unsupported
layout falls back to the model's forward with one warning, and the fast path is counted where taken."""
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import mmalign.text
from mmalign.rewards import CallableReward
from mmalign.testing import build_tiny_causal_lm, build_tiny_tokenizer, write_jsonl
from mmalign.text.modeling import fallbacks
from mmalign.text.modeling.decode import FAST_PATH, LlamaDecoder, Unsupported, lean_decoder
from mmalign.text.modeling.loading import apply_lora
from mmalign.text.modeling.sampling import _draw, sample_completions

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["Say hello.", "How do I bake bread? Mix flour, water", "Pick a random number.", "Thanks!"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _ids(tokenizer):
    return {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id}


def build(layout: str, tokenizer, lora: bool = False):
    """The bench's tiny Llama, or SmolLM2-135M's layout cut small (GQA 3:1, tied embeddings, RoPE θ 1e5); with
    LoRA on every projection, its B factors random so the adapter changes the function."""
    if layout == "tiny":
        model = build_tiny_causal_lm(tokenizer=tokenizer)
    elif layout == "smollm2":
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=48, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=3, num_key_value_heads=1, hidden_act="silu", tie_word_embeddings=True,
            rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=256, **_ids(tokenizer)))
    else:
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2,
                                                            n_positions=256, **_ids(tokenizer)))
    if lora:
        model = apply_lora(model, r=4, alpha=8, dropout=0.0,
                           target_modules=LLAMA_TARGETS if layout != "gpt2" else ["c_attn", "c_proj", "c_fc"])
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "direct"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("layout", ["tiny", "smollm2"])
def test_per_step_logits_equal_the_transformers_forward(tokenizer, layout, lora, fuse):
    model = build(layout, tokenizer, lora)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokenizer.padding_side = "left"
    encoded = tokenizer(PROMPTS[:3], return_tensors="pt", padding=True)
    assert (encoded["attention_mask"] == 0).any()  # left padding is exercised
    rows = torch.tensor([0, 0, 1, 2, 2, 2])  # prompts shared by several sample rows
    new = torch.randint(0, len(tokenizer), (rows.numel(), 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        decoder = LlamaDecoder(model, fuse=fuse)
        assert decoder.fused == fuse
        got = [decoder.prefill(encoded["input_ids"], encoded["attention_mask"], rows, new.shape[1] + 1)]
        got += [decoder.step(new[:, i]) for i in range(new.shape[1])]
        ids = torch.cat([encoded["input_ids"][rows], new], 1)
        mask = torch.cat([encoded["attention_mask"][rows], torch.ones_like(new)], 1)
        expected = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    got = torch.stack(got, 1)
    assert got.shape == (rows.numel(), new.shape[1] + 1, len(tokenizer))
    assert torch.allclose(got, expected[:, -new.shape[1] - 1:], atol=2e-5, rtol=1e-4)
    # the model's parameters are never written (LoRA merged into per-call copies)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="more steps"):
        decoder.step(new[:, 0])
        decoder.step(new[:, 0])


def test_a_disabled_adapter_decodes_the_base(tokenizer):
    model = build("smollm2", tokenizer, lora=True)
    ids = tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad(), model.disable_adapter():
        logits = LlamaDecoder(model).prefill(ids["input_ids"], ids["attention_mask"], torch.tensor([0]), 1)
        expected = model(**ids).logits[:, -1]
    assert torch.allclose(logits, expected, atol=2e-5)


@pytest.mark.parametrize("layout", ["tiny", "smollm2"])
def test_the_sampler_keeps_its_guarantees_with_the_lean_decoder(tokenizer, layout):
    from mmalign.text.data import PreferenceCollator
    from mmalign.text.modeling.logprobs import batch_logprobs

    model = build(layout, tokenizer, lora=layout == "smollm2")
    fallbacks.reset_warnings()
    samples = sample_completions(model, tokenizer, PROMPTS[:3], n=4, max_new_tokens=6, seed=5, batch_size=5,
                                 fast_decode=True)
    assert fallbacks.FAST_PATH_CALLS[FAST_PATH] == 1
    # recorded log-probabilities = the policy's log-likelihood of each sample scored alone
    items = [{"prompt_ids": tokenizer(p)["input_ids"], "chosen_ids": ids, "rejected_ids": []}
             for p, ids in zip(PROMPTS[:3], samples.token_ids)]
    with torch.no_grad():
        alone = torch.cat([batch_logprobs(model, PreferenceCollator(tokenizer.pad_token_id)(
            [{**item, "chosen_ids": [ids]}]))[0] for item in items for ids in item["chosen_ids"]])
    assert torch.allclose(torch.tensor([lp for row in samples.logprob for lp in row]), alone, atol=1e-4)
    # a deterministic function of the seed; another seed gives other samples
    again = sample_completions(model, tokenizer, PROMPTS[:3], n=4, max_new_tokens=6, seed=5, batch_size=5,
                               fast_decode=True)
    other = sample_completions(model, tokenizer, PROMPTS[:3], n=4, max_new_tokens=6, seed=6, batch_size=5,
                               fast_decode=True)
    assert again.token_ids == samples.token_ids and other.token_ids != samples.token_ids
    # greedy: the k rows expanded from one pre-filled prompt equal each prompt generated alone, and equal the
    # model-forward sampler's
    together = sample_completions(model, tokenizer, PROMPTS, n=3, max_new_tokens=6, temperature=0, batch_size=12,
                                  fast_decode=True)
    reference = sample_completions(model, tokenizer, PROMPTS, n=3, max_new_tokens=6, temperature=0, batch_size=12)
    assert together.token_ids == reference.token_ids
    for prompt, rows in zip(PROMPTS, together.token_ids):
        alone = sample_completions(model, tokenizer, [prompt], n=1, max_new_tokens=6, temperature=0,
                                   fast_decode=True).token_ids[0][0]
        assert rows == [alone] * 3
    for a, b in zip(together.token_entropy, reference.token_entropy):
        assert a == pytest.approx(b, abs=1e-4)


def test_the_inverse_cdf_draw_has_the_right_distribution():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0]) * 3.0  # unnormalised, with zero-mass tokens
    generator = torch.Generator().manual_seed(0)
    draws = _draw(probs.expand(20000, -1).contiguous(), generator)
    counts = torch.bincount(draws, minlength=5).double() / draws.numel()
    assert counts[1] == 0 and counts[4] == 0
    assert torch.allclose(counts, probs.double() / probs.sum(), atol=0.015)  # ~4 standard errors
    one_hot = torch.zeros(3, 5)
    one_hot[:, 4] = 1.0  # all mass on the last token
    assert _draw(one_hot, generator).tolist() == [4, 4, 4]


def test_an_unsupported_layout_falls_back_with_one_warning(tokenizer, caplog):
    model = build("gpt2", tokenizer)
    fallbacks.reset_warnings()
    with caplog.at_level(logging.WARNING, logger="mmalign"):
        for _ in range(2):
            fast = sample_completions(model, tokenizer, PROMPTS[:2], n=2, max_new_tokens=4, temperature=0,
                                      fast_decode=True)
    plain = sample_completions(model, tokenizer, PROMPTS[:2], n=2, max_new_tokens=4, temperature=0)
    assert fast.token_ids == plain.token_ids
    warnings = [r.getMessage() for r in caplog.records if "fast path" in r.getMessage()]
    assert warnings == [f"fast path {FAST_PATH} not taken: GPT2LMHeadModel is not the Llama layout; the sampler "
                        "uses the model's own forward"]
    assert not fallbacks.FAST_PATH_CALLS[FAST_PATH]


def test_hooks_or_replaced_modules_refuse_the_fast_path(tokenizer):
    model = build("tiny", tokenizer)
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    with pytest.raises(Unsupported, match="hooks on model.layers.0.mlp"):
        LlamaDecoder(model)
    handle.remove()
    LlamaDecoder(model)
    model.model.layers[1].mlp.act_fn = torch.nn.GELU()
    assert lean_decoder(model) is None
    with pytest.raises(Unsupported, match="model.layers.1.mlp.act_fn is a GELU"):
        LlamaDecoder(model)


def test_online_training_takes_the_fast_path_on_the_smollm2_layout_with_lora(tokenizer, tmp_path):
    directory = tmp_path / "smollm2"
    tokenizer.save_pretrained(directory)
    build("smollm2", tokenizer).save_pretrained(directory)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    fallbacks.reset_warnings()
    mmalign.text.online({
        "model": {"name_or_path": str(directory)}, "prompts": {"train": str(prompts)},
        "algorithm": {"name": "grpo"}, "sampling": {"k": 2, "max_new_tokens": 4},
        "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": LLAMA_TARGETS},
        "training": {"batch_size": 2, "max_steps": 2, "progress_bar": False, "plot": False, "num_threads": 1},
        "output_dir": str(tmp_path / "run"),
    }, reward=CallableReward(lambda prompts, outputs: [float(len(o)) for o in outputs], name="length"))
    assert fallbacks.FAST_PATH_CALLS[FAST_PATH] == 2  # one per rollout
    assert not fallbacks.LORA_FALLBACK_CALLS
