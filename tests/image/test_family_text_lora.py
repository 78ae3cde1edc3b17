"""SDXL text-encoder LoRA (``model.text_encoder_lora``): both CLIP encoders train beside the UNet, the reference
conditions on the base encoders, and ``pipe.load_lora_weights(dir)`` restores all three adapters."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from mmalign.image.families.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sdxl", tmp_path_factory.mktemp("te-lora-sdxl"))


def _states(pipe, prompts):
    with torch.no_grad():
        states, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    return states, pooled


def test_sdxl_text_encoder_lora_trains_saves_and_reloads(tiny_sdxl, toy_data, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from mmalign.image.training import train

    summary = train({"output_dir": str(tmp_path / "run"),
                     "model": {"name_or_path": str(tiny_sdxl), "text_encoder_lora": True},
                     "lora": {"r": 4, "alpha": 4, "dropout": 0.0},
                     "data": {"train": str(toy_data), "resolution": 64},
                     "training": {"max_steps": 3, "batch_size": 2, "progress_bar": False, "learning_rate": 5e-2}})
    model = summary["model"]
    encoders = model.text_encoders
    assert sorted(encoders) == ["text_encoder", "text_encoder_2"]
    for encoder in encoders.values():  # lora_B starts at zero: it moved, in float32
        lora_b = [p for n, p in encoder.named_parameters() if "lora_B" in n]
        assert lora_b and all(p.dtype == torch.float32 for p in lora_b)
        assert max(p.abs().max().item() for p in lora_b) > 0
    prompts = ["a red square", "a blue circle"]
    base = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    base_states, base_pooled = _states(base, prompts)
    encoded = model.encode_prompts(prompts)
    # the reference conditions on the base encoders; the policy on the adapted ones
    # the trained model sits on the trainer's device (CUDA where there is one); the base pipeline on the CPU
    torch.testing.assert_close(encoded["reference_states"].cpu(), base_states)
    torch.testing.assert_close(encoded["reference_pooled"].cpu(), base_pooled)
    assert not torch.allclose(encoded["states"].cpu(), base_states)
    assert encoded["states"].requires_grad  # gradients reach the text encoders' adapters

    final = Path(summary["final_dir"])
    keys = load_file(str(final / "pytorch_lora_weights.safetensors")).keys()
    assert {key.split(".")[0] for key in keys} == {"unet", "text_encoder", "text_encoder_2"}

    # pipe.load_lora_weights restores the trained text-encoder adapters (and the UNet's) in a fresh pipeline
    reloaded = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    reloaded.load_lora_weights(str(final))
    states, pooled = _states(reloaded, prompts)
    torch.testing.assert_close(states, encoded["states"].detach().cpu(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pooled, encoded["pooled"].detach().cpu(), rtol=1e-4, atol=1e-5)
    # the reloaded adapter is named default_0 (diffusers' naming), the trained one default
    unet_lora = {n.replace(".default_0.", ".default."): p for n, p in reloaded.unet.named_parameters()
                 if "lora_B" in n}
    trained = {n: p for n, p in model.unet.named_parameters() if "lora_B" in n}
    assert unet_lora and sorted(unet_lora) == sorted(trained)
    for name, parameter in trained.items():
        torch.testing.assert_close(unet_lora[name].float(), parameter.detach().float().cpu())


def test_text_encoder_lora_is_refused_where_it_cannot_apply(tiny_sdxl, toy_data, tmp_path):
    from mmalign.image.families.tiny import save_tiny_pipeline
    from mmalign.image.training import train

    common = {"output_dir": str(tmp_path / "run"), "data": {"train": str(toy_data), "resolution": 64},
              "training": {"max_steps": 1, "batch_size": 2, "progress_bar": False}}
    with pytest.raises(ValueError, match="text_encoder_lora: for sdxl"):
        train({**common, "model": {"name_or_path": str(tiny_sdxl), "text_encoder_lora": True,
                                   "cache_text_embeddings": True}})
    sd3 = save_tiny_pipeline("sd3", tmp_path / "sd3")
    with pytest.raises(ValueError, match=r"text_encoder_lora: for sdxl \(sd3 here\)"):
        train({**common, "model": {"name_or_path": str(sd3), "text_encoder_lora": True}})
