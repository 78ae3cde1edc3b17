"""LoRA on SDXL's two CLIP text encoders (``model.text_encoder_lora``), beside the UNet's.

The adapters go on the encoders' attention projections (``q_proj, k_proj, v_proj, out_proj``, the diffusers SDXL
LoRA scripts' targets) with the ``lora`` section's rank, alpha and dropout, parameters in float32. The reference
is the base model: the reference forward conditions on the encoders with their adapters disabled, the policy on
the adapted ones (with gradients). Saved with ``StableDiffusionXLPipeline.save_lora_weights`` next to the UNet's
layers, so ``pipe.load_lora_weights(dir)`` restores all three. With ``lora.direct_forward`` (default) the encoders'
LoRA layers run the direct forward as the UNet's do.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["TEXT_ENCODER_TARGETS", "add_text_encoder_lora", "text_adapters_disabled", "text_encoder_lora_layers"]

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def add_text_encoder_lora(encoders: nn.ModuleDict, lora) -> dict[str, nn.Module]:
    """Adds a LoRA adapter to every encoder of ``encoders`` (the prompt encoder's); returns them by name."""
    from peft import LoraConfig, inject_adapter_in_model

    adapted = {}
    for name, encoder in encoders.items():
        config = LoraConfig(r=lora.r, lora_alpha=lora.scale_alpha, lora_dropout=lora.dropout,
                            init_lora_weights="gaussian", target_modules=list(TEXT_ENCODER_TARGETS))
        # peft directly: transformers' add_adapter wants a newer peft than the pinned one
        inject_adapter_in_model(config, encoder, adapter_name="default")
        encoder.peft_config = {"default": config}
        for parameter_name, parameter in encoder.named_parameters():
            if "lora_" in parameter_name:
                parameter.data = parameter.data.float()
                parameter.requires_grad_(True)
        if lora.direct_forward:  # the UNet's shortcut (mmalign.image.models.use_direct_lora), same outputs
            from mmalign.image.models import use_direct_lora

            use_direct_lora(encoder)
        adapted[name] = encoder
    return adapted


def _set_adapters(encoders: dict[str, nn.Module], enabled: bool) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for encoder in encoders.values():
        for module in encoder.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(enabled)


@contextlib.contextmanager
def text_adapters_disabled(encoders: dict[str, nn.Module]) -> Iterator[None]:
    _set_adapters(encoders, False)
    try:
        yield
    finally:
        _set_adapters(encoders, True)


def text_encoder_lora_layers(encoders: dict[str, nn.Module]) -> dict[str, dict]:
    """``save_lora_weights`` keyword arguments: ``text_encoder[_2]_lora_layers`` and their adapter metadata."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    kwargs: dict[str, dict] = {}
    for name, encoder in encoders.items():
        state = {key: value.detach().to(torch.float32) for key, value in get_peft_model_state_dict(encoder).items()}
        kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(state)
        kwargs[f"{name}_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
    return kwargs
