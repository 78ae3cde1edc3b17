"""The text trainer's fast paths are taken on the layouts the benchmarks measure — the tiny GPT-2 and SmolLM2-135M's
Llama layout (built small from a config) — so a dependency change that disables one fails here instead of showing
up in a benchmark weeks later (issue #20). And a fast path that is not taken says so, once, with the reason."""
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import mmalign.text
from mmalign.engine.lora_function import LORA_FUNCTION
from mmalign.engine.trainer import fused_adamw_blocker
from mmalign.testing import build_tiny_tokenizer, tiny_preference_rows, write_jsonl
from mmalign.text.modeling import fallbacks
from mmalign.text.modeling.fast_paths import fast_path_report
from mmalign.text.modeling.gated_mlp import RECOMPUTED_DOWN_INPUT
from mmalign.text.modeling.grouped_query import GROUPED_QUERY_SDPA
from mmalign.text.modeling.loading import apply_lora, fuse_activations
from mmalign.text.modeling.norm_recompute import NORM_RECOMPUTE
from mmalign.text.modeling.rotary import FUSED_ROTARY
from mmalign.text.modeling.scored_last_layer import SCORED_LAST_LAYER

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def layout_config(layout: str, tokenizer):
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
           "bos_token_id": tokenizer.bos_token_id}
    if layout == "gpt2":  # the benchmark's tiny model, narrower; activation gelu_new (a Python tanh-GELU)
        return GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    # SmolLM2-135M's architecture (LlamaForCausalLM: grouped-query attention 3:1, SiLU MLP, tied embeddings,
    # RoPE θ 1e5, RMSNorm ε 1e-5) with the widths and depth cut
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=3, num_key_value_heads=1, hidden_act="silu", tie_word_embeddings=True,
                       rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=256, **ids)


@pytest.fixture(scope="module", params=["gpt2", "smollm2"])
def layout_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"layout-{request.param}")
    tokenizer = build_tiny_tokenizer(save_dir=directory)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(layout_config(request.param, tokenizer)).save_pretrained(directory)
    return request.param, directory


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_every_fast_path_is_taken_on_the_benchmarked_layouts(layout_dir, lora, tmp_path, caplog):
    layout, directory = layout_dir
    fallbacks.reset_warnings()
    train_file = str(write_jsonl(tmp_path / "pairs.jsonl", tiny_preference_rows(8, kind="pairs", seed=3)))
    with caplog.at_level(logging.WARNING, logger="mmalign"):
        summary = mmalign.text.train({
            "model": {"name_or_path": str(directory)},
            "data": {"train": train_file},
            "objective": {"name": "dpo", "beta": 0.1},
            "lora": {"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0,
                     "target_modules": GPT2_TARGETS if layout == "gpt2" else LLAMA_TARGETS},
            # share_prompt "on": "auto" keeps the padded layout on CUDA (shared_prompt_slower_on)
            "training": {"batch_size": 4, "max_steps": 2, "logging_steps": 1, "progress_bar": False, "plot": False,
                         "num_threads": 1, "save_total_limit": None, "share_prompt": "on"},
            "output_dir": str(tmp_path / "out"),
        })
    report = summary["fast_paths"]
    assert report["not_taken"] == {}
    assert report["share_prompt"] and report["fused_adamw"] and report["logits_to_keep"]
    if layout == "gpt2":
        assert report["layout"].startswith("gpt2")
        assert report["fused_gelus"] == 2 and report["python_gelus"] == 0  # one MLP GELU per block
    else:
        assert report["layout"].startswith("llama")
        assert report["fused_gelus"] == 0 and report["python_gelus"] == 0  # SiLU: nothing to fuse
        assert report["lean_gated_mlps"] == 2 and report["plain_gated_mlps"] == 0  # one gated MLP per block
        # two RMSNorms per block and the final one, as one autograd function each; RoPE too
        assert report["fused_rms_norms"] == 2 * 2 + 1 and report["plain_rms_norms"] == 0 and report["fused_rotary"]
    expected_lora = (4 if layout == "gpt2" else 7) * 2 if lora else 0  # adapted projections per block × 2 blocks
    assert report["lora_layers"] == report["lora_direct_layers"] == expected_lora
    # during training (policy, adapter-disabled reference, share_prompt check) no call fell back to peft's forward
    assert not fallbacks.LORA_FALLBACK_CALLS
    # every LoRA layer of every policy forward ran as one autograd function (down_proj: inside the lean gated MLP)
    per_forward = expected_lora - (2 if lora and layout != "gpt2" else 0)
    assert fallbacks.FAST_PATH_CALLS[LORA_FUNCTION] == 2 * per_forward
    # every training step's backward wrote the LM head's gradient into its logits (no second [M, V] tensor)
    assert fallbacks.FAST_PATH_CALLS["LM-head gradient in place"] == 2
    # every gated MLP of every policy forward recomputed its down projection's input in backward instead of keeping it
    assert fallbacks.FAST_PATH_CALLS[RECOMPUTED_DOWN_INPUT] == (0 if layout == "gpt2" else 2 * 2)
    # grouped key/value heads (3:1) go to sdpa without repeat_kv copies in every scoring forward (GPT-2 has none)
    calls = fallbacks.FAST_PATH_CALLS[GROUPED_QUERY_SDPA]
    assert calls == 0 if layout == "gpt2" else calls >= 2 * 2  # policy and reference forward of each step
    # every policy forward keeps its RMSNorm outputs as recipes (the no-grad reference keeps nothing; GPT-2 has none)
    assert fallbacks.FAST_PATH_CALLS[NORM_RECOMPUTE] == (0 if layout == "gpt2" else 2)
    # every scoring forward (policy and reference) ran its RoPE as one function (GPT-2 has learned positions)
    calls = fallbacks.FAST_PATH_CALLS[FUSED_ROTARY]
    assert calls == 0 if layout == "gpt2" else calls >= 2 * 2
    # the last decoder layer ran on the scored positions only in every scoring forward (policy and reference)
    assert fallbacks.FAST_PATH_CALLS[SCORED_LAST_LAYER] >= 2 * 2
    assert not [r for r in caplog.records if "fast path" in r.getMessage()]


