"""SD3 / SD3.5 (``StableDiffusion3Pipeline`` layout): an ``SD3Transformer2DModel`` trained by rectified flow,
conditioned on CLIP-L ‖ CLIP-G tokens joined with T5's (T5 optional: the pipeline uses zeros without it) and the
two pooled projections. The transformer takes the model timestep ``t = σ·T`` as it is."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mmalign.image.families.base import Family

__all__ = ["FlowFamily", "SD3Family"]


class FlowFamily(Family):
    """Flow-matching families: training noise is the rectified flow (``mmalign.image.families.flow``)."""

    flow = True
    backbone_name = "transformer"

    def noise_scheduler(self, path: str, revision, prediction_type):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if prediction_type:
            raise ValueError(f"model.prediction_type {prediction_type!r}: {self.name} is a flow-matching model "
                             "(velocity target); leave prediction_type null")
        return FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)


class SD3Family(FlowFamily):
    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    optional_encoders = ("text_encoder_3",)

    def predict(self, backbone: nn.Module, noisy: Tensor, timesteps: Tensor, conditions: dict[str, Tensor],
                **context: Any) -> Tensor:
        dtype = next(backbone.parameters()).dtype
        return backbone(hidden_states=noisy.to(dtype), timestep=timesteps, encoder_hidden_states=conditions[
            "states"].to(dtype), pooled_projections=conditions["pooled"].to(dtype), return_dict=False)[0]
