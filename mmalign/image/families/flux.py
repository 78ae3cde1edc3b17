"""FLUX (``FluxPipeline`` layout): a ``FluxTransformer2DModel`` trained by rectified flow on 2×2-packed latents,
conditioned on T5 tokens and CLIP's pooled output, with the guidance embedding (FLUX.1-dev) fed the training
guidance scale. The transformer takes ``t / 1000`` (it multiplies by 1000 inside), as the pipeline passes it.

The per-sample error is computed on the packed sequence: packing only permutes latent elements, so the mean
squared velocity error is that of the unpacked latents.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmalign.image.families.sd3 import FlowFamily

__all__ = ["FluxFamily", "pack_latents"]


def pack_latents(latents: Tensor) -> Tensor:
    """``[N, C, h, w]`` -> ``[N, (h/2)(w/2), 4C]`` (FluxPipeline's layout)."""
    from diffusers import FluxPipeline

    count, channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches; latent size {height}x{width} is not even (use an image "
                         "side divisible by 16)")
    return FluxPipeline._pack_latents(latents, count, channels, height, width)


class FluxFamily(FlowFamily):
    name = "flux"
    pipeline_class_name = "FluxPipeline"
    encoder_names = ("text_encoder", "text_encoder_2")

    def predict(self, backbone: nn.Module, noisy: Tensor, timesteps: Tensor, conditions: dict[str, Tensor],
                **context: Any) -> Tensor:
        """Returns the PACKED prediction; :meth:`target_layout` packs the target to match."""
        from diffusers import FluxPipeline

        dtype = next(backbone.parameters()).dtype
        count, _, height, width = noisy.shape
        image_ids = FluxPipeline._prepare_latent_image_ids(count, height // 2, width // 2, noisy.device, dtype)
        states = conditions["states"].to(dtype)
        text_ids = torch.zeros(states.shape[1], 3, device=noisy.device, dtype=dtype)
        guidance = None
        if getattr(backbone.config, "guidance_embeds", False):
            guidance = torch.full((count,), float(context.get("guidance_scale", 1.0)), device=noisy.device)
        return backbone(hidden_states=pack_latents(noisy).to(dtype), timestep=timesteps.float() / 1000,
                        guidance=guidance, pooled_projections=conditions["pooled"].to(dtype),
                        encoder_hidden_states=states, txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]

    @staticmethod
    def target_layout(target: Tensor) -> Tensor:
        return pack_latents(target)
