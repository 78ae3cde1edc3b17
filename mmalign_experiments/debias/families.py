"""The debiasing run on SDXL, SD3/SD3.5 and FLUX pipelines (``mmalign.image.families``).

What differs from SD 1.x: the base model is loaded with the family's own components, every image (training
candidates and evaluation) is sampled with the family's pipeline and its own scheduler
(:func:`~mmalign.image.families.sampling.generate_family_images`), training passes the family's memory keys to
``mmalign.image.train``, and the quality drift is the family's own training error (ε/v for SDXL, the velocity
error for flow matching) at seeded draws. The text encoders are frozen in every method, so the prompts evaluation
needs (held-out plain prompts, real-face captions, ``""``) are encoded once by the base model and that cache
conditions every model's evaluation: a trained model whose run unloaded its encoders
(``model.cache_text_embeddings``) still samples prompts it never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

__all__ = ["FAMILY_MODEL_KEYS", "debias_family", "check_family_settings", "load_family_base", "FamilySampler",
           "family_denoising_error", "family_train_model_keys", "cache_evaluation_prompts"]

# DebiasModelConfig keys that only SDXL / SD3 / FLUX pipelines use, with their "unset" value
FAMILY_MODEL_KEYS = {"weights_dtype": "float32", "vae": None, "vae_tiling": False, "cache_text_embeddings": False,
                     "use_t5": True, "max_sequence_length": None}


def debias_family(model_config, pretrained: str) -> str:
    """``sd`` for the shipped face model and SD 1.x/2.x folders, else ``sdxl`` / ``sd3`` / ``flux``."""
    if not model_config.name_or_path:
        return "sd"
    from mmalign.image.families import detect_family

    return detect_family(pretrained, revision=model_config.revision)


def check_family_settings(config, family: str) -> None:
    """Settings that belong to one kind of pipeline, checked before anything is sampled."""
    model, scheduler = config.model, config.sampling.scheduler
    family_keys = [key for key, unset in FAMILY_MODEL_KEYS.items() if getattr(model, key) != unset]
    if family == "sd":
        if family_keys:
            raise ValueError(f"model.{', model.'.join(family_keys)}: for sdxl, sd3 and flux pipelines; "
                             f"{model.name_or_path or 'the shipped face model'!r} is an sd pipeline")
        if scheduler == "pipeline":
            raise ValueError("sampling.scheduler: pipeline is for sdxl, sd3 and flux (their own schedulers); sd "
                             "samples with ddim or dpm_solver")
        return
    if scheduler != "pipeline":
        raise ValueError(f"sampling.scheduler: {scheduler!r} is for sd pipelines; {family} samples with its "
                         "pipeline's own scheduler: set sampling.scheduler: pipeline")
    if model.text_conditioner:
        raise ValueError(f"model.text_conditioner is for sd pipelines; {family} uses its own text encoders")
    if model.attention == "xformers":
        raise ValueError(f"model.attention: xformers is for sd UNets; {family} uses torch SDPA (auto or sdpa)")


@dataclass
class FamilyBase:
    """The base pipeline's parts, in the shape ``generate_family_images`` and the evaluation read."""

    family: Any
    unet: torch.nn.Module  # the backbone (UNet or transformer), named as in the preference models
    noise_scheduler: Any
    sampling_scheduler: Any
    conditioner: torch.nn.Module
    vae: torch.nn.Module
    guidance_scale: float = 1.0  # FLUX's guidance embedding in the quality measure, as in training

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


def load_family_base(model_config, pretrained: str, family_name: str) -> FamilyBase:
    from diffusers import DiffusionPipeline

    from mmalign.image.config import DiffusionConfig
    from mmalign.image.families import get_family, load_family_components

    family = get_family(family_name)
    index = dict(DiffusionPipeline.load_config(pretrained, revision=model_config.revision))
    parts = load_family_components(
        family, pretrained, index, revision=model_config.revision, variant=model_config.variant,
        weights_dtype=model_config.weights_dtype, frozen_dtype=model_config.dtype, vae_path=model_config.vae,
        use_t5=model_config.use_t5, max_sequence_length=model_config.max_sequence_length)
    parts.backbone.requires_grad_(False).eval()
    return FamilyBase(family, parts.backbone, parts.noise_scheduler, parts.sampling_scheduler, parts.conditioner,
                      parts.vae, DiffusionConfig().guidance_scale)


