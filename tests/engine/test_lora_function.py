"""The LoRA autograd function (mmalign.engine.lora_function): the same outputs and gradients as autograd over the
plain products, for both weight layouts, with and without bias, dropout input, input gradient and scaling; taken
only where it applies, counted, and a trained base warned once."""
import logging

import pytest
import torch

from mmalign.engine import fast_path_log
from mmalign.engine.lora_function import LORA_FUNCTION, LoraLinearFunction, lora_linear


def _tensors(weight_in_out: bool, bias: bool, separate: bool, x_grad: bool, dtype=torch.float64, trained="AB"):
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out, r = 13, 7, 5, 3
    x = torch.randn(n, d_in, generator=g, dtype=dtype).requires_grad_(x_grad)
    lora_x = (torch.randn(n, d_in, generator=g, dtype=dtype).requires_grad_(True) if separate else None)
    weight = torch.randn(*((d_in, d_out) if weight_in_out else (d_out, d_in)), generator=g, dtype=dtype)
    b = torch.randn(d_out, generator=g, dtype=dtype) if bias else None
    a = torch.randn(r, d_in, generator=g, dtype=dtype).requires_grad_("A" in trained)
    lora_b = torch.randn(d_out, r, generator=g, dtype=dtype).requires_grad_("B" in trained)
    return x, lora_x, weight, b, a, lora_b


def _plain(x, lora_x, weight, bias, a, lora_b, scaling, weight_in_out):
    y = x @ weight if weight_in_out else x @ weight.t()
    if bias is not None:
        y = y + bias
    return y + scaling * ((x if lora_x is None else lora_x) @ a.t()) @ lora_b.t()


@pytest.mark.parametrize("weight_in_out", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("separate", [False, True], ids=["same-input", "dropout-input"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "x-frozen"])
@pytest.mark.parametrize("trained", ["AB", "A", "B"])
def test_outputs_and_gradients_equal_autograd_over_the_plain_products(weight_in_out, bias, separate, x_grad, trained):
    scaling = 2.5
    inputs = _tensors(weight_in_out, bias, separate, x_grad, trained=trained)
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    upstream = torch.randn(13, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (_plain, LoraLinearFunction.apply):
        y = fn(*inputs, scaling, weight_in_out)
        grads = torch.autograd.grad(y, leaves, upstream)
        results.append((y.detach(), grads))
    (want_y, want_grads), (got_y, got_grads) = results
    torch.testing.assert_close(got_y, want_y, rtol=1e-12, atol=1e-12)
    assert len(got_grads) == len(want_grads) == len(leaves) and all(g.abs().sum() > 0 for g in want_grads)
    for got, want in zip(got_grads, want_grads):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weight_in_out", [False, True], ids=["linear", "conv1d"])
def test_gradcheck(weight_in_out):
    x, lora_x, weight, bias, a, lora_b = _tensors(weight_in_out, True, False, True)
    assert torch.autograd.gradcheck(lambda x, a, b: LoraLinearFunction.apply(x, None, weight, bias, a, b, 0.5,
                                                                             weight_in_out), (x, a, lora_b))


def test_taken_only_where_it_applies_and_a_trained_base_is_warned_once(caplog):
    fast_path_log.reset_warnings()
    x, _, weight, bias, a, lora_b = _tensors(False, True, False, True, dtype=torch.float32)
    with torch.no_grad():
        assert lora_linear(x, None, weight, bias, a, lora_b, 1.0, False) is None  # nothing to differentiate
    # a frozen adapter, even with an input gradient: the plain calls (the function would keep its input for nothing)
    assert lora_linear(x, None, weight, bias, a.detach(), lora_b.detach(), 1.0, False) is None
    assert not fast_path_log.FAST_PATH_CALLS[LORA_FUNCTION]
    y = lora_linear(x, None, weight, bias, a, lora_b, 1.0, False)
    assert type(y.grad_fn).__name__ == "LoraLinearFunctionBackward"
    assert fast_path_log.FAST_PATH_CALLS[LORA_FUNCTION] == 1
    trained = weight.clone().requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="mmalign"):
        for _ in range(2):
            assert lora_linear(x, None, trained, bias, a, lora_b, 1.0, False) is None
    warnings = [r.getMessage() for r in caplog.records if LORA_FUNCTION in r.getMessage()]
    assert warnings == [f"fast path {LORA_FUNCTION} not taken: the LoRA layer's base weight or bias is trained; "
                        "autograd runs the layer"]
    assert fast_path_log.FAST_PATH_CALLS[LORA_FUNCTION] == 1
