"""Python tanh-GELUs swapped for torch's fused kernel: the same function, nothing persisted."""
import pytest
import torch

from mmalign.testing import build_tiny_causal_lm
from mmalign.text.models import fuse_activations, load_causal_lm


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


def test_sigmoid_form_is_torchs_tanh_gelu_with_its_gradient():
    from mmalign.text.fast_layers import SigmoidTanhGELU

    act = SigmoidTanhGELU()
    assert isinstance(act, torch.nn.GELU) and act.approximate == "tanh"
    x = torch.linspace(-12, 12, 2001, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(act(x), torch.nn.functional.gelu(x, approximate="tanh"), rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(act(x).sum(), x)
    (expected,) = torch.autograd.grad(torch.nn.functional.gelu(x, approximate="tanh").sum(), x)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(act, (torch.randn(3, 7, dtype=torch.float64, requires_grad=True),))
    x32 = torch.randn(4, 9, 33) * 4
    torch.testing.assert_close(act(x32), torch.nn.functional.gelu(x32, approximate="tanh"), rtol=1e-6, atol=1e-6)
    # extremes: no inf/nan where the sigmoid saturates
    big = torch.tensor([-1e4, -80.0, 80.0, 1e4], requires_grad=True)
    out = act(big)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(big.grad).all()
    torch.testing.assert_close(out.detach(), torch.tensor([0.0, 0.0, 80.0, 1e4]))


def test_sigmoid_form_leaves_half_precision_to_torch(monkeypatch):
    from mmalign.text import fast_layers

    act = fast_layers.SigmoidTanhGELU()
    calls = []
    monkeypatch.setattr(fast_layers._TanhGELUBySigmoid, "apply", lambda x: calls.append(x) or x)
    x = torch.randn(5, dtype=torch.bfloat16)
    torch.testing.assert_close(act(x), torch.nn.functional.gelu(x, approximate="tanh"))
    assert not calls
    act(torch.randn(5))
    assert len(calls) == 1
