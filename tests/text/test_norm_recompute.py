"""RMSNorm outputs recomputed in backward instead of kept (issue #20): the same log-probs and bit-identical
gradients as keeping them, the outputs really are not kept, and the cases it must not touch are left alone."""
import contextlib
import gc
import logging
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import mmalign.text.modeling.logprobs as logprobs
from mmalign.testing import build_tiny_tokenizer, tiny_preference_rows
from mmalign.text.data import PreferenceCollator, PreferenceTokenizer, parse_preference_rows
from mmalign.text.modeling import fallbacks
from mmalign.text.modeling.loading import apply_lora, fuse_activations
from mmalign.text.modeling.norm_recompute import NORM_RECOMPUTE, recompute_norm_outputs

LAYERS = 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(save_dir=tmp_path_factory.mktemp("tok"))


def _model(tokenizer, lora: bool):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    fuse_activations(model)
    if lora:
        model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=TARGETS)
        for name, p in model.named_parameters():  # LoRA B starts at 0: make the adapter matter
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return model.train()


def _batch(tokenizer, share_prompt: bool):
    examples, _ = parse_preference_rows(tiny_preference_rows(4, kind="pairs", seed=5))
    return PreferenceCollator(tokenizer.pad_token_id, share_prompt=share_prompt)(PreferenceTokenizer(tokenizer)(examples))


def _scored(model, batch, recompute: bool, monkeypatch):
    if not recompute:
        monkeypatch.setattr(logprobs, "recompute_norm_outputs", lambda m: contextlib.nullcontext())
    model.zero_grad(set_to_none=True)
    logps, _ = logprobs.batch_logprobs(model, dict(batch))
    (logps * torch.linspace(-1, 1, logps.numel())).sum().backward()
    monkeypatch.undo()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("share_prompt", [False, True], ids=["padded", "shared"])
def test_same_logprobs_and_bit_identical_gradients(tokenizer, lora, share_prompt, monkeypatch):
    model = _model(tokenizer, lora)
    batch = _batch(tokenizer, share_prompt)
    kept_logps, kept_grads = _scored(model, batch, False, monkeypatch)
    fallbacks.reset_warnings()
    logps, grads = _scored(model, batch, True, monkeypatch)
    assert fallbacks.FAST_PATH_CALLS[NORM_RECOMPUTE] == 1
    assert torch.equal(logps, kept_logps)
    assert grads.keys() == kept_grads.keys() and grads
    for name, grad in kept_grads.items():
        assert torch.equal(grads[name], grad), name


@pytest.mark.parametrize("recompute", [False, True])
def test_the_norm_outputs_are_not_kept(tokenizer, recompute, monkeypatch):
    model = _model(tokenizer, lora=True)
    outputs = []
    import mmalign.text.modeling.rms_norm as rms_norm

    plain = rms_norm.rms_norm  # (a hook on the modules would turn the fast path off)
    monkeypatch.setattr(rms_norm, "rms_norm", lambda *args: outputs.append(plain(*args)) or outputs[-1])
    ids = torch.randint(0, len(tokenizer), (2, 9))
    fallbacks.reset_warnings()
    with recompute_norm_outputs(model) if recompute else contextlib.nullcontext():
        loss = model(input_ids=ids).logits.square().mean()
    refs = [weakref.ref(out) for out in outputs]
    del outputs[:]
    gc.collect()
    kept = sum(ref() is not None for ref in refs)
    # two norms per layer feed trained projections; the final norm's output feeds the (frozen, tied) LM head
    assert kept == (0 if recompute else 2 * LAYERS)
    loss.backward()  # and backward still runs (recomputing them)
    assert fallbacks.FAST_PATH_CALLS[NORM_RECOMPUTE] == int(recompute)


def test_an_output_changed_in_place_is_kept_as_it_is():
    norm = LlamaRMSNorm(6)
    weight = torch.randn(6, 3, requires_grad=True)
    x = torch.randn(4, 6, requires_grad=True)
    fallbacks.reset_warnings()
    with recompute_norm_outputs(torch.nn.ModuleList([norm])):
        y = norm(x)
        y.mul_(3.0)  # a recipe would recompute the values before this change
        (y @ weight).square().sum().backward()
    grad = weight.grad.clone()
    weight.grad = None
    (((norm(x) * 3.0) @ weight).square().sum()).backward()
    assert torch.equal(weight.grad, grad)
    assert fallbacks.FAST_PATH_CALLS[NORM_RECOMPUTE] == 0


def test_a_hooked_norm_is_left_alone_and_says_why(tokenizer, caplog):
    model = _model(tokenizer, lora=True)
    seen = []
    next(m for m in model.modules() if isinstance(m, LlamaRMSNorm)).register_forward_hook(
        lambda mod, a, out: seen.append(out.shape))
    fallbacks.reset_warnings()
    ids = torch.randint(0, len(tokenizer), (2, 9))
    with caplog.at_level(logging.WARNING, logger="mmalign"):
        for _ in range(2):
            with recompute_norm_outputs(model):
                model(input_ids=ids).logits.sum().backward()
    warnings = [r.getMessage() for r in caplog.records if NORM_RECOMPUTE in r.getMessage()]
    assert warnings == [f"fast path {NORM_RECOMPUTE} not taken: hooks or a forward of its own on an RMSNorm module: norm outputs are kept "
                        "for backward"]
    assert fallbacks.FAST_PATH_CALLS[NORM_RECOMPUTE] == 0 and len(seen) == 2


def test_no_grad_forwards_and_models_without_rms_norms_run_unchanged(tokenizer):
    model = _model(tokenizer, lora=False)
    fallbacks.reset_warnings()
    with torch.no_grad(), recompute_norm_outputs(model):
        model(input_ids=torch.randint(0, len(tokenizer), (1, 5)))
    with recompute_norm_outputs(torch.nn.Linear(3, 3)):
        pass
    assert fallbacks.FAST_PATH_CALLS[NORM_RECOMPUTE] == 0


def test_checkpointing_turned_on_after_a_recomputed_forward_is_seen(tokenizer, caplog):
    """The eligibility check caches which modules carry the checkpointing flag, but reads the flags each forward."""
    model = _model(tokenizer, lora=True)
    fallbacks.reset_warnings()
    ids = torch.randint(0, len(tokenizer), (2, 9))
    with recompute_norm_outputs(model):
        model(input_ids=ids).logits.sum().backward()
    assert fallbacks.FAST_PATH_CALLS[NORM_RECOMPUTE] == 1
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with caplog.at_level(logging.WARNING, logger="mmalign"):
        with recompute_norm_outputs(model):
            model(input_ids=ids).logits.sum().backward()
    assert fallbacks.FAST_PATH_CALLS[NORM_RECOMPUTE] == 1
    assert any("activation checkpointing keeps its own saved tensors" in r.getMessage() for r in caplog.records)
