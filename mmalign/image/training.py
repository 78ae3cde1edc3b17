"""Diffusion preference training on the shared engine: ``mmalign.image.train(config)`` and its CLI.

The run: load the pipeline (``from_pretrained``), add LoRA (reference = adapters disabled) or keep a frozen copy
(full fine-tuning), build the group dataset (optionally with cached latents), and hand
:class:`~mmalign.image.diffusion.DiffusionPreferenceModel` + an ``mmalign.objective`` to
:class:`mmalign.engine.Trainer`. Logged per step: ``loss``, ``implicit_acc`` (share of pairs/groups with
R_w > R_l, ties ½), ``inside_term`` (the Diffusion-DPO inside-of-sigmoid term β·(R_w − R_l); the objective's own
logit only for dpo/mdpo/cdpo/rdpo), ``model_mse`` (mean e_θ), ``ref_mse`` (mean e_ref) and the objective's
metrics (``rewards/*``, objective-specific logits such as ``cnrpo/logits``). The final model goes to ``<output_dir>/final``: LoRA weights in the diffusers format
(``pipe.load_lora_weights(output_dir/final)``) or the full UNet (``final/unet``).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from mmalign.image.config import ImageTrainConfig

__all__ = ["train", "main", "build_preference_model", "build_dataset", "build_objective", "make_compute_loss",
           "save_trained_unet"]

logger = logging.getLogger("mmalign.image")

PLOT_KEYS = ("loss", "implicit_acc", "inside_term", "model_mse", "ref_mse", "rewards/margins")


def build_preference_model(config: ImageTrainConfig, *, triggers=(), trigger_mode: str = "append"):
    """Loads the pipeline and wraps it as a :class:`DiffusionPreferenceModel` (LoRA or full fine-tuning)."""
    from mmalign.image.diffusion import DiffusionPreferenceModel
    from mmalign.image.models import apply_finetuning, configure_attention, load_diffusion_components

    model_config = config.model
    from mmalign.image.families.build import build_family_model, resolve_family

    if resolve_family(model_config) != "sd":  # SDXL / SD3 / FLUX: mmalign.image.families
        return build_family_model(config, triggers=triggers, trigger_mode=trigger_mode)
    family_only = [key for key, used in (("cache_text_embeddings", model_config.cache_text_embeddings),
                                         ("weights_dtype", model_config.weights_dtype != "float32"),
                                         ("vae_tiling", model_config.vae_tiling), ("vae", model_config.vae))
                   if used]
    if family_only:
        raise ValueError(f"model.{', model.'.join(family_only)}: for sdxl, sd3 and flux pipelines; "
                         f"{model_config.pretrained!r} is an sd pipeline")
    components = load_diffusion_components(
        model_config.pretrained,
        revision=model_config.revision,
        variant=model_config.variant,
        text_conditioner=model_config.text_conditioner,
        text_conditioner_kwargs=model_config.text_conditioner_kwargs,
        prediction_type=model_config.prediction_type,
        frozen_dtype=model_config.frozen_dtype,
        allow_code_hooks=model_config.allow_code_hooks,
    )
    unet = components.unet
    attention = configure_attention(unet, model_config.attention)
    logger.info("attention: %s", attention)
    if model_config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    reference = apply_finetuning(unet, model_config)
    policy = None
    if triggers:
        from mmalign.shared.triggers import TriggerPolicy

        policy = TriggerPolicy(mode=trigger_mode)
    diffusion = config.diffusion
    num_timesteps = components.noise_scheduler.config.num_train_timesteps
    return DiffusionPreferenceModel(
        unet,
        components.noise_scheduler,
        components.conditioner,
        components.vae,
        reference,
        caption_dropout=diffusion.caption_dropout,
        triggers=triggers,
        trigger_policy=policy,
        timestep_range=(diffusion.timestep_min, diffusion.timestep_max or num_timesteps),
        latent_sampling=diffusion.latent_sampling,
        vae_batch_size=diffusion.vae_batch_size,
    )


def build_dataset(config: ImageTrainConfig, model=None):
    """Records → :class:`ImagePreferenceDataset`; with ``cache_latents`` every image is VAE-encoded once."""
    from mmalign.image.data import ImagePreferenceDataset, LatentCache, load_group_records

    data = config.data
    records = load_group_records(
        data.path, format=data.format, split=data.split, prompt_field=data.prompt_field,
        chosen_field=data.chosen_field, rejected_field=data.rejected_field, bin_field=data.bin_field,
        max_samples=data.max_samples,
    )
    channels = 3
    if model is not None and model.vae is not None:
        channels = model.vae.config.in_channels
    elif model is not None:
        channels = model.unet.config.in_channels
    dataset = ImagePreferenceDataset(
        records, resolution=data.resolution, channels=channels, center_crop=data.center_crop,
        random_flip=data.random_flip, convert_images=data.convert_images, allow_ragged_groups=data.allow_ragged_groups,
    )
    from mmalign.image.validation import check_image_records

    check_image_records(dataset)  # every image's header, size and end, before any step
    from mmalign.data_checks import check_identical_responses

    check_identical_responses(((i + 1, r.chosen, r.rejected) for i, r in enumerate(records)
                               if all(isinstance(m, str) for m in r.chosen + r.rejected)), source=data.path,
                              what="image")
    if data.cache_latents:
        if model is None or model.vae is None:
            raise ValueError("data.cache_latents needs a latent-diffusion model (with a VAE)")
        dataset.latent_cache = LatentCache(dataset, model.latent_parameters, device=model.device)
    return dataset


def build_objective(config: ImageTrainConfig, dataset=None):
    """``mmalign.objective(name, beta=β, **params)``, checked against the data (groups, bins, triggers)."""
    import mmalign

    spec = config.objective
    params = dict(spec.params)
    if "beta" in params:
        raise ValueError("objective.params must not contain beta; use objective.beta or objective.beta_d")
    objective = mmalign.objective(spec.name, beta=spec.resolved_beta, **params)
    if objective.name == "cnrpo":
        alphas = getattr(objective, "alphas", [])
        if len(alphas) != len(spec.triggers):
            raise ValueError(f"cnrpo: {len(alphas)} alphas (objective.params.alphas) but {len(spec.triggers)} "
                             "triggers (objective.triggers); give one alpha per trigger")
    elif spec.triggers:
        raise ValueError(f"objective.triggers are used by cnrpo only, not {objective.name!r}")
    if "bins" in objective.extra_inputs and not config.data.bin_field:
        raise ValueError(f"{objective.name} needs per-example bins: set data.bin_field")
    if dataset is not None and not objective.accepts_groups and dataset.max_group_sizes != (1, 1):
        k_w, k_l = dataset.max_group_sizes
        raise ValueError(f"{objective.name} is pairwise but the data has groups of up to {k_w} chosen / {k_l} rejected "
                         "images; use mdpo or mipo")
    return objective


def make_compute_loss(objective):
    """``(model, batch) -> StepOutput``: surrogates from the model, loss and metrics from the objective."""
    from mmalign.engine import StepOutput
    from mmalign.shared.objectives import masked_mean

    beta = objective.beta
    needs_lengths = objective.uses_chosen_lengths

    def compute_loss(model: nn.Module, batch: Mapping[str, Any]) -> StepOutput:
        surrogates = model(batch)
        inputs = surrogates.objective_inputs()
        if needs_lengths:  # e is already a per-element mean: the "length" of an image is 1
            inputs["chosen_lengths"] = torch.ones_like(surrogates.policy_chosen)
        output = objective(**inputs)
        with torch.no_grad():
            # R = group mean of ρ = −(e_θ − e_ref) (SPEC §7); margin = R_w − R_l, per pair/group
            ratio_chosen = masked_mean(surrogates.policy_chosen - surrogates.ref_chosen, surrogates.chosen_mask)
            ratio_rejected = masked_mean(surrogates.policy_rejected - surrogates.ref_rejected, surrogates.rejected_mask)
            margin = ratio_chosen - ratio_rejected
            metrics = dict(output.metric_tensors)
            # The Diffusion-DPO inside term β·margin = −(β_d/2)·((e_θw − e_rw) − (e_θl − e_rl)). It is the sigmoid's
            # argument of dpo/mdpo/cdpo/rdpo only; other objectives log their own (e.g. cnrpo/logits, fdpo/logit).
            metrics["inside_term"] = (beta * margin).mean()
            # implicit-reward accuracy, objective-independent: share with R_w > R_l, ties ½ (diffusers convention)
            metrics["implicit_acc"] = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()
            metrics["model_mse"] = surrogates.model_error
            metrics["ref_mse"] = surrogates.reference_error
        return StepOutput(loss=output.loss, metrics=metrics)

    return compute_loss


def save_trained_unet(model, directory: str | os.PathLike) -> Path:
    """LoRA → ``pytorch_lora_weights.safetensors`` (diffusers format, with the adapter config as metadata, loadable
    by ``pipe.load_lora_weights(directory)``); full fine-tuning → ``directory/unet`` (``save_pretrained``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    unet = model.unet
    family = getattr(model, "family", None)
    if family is not None:  # SDXL / SD3 / FLUX: the family's pipeline writes its LoRA (or the full backbone)
        if model.reference_unet is None:
            family.save_lora(unet, directory)
        else:
            unet.save_pretrained(directory / family.backbone_name)
        return directory
    if model.reference_unet is None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(
            directory, unet_lora_layers=layers, safe_serialization=True,
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        )
    else:
        unet.save_pretrained(directory / "unet")
    return directory


def _make_evaluate(config: ImageTrainConfig, output_dir: Path):
    generation = config.generation
    if not generation.prompts:
        return None
    from mmalign.image.generation import generate_images, save_image_grid

    counter = {"calls": 0}

    def evaluate(model: nn.Module) -> dict[str, float]:
        inner = getattr(model, "module", model)
        prompts = [p for p in generation.prompts for _ in range(generation.images_per_prompt)]
        size = generation.resolution or config.data.resolution
        if getattr(inner, "family", None) is not None:
            from mmalign.image.families.sampling import generate_family_images

            images = generate_family_images(
                inner, prompts, seeds=[generation.seed + i for i in range(len(prompts))],
                num_inference_steps=generation.num_inference_steps, guidance_scale=generation.guidance_scale,
                height=size, width=size)
        else:
            images = generate_images(
                inner.unet, inner.conditioner, inner.noise_scheduler.config, prompts, vae=inner.vae,
                seeds=[generation.seed + i for i in range(len(prompts))], scheduler=generation.scheduler,
                num_inference_steps=generation.num_inference_steps, guidance_scale=generation.guidance_scale,
                height=size, width=size,
            )
        counter["calls"] += 1
        save_image_grid(images, output_dir / "samples" / f"eval-{counter['calls']:04d}.png",
                        columns=generation.images_per_prompt)
        return {}

    return evaluate


def train(config: ImageTrainConfig | Mapping[str, Any] | str | os.PathLike, overrides=()) -> dict[str, Any]:
    """Runs one diffusion preference training; ``config`` is an :class:`ImageTrainConfig`, a dict or a YAML path.

    Returns the engine's summary (``global_step``, ``metrics``, ``final_dir``, ...) plus ``model``: the trained
    :class:`~mmalign.image.diffusion.DiffusionPreferenceModel`.
    """
    from mmalign.config import load_config

    config = load_config(ImageTrainConfig, config, overrides)
    spec = config.objective
    from accelerate.utils import set_seed

    from mmalign.hub import check_sources

    check_sources([("model.pretrained", config.model.pretrained, "model"), ("data.path", config.data.path, "dataset")])
    set_seed(config.training.seed)  # before the LoRA adapters are initialised: a seed repeats a run bit for bit
    model = build_preference_model(config, triggers=spec.triggers, trigger_mode=spec.trigger_mode)
    if torch.cuda.is_available():
        model.to("cuda")
    dataset = build_dataset(config, model)
    if getattr(model, "family", None) is not None:  # text-embedding cache, features used (SDXL / SD3 / FLUX)
        from mmalign.image.families.build import prepare_family_training

        prepare_family_training(model, config, dataset)
    objective = build_objective(config, dataset)
    output_dir = Path(config.output_dir)
    from mmalign.image.data import collate_groups

    from mmalign.image.families.memory import trainer_class

    trainer = trainer_class(config.model.optimizer)(
        model,
        config=config.training,
        output_dir=output_dir,
        train_dataset=dataset,
        collate_fn=collate_groups,
        compute_loss=make_compute_loss(objective),
        save_model=save_trained_unet,
        evaluate=_make_evaluate(config, output_dir),
        resolved_config=config,
        plot_keys=PLOT_KEYS,
    )
    summary = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    summary["model"] = trainer.model  # the trained DiffusionPreferenceModel (unwrapped), for in-process use
    return summary


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    from mmalign.config import add_config_arguments, config_from_args, config_help

    parser = argparse.ArgumentParser(
        prog="python -m mmalign.image.train",
        description="Preference-tune a text-to-image diffusion model (Diffusion-DPO, mDPO, any mmalign objective on "
                    "the surrogate rho = -(e_theta - e_ref), SPEC §7). Example: python -m mmalign.image.train "
                    "--config configs/image/sd15-dpo-pickapic-lora.yaml --set training.max_steps=100",
        epilog=config_help(ImageTrainConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, config_required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = config_from_args(ImageTrainConfig, args)
    summary = train(config)
    print(f"done: {summary['global_step']} steps; final model in {summary['final_dir']}")
    return summary
