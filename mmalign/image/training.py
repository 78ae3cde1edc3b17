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

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mmalign.engine.result import TrainResult
from mmalign.image.config import ImageTrainConfig

__all__ = ["train", "main", "build_preference_model", "load_records", "build_dataset", "build_objective",
           "make_compute_loss", "save_trained_unet"]

logger = logging.getLogger("mmalign.image")

PLOT_KEYS = ("loss", "implicit_acc", "inside_term", "model_mse", "ref_mse", "rewards/margins")


def build_preference_model(config: ImageTrainConfig, *, triggers=(), trigger_mode: str = "append", pipeline=None):
    """Loads the pipeline (or takes the ``pipeline`` object) and wraps it as a :class:`DiffusionPreferenceModel`
    (LoRA or full fine-tuning)."""
    from mmalign.image.diffusion import DiffusionPreferenceModel
    from mmalign.image.models import apply_finetuning, components_from_pipeline, configure_attention, load_diffusion_components

    model_config = config.model
    from mmalign.image.families.build import build_family_model, resolve_family

    if pipeline is None and resolve_family(model_config) != "sd":  # SDXL / SD3 / FLUX: mmalign.image.families
        return build_family_model(config, triggers=triggers, trigger_mode=trigger_mode)
    family_only = [key for key, used in (("cache_text_embeddings", model_config.cache_text_embeddings),
                                         ("text_encoder_lora", model_config.text_encoder_lora),
                                         ("weights_dtype", model_config.weights_dtype != "float32"),
                                         ("vae_tiling", model_config.vae_tiling), ("vae", model_config.vae))
                   if used]
    if family_only:
        raise ValueError(f"model.{', model.'.join(family_only)}: for sdxl, sd3 and flux pipelines; "
                         f"{model_config.name_or_path or type(pipeline).__name__!r} is an sd pipeline")
    options = dict(text_conditioner=model_config.text_conditioner,
                   text_conditioner_kwargs=model_config.text_conditioner_kwargs,
                   prediction_type=model_config.prediction_type, frozen_dtype=model_config.dtype,
                   allow_code_hooks=model_config.allow_code_hooks)
    if pipeline is not None:
        components = components_from_pipeline(pipeline, **options)
    else:
        components = load_diffusion_components(model_config.name_or_path, revision=model_config.revision,
                                               variant=model_config.variant, **options)
    unet = components.unet
    attention = configure_attention(unet, model_config.attention)
    logger.info("attention: %s", attention)
    if model_config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    reference = apply_finetuning(unet, config.lora)
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


def _as_list(value: Any) -> list:
    return [value] if isinstance(value, str) else list(value)


def load_records(config: ImageTrainConfig, train_dataset: Any = None, *, split: str = "train"):
    """The training groups (``split="eval"``: the held-out ones), every row checked, before any model loads: from
    ``data.train`` / ``data.eval`` or the in-memory ``train_dataset`` / ``eval_dataset`` given here (a ``Dataset``,
    ``DatasetDict``, ``save_to_disk`` folder or list of dicts)."""
    from mmalign.image.data.loading import load_group_records

    data = config.data
    path, data_split, limit = ((data.train, data.train_split, data.max_train_samples) if split == "train"
                               else (data.eval, data.eval_split, data.max_eval_samples))
    source = train_dataset if train_dataset is not None else path
    return load_group_records(
        source, format=data.format, split=data_split, prompt_field=data.prompt_field,
        chosen_field=data.chosen_field, rejected_field=data.rejected_field, bin_field=data.bin_field,
        max_samples=limit, name=f"{split}_dataset" if train_dataset is not None else f"data.{split}",
    )


def build_dataset(config: ImageTrainConfig, model=None, records=None, *, evaluation: bool = False):
    """Records → :class:`ImagePreferenceDataset`; with ``cache_latents`` every image is VAE-encoded once.
    ``evaluation``: held-out data, never flipped."""
    from mmalign.image.data.dataset import ImagePreferenceDataset, LatentCache

    data = config.data
    records = load_records(config) if records is None else records
    channels = 3
    if model is not None and model.vae is not None:
        channels = model.vae.config.in_channels
    elif model is not None:
        channels = model.unet.config.in_channels
    dataset = ImagePreferenceDataset(
        records, resolution=data.resolution, channels=channels, center_crop=data.center_crop,
        random_flip=data.random_flip and not evaluation, convert_images=data.convert_images,
        allow_ragged_groups=data.allow_ragged_groups,
        record_geometry=getattr(getattr(model, "family", None), "name", None) == "sdxl",  # per-image add_time_ids
    )
    from mmalign.image.validation import check_image_records

    check_image_records(dataset)  # every image's header, size and end, before any step
    from mmalign.data_checks import check_identical_responses

    source = (data.eval or "eval_dataset") if evaluation else (data.train or "train_dataset")
    check_identical_responses(((i + 1, r.chosen, r.rejected) for i, r in enumerate(records)
                               if all(isinstance(m, str) for m in r.chosen + r.rejected)), source=source,
                              what="image")
    if data.cache_latents:
        if model is None or model.vae is None:
            raise ValueError("data.cache_latents needs a latent-diffusion model (with a VAE)")
        dataset.latent_cache = LatentCache(dataset, model.latent_parameters, device=model.device)
    return dataset