def test_a_path_not_taken_is_reported_once_with_the_reason(caplog):
    tokenizer = build_tiny_tokenizer()
    model = AutoModelForCausalLM.from_config(layout_config("gpt2", tokenizer))  # GELUs left in Python
    model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=GPT2_TARGETS, direct_forward=False)
    fallbacks.reset_warnings()
    with caplog.at_level(logging.WARNING, logger="mmalign"):
        for _ in range(2):
            report = fast_path_report(model, direct_forward=True, fused_activations=True, share_prompt_setting="auto",
                                      share_prompt=False, adamw_blocker=fused_adamw_blocker([torch.zeros(2, dtype=torch.int64)]))
    assert set(report.not_taken) == {"lora.direct_forward", "model.fused_activations", "training.share_prompt",
                                     "fused AdamW"}
    assert "8 of 8 LoRA layers" in report.not_taken["lora.direct_forward"]
    assert "2 such module(s) are left" in report.not_taken["model.fused_activations"]
    assert "cpu/int64" in report.not_taken["fused AdamW"]
    warnings = [r.getMessage() for r in caplog.records if "fast path" in r.getMessage()]
    assert len(warnings) == 4  # once each, not once per call
    # the same model after fusing and with the setting off: nothing to report
    fuse_activations(model)
    report = fast_path_report(model, direct_forward=False, fused_activations=True, share_prompt_setting="off",
                              share_prompt=False, adamw_blocker=None)
    assert report.not_taken == {} and report.fused_gelus == 2


def test_a_per_call_fallback_is_counted_and_warned_once(caplog):
    tokenizer = build_tiny_tokenizer()
    model = apply_lora(AutoModelForCausalLM.from_config(layout_config("smollm2", tokenizer)), r=4, alpha=8,
                       dropout=0.0, target_modules=LLAMA_TARGETS)
    fallbacks.reset_warnings()
    fallbacks.reset_warnings()
    ids = torch.randint(0, len(tokenizer), (2, 7))
    with caplog.at_level(logging.WARNING, logger="mmalign"), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
        model(ids)
    assert fallbacks.LORA_FALLBACK_CALLS == {"autocast": 2 * 14}
    warnings = [r.getMessage() for r in caplog.records if "fast path" in r.getMessage()]
    assert warnings == ["fast path lora.direct_forward not taken: autocast; this call goes through peft's forward"]
