"""The σ-form tanh-GELU (mmalign.text.modeling.tanh_gelu): torch's GELU(approximate="tanh") values and gradients to
float rounding, its backward torch's own kernel, its no-grad forward the same numbers as its training forward, and
torch's kernel wherever the σ form is not used."""
import pytest
import torch

import mmalign.text.modeling.tanh_gelu as tanh_gelu
from mmalign.text.modeling.tanh_gelu import SigmoidFormTanhGELU


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-14)])
def test_values_and_gradients_equal_torch_tanh_gelu(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 33, 64, generator=g, dtype=dtype) * 3).requires_grad_()
    upstream = torch.randn(4, 33, 64, generator=g, dtype=dtype)
    want = torch.nn.functional.gelu(x, approximate="tanh")
    (want_grad,) = torch.autograd.grad(want, x, upstream)
    module = SigmoidFormTanhGELU()
    got = module(x)
    assert type(got.grad_fn).__name__ == "_TanhGELUBackward"  # the σ form ran, not torch's kernel
    (got_grad,) = torch.autograd.grad(got, x, upstream)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # the backward is torch's gelu_backward of the same function at the same input: identical bits
    assert torch.equal(got_grad, want_grad)
    with torch.no_grad():
        assert torch.equal(module(x), got.detach())  # reference (no grad) and policy forwards agree exactly
    assert isinstance(module, torch.nn.GELU) and module.approximate == "tanh"


def test_switch_off_and_other_dtypes_use_torch_kernel(monkeypatch):
    x = torch.randn(5, 7, requires_grad=True)
    module = SigmoidFormTanhGELU()
    monkeypatch.setattr(tanh_gelu, "SIGMOID_FORM", False)
    assert type(module(x).grad_fn).__name__ == "GeluBackward0"
    monkeypatch.setattr(tanh_gelu, "SIGMOID_FORM", True)
    assert type(module(x.detach().bfloat16().requires_grad_()).grad_fn).__name__ == "GeluBackward0"
    assert type(module(x).grad_fn).__name__ == "_TanhGELUBackward"
