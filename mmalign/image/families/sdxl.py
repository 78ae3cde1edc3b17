"""SDXL (``StableDiffusionXLPipeline`` layout): a UNet conditioned on two CLIP encoders' tokens, the pooled
embedding and the ``add_time_ids`` micro-conditioning (original size, crop top-left, target size) of each image.

Training noise is the DDPM schedule of the pipeline's scheduler config (ε- or v-prediction), as for SD 1.x.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmalign.image.families.base import Family

__all__ = ["SDXLFamily", "time_ids"]


def time_ids(original_sizes: Tensor, crops_top_left: Tensor, target_sizes: Tensor) -> Tensor:
    """``[N, 6]`` micro-conditioning rows ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``."""
    return torch.cat([original_sizes, crops_top_left, target_sizes], dim=1).float()


class SDXLFamily(Family):
    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    backbone_name = "unet"
    encoder_names = ("text_encoder", "text_encoder_2")

    def predict(self, backbone: nn.Module, noisy: Tensor, timesteps: Tensor, conditions: dict[str, Tensor],
                **context: Any) -> Tensor:
        dtype = next(backbone.parameters()).dtype
        added = {"text_embeds": conditions["pooled"].to(dtype), "time_ids": conditions["time_ids"].to(dtype)}
        return backbone(noisy.to(dtype), timesteps, encoder_hidden_states=conditions["states"].to(dtype),
                        added_cond_kwargs=added, return_dict=False)[0]
