"""The shared-prompt layout: each prompt encoded once for all its responses gives the padded layout's log-probs and
gradients, on every supported attention implementation and model family; training falls back where it does not."""
import json
import logging

import pytest
import torch

import mmalign.text
from mmalign.engine import read_metrics
from mmalign.testing import build_tiny_causal_lm, tiny_preference_rows, write_jsonl
from mmalign.text.data import PreferenceCollator, PreferenceTokenizer, batch_response_ids, parse_preference_rows
from mmalign.text.modeling.logprobs import batch_logprobs, shared_prompt_attention_mask


def _items(tokenizer, kind="groups", n=5, seed=4):
    examples, _ = parse_preference_rows(tiny_preference_rows(n, kind=kind, seed=seed))
    return PreferenceTokenizer(tokenizer)(examples)


def _both_layouts(tokenizer, items):
    return (PreferenceCollator(tokenizer.pad_token_id)(items),
            PreferenceCollator(tokenizer.pad_token_id, share_prompt=True)(items))


def test_layout_holds_each_prompt_once_and_restarts_positions(tiny_tokenizer):
    items = _items(tiny_tokenizer)
    padded, shared = _both_layouts(tiny_tokenizer, items)
    assert shared["input_ids"].shape[0] == len(items) < padded["input_ids"].shape[0]
    assert shared["num_tokens"] < padded["num_tokens"]
    for key in ("chosen_index", "rejected_index", "chosen_lengths", "chosen_mask", "rejected_mask"):
        assert torch.equal(shared[key], padded[key]), key
    assert batch_response_ids(shared) == batch_response_ids(padded)
    item, row = items[0], 0
    prompt_length = len(item["prompt_ids"])
    first = item["chosen_ids"][0]
    segment = shared["segment_ids"][row]
    assert (segment[:prompt_length] == 0).all() and (segment[prompt_length : prompt_length + len(first)] == 1).all()
    second_start = prompt_length + len(first)
    # every response continues the prompt's positions; each response's first token is scored from the prompt's end
    assert shared["position_ids"][row, second_start] == prompt_length
    starts = (shared["score_rows"] == row).nonzero().flatten()
    assert shared["score_positions"][starts[0]] == prompt_length - 1
    assert shared["score_positions"][starts[len(first)]] == prompt_length - 1
    assert torch.equal(shared["logit_positions"][shared["score_logit_index"]], shared["score_positions"])


def test_mask_lets_a_response_see_the_prompt_and_itself_only():
    # prompt of 2, response 1 of 2, response 2 of 1, one padding position
    segments = torch.tensor([[0, 0, 1, 1, 2, -1]])
    allowed = shared_prompt_attention_mask(segments, "sdpa", torch.float32)[0, 0]
    assert allowed[3].tolist() == [True, True, True, True, False, False]
    assert allowed[4].tolist() == [True, True, False, False, True, False]  # never sees response 1
    assert allowed[1].tolist() == [True, True, False, False, False, False]  # causal inside the prompt
    assert allowed.diagonal().all()  # padding sees itself: no fully masked row
    additive = shared_prompt_attention_mask(segments, "eager", torch.bfloat16)[0, 0]
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive == 0, allowed)
    with pytest.raises(ValueError, match="share_prompt"):
        shared_prompt_attention_mask(segments, "flash_attention_2", torch.float32)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_log_probs_and_gradients_equal_the_padded_layout(tiny_tokenizer, arch, implementation):
    model = build_tiny_causal_lm(arch=arch, tokenizer=tiny_tokenizer, seed=3)
    model.config._attn_implementation = implementation
    items = _items(tiny_tokenizer, kind="groups")  # ragged groups of several sizes
    padded, shared = _both_layouts(tiny_tokenizer, items)
    weights = torch.linspace(-1.0, 2.0, shared["num_members"])

    def value_and_grads(batch):
        model.zero_grad()
        logps, counts = batch_logprobs(model, batch)
        (logps * weights).sum().backward()
        return logps.detach(), counts, [p.grad.clone() for p in model.parameters()]

    lp_padded, counts_padded, grads_padded = value_and_grads(padded)
    lp_shared, counts_shared, grads_shared = value_and_grads(shared)
    torch.testing.assert_close(lp_shared, lp_padded, rtol=1e-5, atol=1e-4)
    assert torch.equal(counts_shared, counts_padded)
    for a, b in zip(grads_shared, grads_padded):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_adapter_disabled_reference_in_the_shared_layout(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = build_tiny_causal_lm(tokenizer=tiny_tokenizer, seed=5).eval()
    expected, _ = batch_logprobs(base, _both_layouts(tiny_tokenizer, _items(tiny_tokenizer, kind="pairs"))[0])
    peft_model = get_peft_model(build_tiny_causal_lm(tokenizer=tiny_tokenizer, seed=5),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    shared = _both_layouts(tiny_tokenizer, _items(tiny_tokenizer, kind="pairs"))[1]
    with torch.no_grad(), peft_model.disable_adapter():
        reference, _ = batch_logprobs(peft_model, shared)
    with torch.no_grad():
        adapted, _ = batch_logprobs(peft_model, shared)
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-4)
    assert (adapted - expected).abs().max() > 1e-3


def _config(model_dir, train, out, share_prompt):
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": train},
        "objective": {"name": "mdpo", "beta": 0.1},
        "training": {"batch_size": 4, "max_steps": 4, "logging_steps": 1, "learning_rate": 2e-3,
                     "lr_scheduler": "constant", "progress_bar": False, "plot": False, "num_threads": 1,
                     "share_prompt": share_prompt},
        "output_dir": str(out),
    }


