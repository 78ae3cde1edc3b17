"""``ImageTrainConfig`` -> :class:`FamilyPreferenceModel` for SDXL / SD3 / FLUX (the same keys as SD 1.x)."""

from __future__ import annotations

import logging

from mmalign.image.families import detect_family, get_family, load_family_components
from mmalign.image.families.flow import FlowTimestepSampler
from mmalign.image.families.memory import enable_gradient_checkpointing, enable_vae_tiling, require_bitsandbytes
from mmalign.image.families.model import FamilyPreferenceModel

__all__ = ["resolve_family", "build_family_model"]

logger = logging.getLogger("mmalign.image")


def resolve_family(model_config) -> str:
    """``model.family`` or, for ``auto``, the detected family; a configured family must match the folder."""
    detected = detect_family(model_config.name_or_path, revision=model_config.revision)
    if model_config.family not in ("auto", detected):
        raise ValueError(f"model.family is {model_config.family!r} but {model_config.name_or_path!r} is a "
                         f"{detected!r} pipeline")
    return detected


def build_family_model(config, *, triggers=(), trigger_mode: str = "append") -> FamilyPreferenceModel:
    """Loads the pipeline of ``config.model`` and wraps it (LoRA: reference = adapters disabled; full: frozen copy)."""
    from diffusers import DiffusionPipeline

    from mmalign.image.models import apply_finetuning

    model_config, diffusion = config.model, config.diffusion
    family = get_family(resolve_family(model_config))
    if model_config.optimizer == "adamw_8bit":
        require_bitsandbytes()  # fail before loading anything
    if model_config.attention == "xformers":
        raise ValueError(f"model.attention: xformers is for sd UNets; {family.name} uses its pipeline's own attention "
                         "processors (torch SDPA); use auto or sdpa")
    if model_config.text_conditioner:
        raise ValueError(f"model.text_conditioner is for sd pipelines; {family.name} uses its own text encoders")
    index = dict(DiffusionPipeline.load_config(model_config.name_or_path, revision=model_config.revision))
    components = load_family_components(
        family, model_config.name_or_path, index, revision=model_config.revision, variant=model_config.variant,
        weights_dtype=model_config.weights_dtype, frozen_dtype=model_config.dtype, vae_path=model_config.vae,
        use_t5=model_config.use_t5, max_sequence_length=model_config.max_sequence_length,
        prediction_type=model_config.prediction_type)
    if family.name == "flux" and not model_config.use_t5:
        raise ValueError("model.use_t5: false is for sd3; FLUX needs its T5 encoder")
    backbone = components.backbone
    features = []
    if model_config.gradient_checkpointing:
        features.append(enable_gradient_checkpointing(backbone))
    if model_config.vae_tiling:
        features.append(enable_vae_tiling(components.vae))
    reference = apply_finetuning(backbone, config.lora)
    text_encoders = None
    if model_config.text_encoder_lora:
        from mmalign.image.families.text_lora import add_text_encoder_lora

        if family.name != "sdxl" or not config.lora.enabled or model_config.cache_text_embeddings:
            raise ValueError(f"model.text_encoder_lora: for sdxl ({family.name} here) with lora.enabled: true and "
                             "model.cache_text_embeddings: false (the encoders train)")
        text_encoders = add_text_encoder_lora(components.conditioner.encoders, config.lora)
    if reference is None and model_config.weights_dtype != "float32":
        features.append(f"{model_config.weights_dtype}_weights_fp32_lora")
    policy = None
    if triggers:
        from mmalign.shared.triggers import TriggerPolicy

        policy = TriggerPolicy(mode=trigger_mode)
    sampler = None
    timestep_range = None
    if family.flow:
        if diffusion.timestep_min != 0 or diffusion.timestep_max is not None:
            raise ValueError(f"diffusion.timestep_min/timestep_max are for DDPM families; {family.name} draws t with "
                             "diffusion.weighting_scheme, logit_mean, logit_std, mode_scale and shift")
        sampler = FlowTimestepSampler(components.noise_scheduler, diffusion.weighting_scheme, diffusion.logit_mean,
                                      diffusion.logit_std, diffusion.mode_scale, diffusion.shift)
    else:
        timestep_range = (diffusion.timestep_min,
                          diffusion.timestep_max or components.noise_scheduler.config.num_train_timesteps)
    model = FamilyPreferenceModel(
        backbone, components.noise_scheduler, components.conditioner, components.vae, reference, family=family,
        sampling_scheduler=components.sampling_scheduler, timestep_sampler=sampler,
        guidance_scale=diffusion.guidance_scale, caption_dropout=diffusion.caption_dropout, triggers=triggers,
        trigger_policy=policy, timestep_range=timestep_range, latent_sampling=diffusion.latent_sampling,
        vae_batch_size=diffusion.vae_batch_size, text_encoders=text_encoders)
    model.memory_features = features
    logger.info("%s pipeline %s; memory features: %s", family.name, model_config.name_or_path, features or "none")
    return model


def prepare_family_training(model: FamilyPreferenceModel, config, dataset) -> list[str]:
    """After the dataset is built: the text-embedding cache (encoders unloaded), and the features the run uses
    recorded in ``model.memory_features``."""
    features = model.memory_features
    if dataset.latent_cache is not None:
        features.append("latent_cache")
    if model.vae_batch_size is not None:
        features.append("vae_slicing")
    if config.model.cache_text_embeddings:
        prompts = [record.prompt for record in dataset.records] + list(config.generation.prompts)
        count = model.cache_text_embeddings(prompts)
        features.append("text_embedding_cache")
        logger.info("text embeddings cached for %d prompts; text encoders unloaded", count)
    if config.model.optimizer == "adamw_8bit":
        features.append("adamw_8bit")
    return features
