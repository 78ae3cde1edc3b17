"""Sampling a trained SDXL / SD3 / FLUX preference model with its own pipeline and scheduler, for grids.

The family's pipeline is assembled around the policy backbone (LoRA active), the VAE and a copy of the pipeline's
own scheduler; prompts go in as embeddings from the model's conditioner (live encoders or the text-embedding
cache, which then must hold the prompts and ``""``). Image ``i`` starts from its own CPU generator seeded
``seeds[i]``, so it depends only on its prompt and seed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Optional

import torch

__all__ = ["generate_family_images"]


@torch.no_grad()
def generate_family_images(model, prompts: Sequence[str], *, seeds: Optional[Sequence[int]] = None,
                           num_inference_steps: int = 25, guidance_scale: float = 5.0, height: int = 1024,
                           width: int = 1024) -> list:
    """PIL images, one per prompt. ``guidance_scale`` is CFG for SDXL/SD3 and the guidance embedding for FLUX."""
    prompts = list(prompts)
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    family = model.family
    pipe = family.sampling_pipeline(model.unet, model.vae, copy.deepcopy(model.sampling_scheduler))
    pipe.set_progress_bar_config(disable=True)
    dtype = next(model.unet.parameters()).dtype
    encoded = {key: value.to(model.device, dtype) for key, value in model.conditioner(prompts).items()}
    kwargs = {"prompt_embeds": encoded["states"], "pooled_prompt_embeds": encoded["pooled"]}
    if family.name != "flux" and guidance_scale > 1:
        empty = {key: value.to(model.device, dtype) for key, value in model.conditioner([""] * len(prompts)).items()}
        kwargs.update(negative_prompt_embeds=empty["states"], negative_pooled_prompt_embeds=empty["pooled"])
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    was_training = model.unet.training
    model.unet.eval()
    try:
        return pipe(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                    width=width, generator=generators, output_type="pil", **kwargs).images
    finally:
        model.unet.train(was_training)
