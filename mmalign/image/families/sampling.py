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
        latents = pipe(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                       width=width, generator=generators, output_type="latent", **kwargs).images
    finally:
        model.unet.train(was_training)
    return decode_latents(pipe, model.vae, latents, height, width)


@torch.no_grad()
def decode_latents(pipe, vae, latents, height: int, width: int) -> list:
    """The pipeline's latents -> PIL images, decoded in the VAE's own dtype (it may differ from the backbone's:
    a float32 fp16-unsafe VAE beside a bf16 backbone), which the pipelines' own decode does not handle."""
    if latents.ndim == 3:  # FLUX: packed [N, h·w/4, 4C]
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = latents.to(next(vae.parameters()).dtype) / vae.config.scaling_factor + shift
    return pipe.image_processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type="pil")
