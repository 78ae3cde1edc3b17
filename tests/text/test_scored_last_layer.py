"""The last decoder layer run on the scored positions only (issue #20): the same log-probs and gradients as the
layer on every position (GPT-2 and Llama layouts, full and LoRA), the position table it uses, and the cases it
must leave alone, which say so once."""
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import mmalign.text.modeling.logprobs as logprobs
import mmalign.text.modeling.scored_last_layer as scored_last_layer
from mmalign.testing import build_tiny_tokenizer, tiny_preference_rows
from mmalign.text.data import PreferenceCollator, PreferenceTokenizer, parse_preference_rows
from mmalign.text.modeling import fallbacks
from mmalign.text.modeling.loading import apply_lora, fuse_activations
from mmalign.text.modeling.scored_last_layer import SCORED_LAST_LAYER, last_layer, scored_position_table

TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _model(tokenizer, layout: str, lora: bool):
    torch.manual_seed(0)
    if layout == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tokenizer.pad_token_id)
    else:  # SmolLM2's layout, small: grouped-query attention 3:1, RoPE, tied embeddings
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True,
                             max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    fuse_activations(model)
    if lora:
        model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=TARGETS[layout])
        for name, p in model.named_parameters():  # LoRA B starts at 0: make the adapter matter
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return model.train()


def _batch(tokenizer):
    examples, _ = parse_preference_rows(tiny_preference_rows(6, kind="pairs", seed=5))
    return PreferenceCollator(tokenizer.pad_token_id, share_prompt=True)(PreferenceTokenizer(tokenizer)(examples))


def _scored(model, batch, on: bool, monkeypatch):
    monkeypatch.setattr(scored_last_layer, "USE_SCORED_LAST_LAYER", on)
    model.zero_grad(set_to_none=True)
    before = fallbacks.FAST_PATH_CALLS[SCORED_LAST_LAYER]
    logps, _ = logprobs.batch_logprobs(model, dict(batch))
    (logps * torch.linspace(-1, 1, logps.numel())).sum().backward()
    taken = fallbacks.FAST_PATH_CALLS[SCORED_LAST_LAYER] - before
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, taken


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_the_scored_rows_give_the_full_layers_logprobs_and_gradients(tokenizer, layout, lora, monkeypatch):
    model, batch = _model(tokenizer, layout, lora), _batch(tokenizer)
    fallbacks.reset_warnings()
    full_logps, full_grads, full_taken = _scored(model, batch, False, monkeypatch)
    logps, grads, taken = _scored(model, batch, True, monkeypatch)
    assert (full_taken, taken) == (0, 1)
    torch.testing.assert_close(logps, full_logps, rtol=1e-6, atol=1e-6)
    assert grads.keys() == full_grads.keys() and len(grads) > 4
    for name, grad in full_grads.items():  # the last layer's own parameters too (fewer rows, same sums)
        error = (grads[name] - grad).abs().max().item()  # sums over other row counts: rounding, relative to the scale
        assert error <= 1e-5 * grad.abs().max().item() + 1e-9, (name, error)
    assert "forward" not in last_layer(model)[0].__dict__  # the layer's own forward is back after the block


def test_the_position_table_holds_each_rows_distinct_positions_padded():
    # row 0: positions 2, 3, 3 (a duplicate: both responses' first token is scored from the last prompt token), 5
    # row 1: none; row 2: position 1
    rows, columns = torch.tensor([0, 0, 0, 0, 2]), torch.tensor([3, 2, 3, 5, 1])
    table, real = scored_position_table(rows, columns, batch=3, length=7)
    assert table.tolist() == [[2, 3, 5], [0, 0, 0], [1, 1, 1]]
    assert real.tolist() == [0, 1, 2, 6]  # flat slots of the real entries in the [3 x 3] table