def family_train_model_keys(model_config) -> dict[str, Any]:
    """The family keys of ``mmalign.image.train``'s model section."""
    return {key: getattr(model_config, key) for key in FAMILY_MODEL_KEYS}


def cache_evaluation_prompts(model, prompts: Sequence[str]):
    """Encodes ``prompts`` and ``""`` once with ``model``'s conditioner (a :class:`CachedPromptEncoder`)."""
    from mmalign.image.families.conditioning import cache_prompt_embeddings

    return cache_prompt_embeddings(model.conditioner, list(prompts) + [""])


class FamilySampler:
    """``sampler(prompts, seeds) -> uint8 [N, H, W, 3]`` with the family's pipeline and its own scheduler; the
    same interface as :class:`~mmalign_experiments.debias.images.ImageSampler` (``sampling.scheduler`` is
    ``pipeline``)."""

    def __init__(self, model, sampling, resolution: int):
        self.model, self.sampling, self.resolution = model, sampling, resolution

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], progress: bool = True) -> np.ndarray:
        from mmalign.image.families.sampling import generate_family_images

        prompts, seeds = list(prompts), list(seeds)
        images, step = [], self.sampling.batch_size
        for start in range(0, len(prompts), step):
            images += generate_family_images(
                self.model, prompts[start:start + step], seeds=seeds[start:start + step],
                num_inference_steps=self.sampling.num_inference_steps, guidance_scale=self.sampling.guidance_scale,
                height=self.resolution, width=self.resolution)
        return np.stack([np.asarray(image.convert("RGB")) for image in images])


@torch.no_grad()
def family_denoising_error(model, images: np.ndarray, prompts: Sequence[str], *, draws: int = 4, seed: int = 0,
                           batch_size: int = 64, resolution: Optional[int] = None) -> float:
    """The family's training error (SPEC §7: ε/v for SDXL, velocity ``ε − x₀`` for flow matching) of ``model``'s
    backbone on real images with their captions, at ``draws`` seeded (t, ε) per image; t uniform over the training
    table (DDPM steps, or the flow scheduler's shifted σ·T). The same seed gives every model the same draws."""
    from mmalign.image.diffusion import denoising_target, per_sample_error
    from mmalign.image.families.flow import FlowTimestepSampler, flow_noise_and_target
    from mmalign.image.families.sdxl import time_ids
    from mmalign_experiments.debias.measure import real_latents

    if len(images) != len(prompts) or len(images) == 0:
        raise ValueError(f"family_denoising_error: {len(images)} images and {len(prompts)} prompts")
    family, backbone, scheduler = model.family, model.unet, model.noise_scheduler
    device = next(backbone.parameters()).device
    total = int(scheduler.config.num_train_timesteps)
    table = FlowTimestepSampler(scheduler, "uniform").table if family.flow else None
    generator = torch.Generator().manual_seed(seed)
    was_training = backbone.training
    backbone.eval()
    errors = []
    try:
        for start in range(0, len(images), batch_size):
            latents = real_latents(images[start:start + batch_size], model.vae, device, resolution)
            count = latents.shape[0]
            conditions = {k: v.to(device) for k, v in model.conditioner(list(prompts[start:start + count])).items()}
            if family.name == "sdxl":  # original = target = the image side, no crop
                side = torch.full((count, 2), float(resolution or images.shape[1]), device=device)
                conditions["time_ids"] = time_ids(side, torch.zeros(count, 2, device=device), side)
            for _ in range(draws):
                noise = torch.randn(latents.shape, generator=generator).to(device)
                if family.flow:
                    timesteps = table[torch.randint(0, len(table), (count,), generator=generator)].to(device)
                    noisy, target = flow_noise_and_target(latents, noise, timesteps, total)
                else:
                    timesteps = torch.randint(0, total, (count,), generator=generator).to(device)
                    noisy = scheduler.add_noise(latents, noise, timesteps)
                    target = denoising_target(scheduler, latents, noise, timesteps)
                prediction = family.predict(backbone, noisy, timesteps, conditions,
                                            guidance_scale=getattr(model, "guidance_scale", 1.0))
                if hasattr(family, "target_layout"):
                    target = family.target_layout(target)
                errors.append(per_sample_error(prediction, target).cpu())
    finally:
        backbone.train(was_training)
    return float(torch.cat(errors).mean())
