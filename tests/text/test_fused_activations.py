"""Python tanh-GELUs swapped for torch's fused kernel: the same function, nothing persisted."""
import pytest
import torch

from mmalign.testing import build_tiny_causal_lm
from mmalign.text.modeling.loading import fuse_activations, load_causal_lm


def _gpt2(tiny_tokenizer, activation):
    model = build_tiny_causal_lm(arch="gpt2", tokenizer=tiny_tokenizer, seed=4)
    model.config.activation_function = activation
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(model.config).eval()


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_fast", "gelu_python_tanh"])
def test_fused_gelu_gives_the_same_outputs_and_gradients(tiny_tokenizer, activation):
    model = _gpt2(tiny_tokenizer, activation)
    ids = torch.randint(0, len(tiny_tokenizer), (3, 17))
    before = model(ids).logits
    before.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert fuse_activations(model) == model.config.n_layer
    assert all(isinstance(block.mlp.act, torch.nn.GELU) for block in model.transformer.h)
    after = model(ids).logits
    after.square().mean().backward()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    assert model.config.activation_function == activation  # the saved config is untouched


def test_loading_fuses_by_default_and_not_when_asked(tiny_tokenizer, tmp_path):
    _gpt2(tiny_tokenizer, "gelu_new").save_pretrained(tmp_path)
    fused = load_causal_lm(str(tmp_path))
    plain = load_causal_lm(str(tmp_path), fused_activations=False)
    assert isinstance(fused.transformer.h[0].mlp.act, torch.nn.GELU)
    assert type(plain.transformer.h[0].mlp.act).__name__ == "NewGELUActivation"
    # exact GELU (Llama's SiLU, BERT's erf GELU) is left alone
    llama = build_tiny_causal_lm(tokenizer=tiny_tokenizer)
    assert fuse_activations(llama) == 0


def test_lean_gated_mlp_equals_transformers_forward_and_backward(tiny_tokenizer):
    import copy

    from mmalign.text.modeling.gated_mlp import is_lean_gated_mlp, use_lean_gated_mlps

    plain = build_tiny_causal_lm(tokenizer=tiny_tokenizer)  # Llama layout: SiLU-gated MLPs
    lean = copy.deepcopy(plain)
    assert use_lean_gated_mlps(lean) == plain.config.num_hidden_layers
    assert all(is_lean_gated_mlp(layer.mlp) for layer in lean.model.layers)
    ids = torch.randint(0, plain.config.vocab_size, (3, 12))
    losses = [m(input_ids=ids, labels=ids).loss for m in (plain, lean)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    for (name, a), (_, b) in zip(plain.named_parameters(), lean.named_parameters()):
        assert torch.equal(a.grad, b.grad), name
    # the MLP keeps only gate and up for backward: neither silu(gate) nor the down projection's input h
    saved = {label: len(_saved_storages(model, ids)) for label, model in (("plain", plain), ("lean", lean))}
    assert saved["plain"] - saved["lean"] == 2 * plain.config.num_hidden_layers


def _saved_storages(model, ids) -> set:
    storages = set()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: storages.add(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        model(input_ids=ids)
    return storages


def _llama_with_lora(tiny_tokenizer, *, lean: bool, dropout: float = 0.0):
    from mmalign.text.modeling.loading import apply_lora

    from mmalign.text.modeling.gated_mlp import use_lean_gated_mlps

    model = build_tiny_causal_lm(tokenizer=tiny_tokenizer, seed=7)
    if lean:  # the gated MLP alone (fuse_activations also fuses the norms, whose gradients differ by rounding)
        use_lean_gated_mlps(model)
    torch.manual_seed(0)  # peft draws A from the global generator
    model = apply_lora(model, r=4, alpha=8, dropout=dropout,
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would make every A gradient zero
            p.data.normal_(0, 0.1)
    return model


def test_gated_mlp_recomputes_the_lora_down_projection_input_exactly(tiny_tokenizer):
    from mmalign.text.modeling import fallbacks
    from mmalign.text.modeling.gated_mlp import RECOMPUTED_DOWN_INPUT

    plain, lean = (_llama_with_lora(tiny_tokenizer, lean=flag) for flag in (False, True))
    ids = torch.randint(0, plain.config.vocab_size, (3, 12))
    fallbacks.reset_warnings()
    losses = [m(input_ids=ids, labels=ids).loss for m in (plain, lean)]
    for loss in losses:
        loss.backward()
    assert fallbacks.FAST_PATH_CALLS[RECOMPUTED_DOWN_INPUT] == plain.config.num_hidden_layers
    assert torch.equal(losses[0], losses[1])
    grads = 0
    for (name, a), (_, b) in zip(plain.named_parameters(), lean.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a.grad, b.grad), name
            grads += 1
    assert grads == 2 * 7 * plain.config.num_hidden_layers  # A and B of 7 projections per block
    plain_saved, lean_saved = _saved_storages(plain, ids), _saved_storages(lean, ids)
    assert len(plain_saved) - len(lean_saved) == 2 * plain.config.num_hidden_layers
    # the reference forward (no grad) keeps the plain path
    with torch.no_grad():
        fallbacks.reset_warnings()
        torch.testing.assert_close(lean(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
        assert not fallbacks.FAST_PATH_CALLS


def test_gated_mlp_with_lora_dropout_keeps_the_input_and_says_why(tiny_tokenizer, caplog):
    import logging

    from mmalign.text.modeling import fallbacks
    from mmalign.text.modeling.gated_mlp import RECOMPUTED_DOWN_INPUT

    model = _llama_with_lora(tiny_tokenizer, lean=True, dropout=0.1)
    fallbacks.reset_warnings()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with caplog.at_level(logging.WARNING, logger="mmalign"):
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
    assert not fallbacks.FAST_PATH_CALLS[RECOMPUTED_DOWN_INPUT]
    warnings = [r.getMessage() for r in caplog.records if RECOMPUTED_DOWN_INPUT in r.getMessage()]
    assert len(warnings) == 1 and "LoRA dropout" in warnings[0]


def test_gated_mlp_with_a_hooked_activation_keeps_its_forward(tiny_tokenizer):
    from mmalign.text.modeling.gated_mlp import is_lean_gated_mlp

    model = build_tiny_causal_lm(tokenizer=tiny_tokenizer)
    model.model.layers[0].mlp.act_fn.register_forward_hook(lambda *args: None)
    fuse_activations(model)
    assert not is_lean_gated_mlp(model.model.layers[0].mlp) and is_lean_gated_mlp(model.model.layers[1].mlp)
