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