def test_a_hooked_last_layer_runs_as_it_is_and_says_why(tokenizer, monkeypatch, caplog):
    model, batch = _model(tokenizer, "llama", lora=True), _batch(tokenizer)
    seen = []
    last_layer(model)[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    fallbacks.reset_warnings()
    with caplog.at_level(logging.WARNING, logger="mmalign"):
        for _ in range(2):
            _, _, taken = _scored(model, batch, True, monkeypatch)
            assert taken == 0
    warnings = [r.getMessage() for r in caplog.records if SCORED_LAST_LAYER in r.getMessage()]
    assert warnings == [f"fast path {SCORED_LAST_LAYER} not taken: hooks on the last decoder layer or a module in it: "
                        "the last layer runs on every position"]
    assert len(seen) == 2  # the hook saw both forwards, on every position


def test_a_hook_inside_the_last_layer_keeps_the_layers_own_forward(tokenizer, monkeypatch):
    model, batch = _model(tokenizer, "llama", lora=False), _batch(tokenizer)
    expected, _, _ = _scored(model, batch, False, monkeypatch)
    # a hook that changes the attention output: the scored path must not bypass it
    last_layer(model)[0].self_attn.register_forward_hook(lambda module, args, out: (out[0] * 0.5,) + tuple(out[1:]))
    hooked_full, _, _ = _scored(model, batch, False, monkeypatch)
    hooked, _, taken = _scored(model, batch, True, monkeypatch)
    assert taken == 0 and not torch.equal(hooked_full, expected)
    assert torch.equal(hooked, hooked_full)


def test_another_threads_forward_during_a_block_runs_the_whole_layer(tokenizer):
    import threading

    model = _model(tokenizer, "gpt2", lora=False).eval()
    batch = _batch(tokenizer)
    input_ids = batch["input_ids"]
    mask = logprobs.shared_prompt_attention_mask(batch["segment_ids"], "sdpa", torch.float32)
    call = dict(input_ids=torch.flip(input_ids, [0]), attention_mask=torch.flip(mask, [0]),
                position_ids=torch.flip(batch["position_ids"], [0]), use_cache=False)
    with torch.no_grad():
        expected = model(**call).logits
        seen = {}
        with scored_last_layer.last_layer_on_scored_rows(model, batch["score_rows"], batch["score_positions"],
                                                         *input_ids.shape):
            thread = threading.Thread(target=lambda: seen.update(logits=model(**call).logits))
            thread.start()
            thread.join()
            inside = model(**call).logits  # this thread's forward takes the block's table (other rows: zeros)
    assert torch.equal(seen["logits"], expected)
    assert not torch.equal(inside, expected)


def test_an_unknown_last_layer_says_why_once(caplog):
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    fallbacks.reset_warnings()
    with caplog.at_level(logging.WARNING, logger="mmalign"):
        for _ in range(2):
            with scored_last_layer.last_layer_on_scored_rows(model, torch.tensor([0]), torch.tensor([1]), 1, 3):
                pass
    warnings = [r.getMessage() for r in caplog.records if SCORED_LAST_LAYER in r.getMessage()]
    assert len(warnings) == 1 and "the last layer is a Linear" in warnings[0]


def test_a_compiled_model_keeps_its_last_layer_and_says_why(tokenizer, caplog):
    model = _model(tokenizer, "gpt2", lora=False)
    wrapper = torch.nn.Module()
    wrapper._orig_mod = model  # what torch.compile's wrapper looks like to the scoring code
    assert scored_last_layer.is_compiled(wrapper) and not scored_last_layer.is_compiled(model)
    fallbacks.reset_warnings()
    with caplog.at_level(logging.WARNING, logger="mmalign"):
        with scored_last_layer.last_layer_on_scored_rows(model, torch.tensor([0]), torch.tensor([1]), 1, 3,
                                                         compiled=True):
            assert "forward" not in last_layer(model)[0].__dict__
    assert any("torch.compile" in r.getMessage() for r in caplog.records if SCORED_LAST_LAYER in r.getMessage())