@pytest.fixture(scope="module")
def group_file(tmp_path_factory):
    return str(write_jsonl(tmp_path_factory.mktemp("groups") / "groups.jsonl", tiny_preference_rows(16, kind="groups", seed=7)))


def test_training_losses_match_the_padded_layout(tiny_model_dir, group_file, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mmalign.text.recipes.preference")
    runs = {}
    for setting in ("on", "off"):  # "on", not "auto": auto keeps the padded layout on CUDA (shared_prompt_slower_on)
        summary = mmalign.text.train(_config(tiny_model_dir, group_file, tmp_path / setting, setting))
        runs[setting] = [r["loss"] for r in read_metrics(summary["metrics_path"]) if "loss" in r]
    assert "share_prompt: on" in caplog.text
    assert len(runs["on"]) == 4
    assert runs["on"] == pytest.approx(runs["off"], rel=1e-4, abs=1e-5)


def test_auto_keeps_the_padded_layout_on_cuda_and_shares_on_the_cpu(tiny_tokenizer, caplog):
    from mmalign.text.modeling.logprobs import shared_prompt_slower_on
    from mmalign.text.online import _share_prompt
    from mmalign.text.recipes.preference import _resolve_share_prompt

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert shared_prompt_slower_on(cpu) is None and "H200" in shared_prompt_slower_on(cuda)
    model = build_tiny_causal_lm(arch="llama", tokenizer=tiny_tokenizer, seed=3)
    model.config._attn_implementation = "sdpa"
    items = _items(tiny_tokenizer)
    collator = PreferenceCollator(tiny_tokenizer.pad_token_id)
    caplog.set_level(logging.INFO)
    # decided before the model is moved or run: this CPU-only machine can ask for CUDA here
    assert _resolve_share_prompt("auto", model, items, collator, cuda) is False
    assert "share_prompt: off (auto): on CUDA" in caplog.text
    assert _resolve_share_prompt("auto", model, items, collator, cpu) is True
    assert _share_prompt("auto", model, cuda) is False and _share_prompt("auto", model, cpu) is True
    assert _share_prompt("on", model, cuda) is True  # asked for explicitly: kept


def test_models_that_ignore_the_layout_fall_back_or_stop(tiny_tokenizer, tmp_path, group_file, caplog):
    from transformers import BloomConfig, BloomForCausalLM

    # BLOOM builds ALiBi biases from a 2D mask: the 4D shared-prompt mask cannot serve it
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, n_layer=1, n_head=2,
                                         pad_token_id=tiny_tokenizer.pad_token_id))
    model_dir = tmp_path / "bloom"
    bloom.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    caplog.set_level(logging.INFO, logger="mmalign.text.recipes.preference")
    summary = mmalign.text.train({**_config(model_dir, group_file, tmp_path / "auto", "auto"),
                                  "training": {**_config(model_dir, group_file, "", "auto")["training"], "max_steps": 1}})
    assert summary["global_step"] == 1 and "does not work for this model" in caplog.text  # not the CUDA rule
    with pytest.raises(ValueError, match="training.share_prompt: on"):
        mmalign.text.train(_config(model_dir, group_file, tmp_path / "on", "on"))


def test_share_prompt_setting_is_validated(tiny_model_dir, group_file, tmp_path):
    from mmalign.config import ConfigError, load_config
    from mmalign.text.config import TextTrainConfig

    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(_config(tiny_model_dir, group_file, tmp_path, "yes")))
    with pytest.raises(ConfigError, match="share_prompt"):
        load_config(TextTrainConfig, path)


def _family_config(family, vocab_size, pad_token_id):
    import transformers

    decoder = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, pad_token_id=pad_token_id)
    configs = {
        "qwen2": lambda: transformers.Qwen2Config(**decoder, num_key_value_heads=1),
        "qwen3": lambda: transformers.Qwen3Config(**decoder, num_key_value_heads=1, head_dim=16),
        "mistral": lambda: transformers.MistralConfig(**decoder, num_key_value_heads=1),
        "phi3": lambda: transformers.Phi3Config(**decoder, eos_token_id=None, bos_token_id=None),
        "gemma": lambda: transformers.GemmaConfig(**decoder, num_key_value_heads=2, head_dim=16),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**decoder, eos_token_id=None, bos_token_id=None),
        "opt": lambda: transformers.OPTConfig(vocab_size=vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                              num_attention_heads=2, word_embed_proj_dim=32, pad_token_id=pad_token_id),
        "falcon": lambda: transformers.FalconConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, pad_token_id=pad_token_id),
    }
    return configs[family]()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "phi3", "gemma", "gpt_neox", "opt", "falcon"])
def test_other_model_families_score_the_same_in_both_layouts(tiny_tokenizer, family):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _family_config(family, len(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    padded, shared = _both_layouts(tiny_tokenizer, _items(tiny_tokenizer, kind="groups"))
    for implementation in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()
        with torch.no_grad():
            torch.testing.assert_close(batch_logprobs(model, shared)[0], batch_logprobs(model, padded)[0],
                                       rtol=1e-5, atol=1e-4)


def test_auto_turned_off_by_the_device_is_not_reported_as_a_failed_fast_path(tiny_model_dir, group_file, tmp_path,
                                                                              monkeypatch, caplog):
    import mmalign.text.recipes.preference as preference

    monkeypatch.setattr(preference, "shared_prompt_slower_on", lambda device: "slower on this device")
    caplog.set_level(logging.WARNING, logger="mmalign.engine.fast_paths")
    config = _config(tiny_model_dir, group_file, tmp_path / "auto", "auto")
    summary = mmalign.text.train({**config, "training": {**config["training"], "max_steps": 1}})
    report = summary["fast_paths"]
    assert report["share_prompt"] is False and "training.share_prompt" not in report["not_taken"]
    assert "share_prompt not taken" not in caplog.text