def build_objective(config: ImageTrainConfig, records=None):
    """``mmalign.objective(name, beta=β, **hyperparameters)``, checked against the data (groups, bins, triggers) by
    the objective layer's :func:`~mmalign.shared.compatibility.check_objective_fits_data`; ``records``: the training
    groups (or a dataset with ``max_group_sizes``)."""
    from mmalign.shared.compatibility import DataFacts, check_objective_fits_data
    from mmalign.shared.objectives.registry import objective as build

    spec = config.objective
    objective = build(spec.name, **spec.objective_kwargs())
    sizes = (1, 1)
    if hasattr(records, "max_group_sizes"):
        sizes = records.max_group_sizes
    elif records:
        sizes = (max(len(r.chosen) for r in records), max(len(r.rejected) for r in records))
    check_objective_fits_data(objective, DataFacts(
        source=config.data.train or "train_dataset", group_sizes=sizes,
        inputs=frozenset({"bins"} if config.data.bin_field else ()), triggers=tuple(spec.triggers),
        hints={"bins": "set data.bin_field (an integer bin column)",
               "triggered_chosen": "set objective.triggers (one trigger per alpha)"}))
    return objective


def make_compute_loss(objective):
    """``(model, batch) -> StepOutput``: surrogates from the model, loss and metrics from the objective."""
    from mmalign.engine import StepOutput
    from mmalign.engine.preference import preference_step
    from mmalign.image.diffusion import denoising_errors
    from mmalign.shared.objectives.batch import masked_mean

    beta = objective.beta
    needs_lengths = objective.uses_chosen_lengths

    def compute_loss(model: nn.Module, batch: Mapping[str, Any]) -> StepOutput:
        record = model(batch)  # LogLikelihoods of −e (SPEC §7)
        if needs_lengths:  # e is already a per-element mean: the "length" of an image is 1
            record.chosen_lengths = torch.ones_like(record.policy_chosen)
        with torch.no_grad():
            # R = group mean of ρ = −(e_θ − e_ref) (SPEC §7); margin = R_w − R_l, per pair/group
            ratio_chosen = masked_mean(record.policy_chosen - record.ref_chosen, record.chosen_mask)
            ratio_rejected = masked_mean(record.policy_rejected - record.ref_rejected, record.rejected_mask)
            margin = ratio_chosen - ratio_rejected
            model_mse, ref_mse = denoising_errors(record)
            metrics = {
                # The Diffusion-DPO inside term β·margin = −(β_d/2)·((e_θw − e_rw) − (e_θl − e_rl)). It is the
                # sigmoid's argument of dpo/mdpo/cdpo/rdpo only; other objectives log their own (cnrpo/logits, ...).
                "inside_term": (beta * margin).mean(),
                # implicit-reward accuracy, objective-independent: share with R_w > R_l, ties ½ (diffusers convention)
                "implicit_acc": ((margin > 0).float() + 0.5 * (margin == 0).float()).mean(),
                "model_mse": model_mse,
                "ref_mse": ref_mse,
            }
        return preference_step(objective, record, metrics=metrics)

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
            family.save_lora(unet, directory, text_encoders=model.text_encoders)
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


