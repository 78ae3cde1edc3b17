"""What the debiasing report measures: demographic diversity of generated images per occupation (Simpson index,
SPEC §6; the sail-sg gaps), the classifier's no-face and low-confidence rates, and image-quality drift (the
denoising loss on real held-out faces, so that debiasing by destroying faces would show)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from mmalign.image.classifiers import AttributePrediction
from mmalign.image.classifiers.labels import gender_label, race_label
from mmalign.shared.metrics import frequency_gap, simpson_index

__all__ = ["diversity_stats", "average_stats", "heldout_denoising_error", "real_latents"]


def diversity_stats(gender_predictions: list[AttributePrediction], race_predictions: list[AttributePrediction],
                    genders: Sequence[str], races: Sequence[str], scoring: str,
                    faces_only: bool = False) -> dict[str, float | dict]:
    """One occupation's images: label counts, Simpson index and frequency gap per attribute, the share where the
    classifier found no face, and the share of predictions under its confidence threshold."""
    n = len(gender_predictions)
    if n == 0 or len(race_predictions) != n:
        raise ValueError(f"diversity_stats: need the same non-zero number of gender and race predictions; got "
                         f"{n} and {len(race_predictions)}")
    no_face = [p.face_found is False for p in race_predictions]
    keep = [not nf for nf in no_face] if faces_only else [True] * n
    gender_labels = [gender_label(p, genders) for p, k in zip(gender_predictions, keep) if k]
    race_classes = list(races) if scoring == "requested" else list(race_predictions[0].probabilities)
    race_labels = [race_label(p, races, scoring) for p, k in zip(race_predictions, keep) if k]
    out: dict[str, float | dict] = {
        "n_images": n,
        "n_scored": len(gender_labels),
        "no_face_rate": float(np.mean(no_face)),
        "low_confidence_gender": float(np.mean([p.low_confidence for p in gender_predictions])),
        "low_confidence_race": float(np.mean([p.low_confidence for p in race_predictions])),
        "mean_confidence_gender": float(np.mean([p.confidence for p in gender_predictions])),
        "mean_confidence_race": float(np.mean([p.confidence for p in race_predictions])),
    }
    for attribute, labels, classes in (("gender", gender_labels, list(genders)), ("race", race_labels, race_classes)):
        if labels:
            out[f"simpson_{attribute}"] = simpson_index(labels)
            out[f"{attribute}_gap"] = frequency_gap(labels, classes)
        else:
            out[f"simpson_{attribute}"] = out[f"{attribute}_gap"] = float("nan")
        out[f"{attribute}_counts"] = {c: labels.count(c) for c in classes}
    return out


AVERAGED = ("simpson_gender", "simpson_race", "gender_gap", "race_gap", "no_face_rate", "low_confidence_gender",
            "low_confidence_race", "mean_confidence_gender", "mean_confidence_race")


def average_stats(per_occupation: dict[str, dict]) -> dict[str, float]:
    """Unweighted means over occupations (every occupation counts once, SPEC §6)."""
    return {key: float(np.nanmean([stats[key] for stats in per_occupation.values()])) for key in AVERAGED}


@torch.no_grad()
def real_latents(images: np.ndarray, vae, device, resolution: Optional[int] = None) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` images -> what the backbone denoises: pixels in [-1, 1] resized to ``resolution``,
    or for latent models the VAE posterior mean, shifted and scaled as in training."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if resolution is not None and pixels.shape[-1] != resolution:
        pixels = torch.nn.functional.interpolate(pixels, size=(resolution, resolution), mode="bicubic",
                                                 align_corners=False).clamp(-1, 1)
    if vae is None:
        return pixels.to(device)
    latents = vae.encode(pixels.to(device, next(vae.parameters()).dtype)).latent_dist.mean.float()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


@torch.no_grad()
def heldout_denoising_error(unet, noise_scheduler, conditioner, images: np.ndarray, prompts: Sequence[str], *,
                            vae=None, draws: int = 4, seed: int = 0, batch_size: int = 64,
                            resolution: Optional[int] = None) -> float:
    """Mean ε/v-prediction error (the training loss, SPEC §7) of a UNet on real images with their captions, at
    ``draws`` seeded (t, noise) pairs per image; the same seed gives every model the same t and noise, so models
    compare directly. Latent models see the VAE posterior mean of the images resized to ``resolution``."""
    from mmalign.image.conditioning import split_conditioning
    from mmalign.image.diffusion import denoising_target, per_sample_error

    if len(images) != len(prompts) or len(images) == 0:
        raise ValueError(f"heldout_denoising_error: {len(images)} images and {len(prompts)} prompts")
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    was_training = unet.training
    unet.eval()
    generator = torch.Generator().manual_seed(seed)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    errors = []
    try:
        for start in range(0, len(images), batch_size):
            latents = real_latents(images[start:start + batch_size], vae, device, resolution)
            conditions, mask = split_conditioning(conditioner(list(prompts[start:start + batch_size])))
            conditions = conditions.to(device, dtype)
            mask = mask.to(device) if mask is not None else None
            for _ in range(draws):
                noise = torch.randn(latents.shape, generator=generator).to(device)
                timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator).to(device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                prediction = unet(noisy.to(dtype), timesteps, encoder_hidden_states=conditions,
                                  encoder_attention_mask=mask, return_dict=False)[0]
                target = denoising_target(noise_scheduler, latents, noise, timesteps)
                errors.append(per_sample_error(prediction, target).cpu())
    finally:
        unet.train(was_training)
    return float(torch.cat(errors).mean())
