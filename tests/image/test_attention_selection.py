"""Attention kernel selection: xformers only on CUDA (imported lazily), torch SDPA otherwise."""
import pytest
import torch

from mmalign.image.models import configure_attention


def _unet(tiny_sd_path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cpu_gets_sdpa_and_refuses_a_required_xformers(tiny_sd_path):
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = _unet(tiny_sd_path)
    assert configure_attention(unet, "auto") == "sdpa"
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    assert configure_attention(unet, "sdpa") == "sdpa"
    with pytest.raises(ValueError, match="xformers.*CUDA"):
        configure_attention(unet, "xformers")
    with pytest.raises(ValueError, match="expected auto, xformers or sdpa"):
        configure_attention(unet, "flash")


class _BrokenXformersOps:
    """xformers as a wheel built for another torch/CUDA behaves: it imports, then every attention call raises."""

    @staticmethod
    def memory_efficient_attention(query, key, value):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs: ...")


def _fake_xformers(monkeypatch, ops):
    import sys
    import types

    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


def test_an_importable_xformers_whose_kernels_fail_is_reported_not_used(monkeypatch):
    from mmalign.image.models import xformers_failure

    _fake_xformers(monkeypatch, _BrokenXformersOps)
    why = xformers_failure(torch.float32, device="cpu")
    assert why is not None and "NotImplementedError" in why and "No operator found" in why

    class WorkingOps:
        calls = []

        @staticmethod
        def memory_efficient_attention(query, key, value):
            WorkingOps.calls.append(query.shape)
            return query * 1.0

    _fake_xformers(monkeypatch, WorkingOps)
    assert xformers_failure(torch.float32, device="cpu") is None and WorkingOps.calls


def test_auto_falls_back_to_sdpa_with_a_warning_when_xformers_cannot_run(tiny_sd_path, monkeypatch, caplog):
    from diffusers.models.attention_processor import AttnProcessor2_0

    import mmalign.image.models as models
    from mmalign.engine.fast_path_log import reset_warnings

    reset_warnings()
    unet = _unet(tiny_sd_path)
    enabled = []
    monkeypatch.setattr(unet, "enable_xformers_memory_efficient_attention", lambda: enabled.append(True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # decides as on a CUDA machine
    monkeypatch.setattr(models, "xformers_failure", lambda dtype: "a test call failed: NotImplementedError")
    with caplog.at_level("WARNING", logger="mmalign.engine.fast_paths"):
        assert configure_attention(unet, "auto") == "sdpa"
    assert not enabled and all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    assert "xformers attention not taken: a test call failed" in caplog.text
    with pytest.raises(ValueError, match=r"cannot be used \(a test call failed"):
        configure_attention(unet, "xformers")
    monkeypatch.setattr(models, "xformers_failure", lambda dtype: None)  # a working xformers is still chosen
    assert configure_attention(unet, "auto") == "xformers" and enabled == [True]

    def diffusers_check_fails():
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` (float32)")

    monkeypatch.setattr(unet, "enable_xformers_memory_efficient_attention", diffusers_check_fails)
    with caplog.at_level("WARNING", logger="mmalign.engine.fast_paths"):
        assert configure_attention(unet, "auto") == "sdpa"  # diffusers' own float32 check failing: SDPA, no crash
    assert "enable_xformers_memory_efficient_attention failed" in caplog.text
    with pytest.raises(ValueError, match="enable_xformers_memory_efficient_attention failed"):
        configure_attention(unet, "xformers")