def train(config: ImageTrainConfig | Mapping[str, Any] | str | os.PathLike | None = None, overrides=(), *,
          pipeline: Any = None, train_dataset: Any = None, eval_dataset: Any = None) -> TrainResult:
    """Runs one diffusion preference training and returns its :class:`~mmalign.engine.TrainResult`.

    ``config``: an :class:`ImageTrainConfig`, a dict or a YAML path. ``pipeline``: a diffusers pipeline object
    (its UNet is trained in place) instead of ``model.name_or_path``; ``train_dataset``: a ``datasets.Dataset``,
    ``DatasetDict``, ``save_to_disk`` folder or list of dicts (image cells: PIL images, uint8 arrays, bytes or
    paths) instead of ``data.train``; ``eval_dataset``: held-out groups in the same forms instead of ``data.eval``,
    scored with the training objective every ``training.eval_steps`` and at the end (``eval_loss``,
    ``eval_rewards/accuracies``, ...). The config, the objective and every data row are checked before any model
    loads. ``result.model`` is the pipeline when one was given, else the trained
    :class:`~mmalign.image.diffusion.DiffusionPreferenceModel` (also in ``result.details["preference_model"]``).
    """
    from mmalign.config import ConfigError, load_config
    from mmalign.engine.threads import torch_threads

    config, pipeline, train_dataset, eval_dataset = _split_objects(config, pipeline, train_dataset, eval_dataset)
    config = load_config(ImageTrainConfig, config, overrides)
    if config.rounds is not None:
        raise ConfigError("rounds: a config with online rounds runs through mmalign.image.train (mmalign.image.online)")
    if pipeline is None and not config.model.name_or_path:
        raise ConfigError("model.name_or_path: required; set it in the config or pass pipeline=... to the call")
    if train_dataset is None and not config.data.train:
        raise ConfigError("data.train: required; set it in the config or pass train_dataset=... to the call")
    if config.training.eval_steps and not (config.generation.prompts or config.data.eval or eval_dataset is not None):
        raise ConfigError(f"training.eval_steps: {config.training.eval_steps} does nothing without evaluation: the "
                          "image evaluation scores data.eval (or eval_dataset=...) and generates generation.prompts, "
                          "all empty; set training.eval_steps: 0, or give held-out data or generation.prompts")
    from accelerate.utils import set_seed

    from mmalign.hub import check_sources

    if train_dataset is None:
        check_sources([("data.train", config.data.train, "dataset")])
    if eval_dataset is None and config.data.eval:
        check_sources([("data.eval", config.data.eval, "dataset")])
    with torch_threads(config.training.num_threads):
        records = load_records(config, train_dataset)
        has_eval = eval_dataset is not None or bool(config.data.eval)
        eval_records = load_records(config, eval_dataset, split="eval") if has_eval else None
        objective = build_objective(config, records)
        if eval_records is not None:
            build_objective(config, eval_records)  # the held-out groups must fit the objective too
        spec = config.objective
        if pipeline is None:  # after the data and objective checks: a config error is reported first
            check_sources([("model.name_or_path", config.model.name_or_path, "model")])
        set_seed(config.training.seed)  # before the LoRA adapters are initialised: a seed repeats a run bit for bit
        model = build_preference_model(config, triggers=spec.triggers, trigger_mode=spec.trigger_mode,
                                       pipeline=pipeline)
        if torch.cuda.is_available():
            model.to("cuda")
        dataset = build_dataset(config, model, records)
        eval_set = build_dataset(config, model, eval_records, evaluation=True) if eval_records is not None else None
        if getattr(model, "family", None) is not None:  # text-embedding cache, features used (SDXL / SD3 / FLUX)
            from mmalign.image.families.build import prepare_family_training

            prepare_family_training(model, config, dataset)
        output_dir = Path(config.output_dir)
        from mmalign.image.data.dataset import collate_groups
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
        if eval_set is not None:
            trainer.evaluate_fn = _with_held_out(trainer, eval_set, collate_groups, make_compute_loss(objective),
                                                 config.training)
        summary = trainer.train(resume_from_checkpoint=config.training.resume_from_checkpoint)
    return TrainResult.from_summary(summary, model=pipeline if pipeline is not None else trainer.model,
                                    output_dir=output_dir, preference_model=trainer.model)


def _split_objects(config: Any, pipeline: Any, train_dataset: Any, eval_dataset: Any = None):
    """Objects written into a config mapping where a path would go (``model: pipe``, ``data.train: ds``,
    ``data.eval: ds``); those passed as arguments win."""
    if not isinstance(config, Mapping):
        return config, pipeline, train_dataset, eval_dataset
    config = dict(config)
    model = config.get("model")
    if model is not None and not isinstance(model, (Mapping, str, os.PathLike)):
        pipeline = pipeline if pipeline is not None else config.pop("model")
    data = config.get("data")
    if isinstance(data, Mapping):
        data = dict(data)
        if data.get("train") is not None and not isinstance(data["train"], (str, os.PathLike)):
            train = data.pop("train")
            train_dataset = train_dataset if train_dataset is not None else train
        if data.get("eval") is not None and not isinstance(data["eval"], (str, os.PathLike)):
            held_out = data.pop("eval")
            eval_dataset = eval_dataset if eval_dataset is not None else held_out
        config["data"] = data
    return config, pipeline, train_dataset, eval_dataset


def _with_held_out(trainer, eval_set, collate_fn, compute_loss, training) -> Any:
    """The trainer's evaluation: the held-out metrics (the engine's sharded loop), then any generation samples."""
    from mmalign.image.evaluation import held_out_evaluation

    held_out = held_out_evaluation(trainer, eval_set, collate_fn, training.batch_size, compute_loss,
                                   seed=training.seed)
    generate = trainer.evaluate_fn

    def evaluate(model: nn.Module) -> dict[str, float]:
        metrics = held_out(model)
        if generate is not None:
            metrics.update(generate(model))
        return metrics

    return evaluate
