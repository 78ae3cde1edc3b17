"""The debiasing run end to end: ``mmalign_experiments.debias.run(config)``.

1. occupations, split by occupation (held-out ones never trained on);
2. training images — attribute-prompted candidates and the base model's plain-prompt images — sampled once and
   cached on disk; a cell's next candidate only when the classifier disagreed with the previous one;
3. the classifier labels the candidates; chosen groups keep images that show their requested gender (or race,
   or both: ``groups.filter``);
4. every method (mDPO on the groups; DPO on pairs cut from them — one per group, or all; mIPO; …) trains from
   the same base model with the image backend (``mmalign.image.train``) for the same steps;
5. the base model and every trained one draw the same seeds for the held-out occupations' plain prompts; the
   classifier scores them (Simpson index and gaps per occupation, no-face and low-confidence rates) and the
   denoising loss on real FairFace faces measures quality drift. Report: JSON, Markdown, PNG bars and grids.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from mmalign_experiments.debias.config import DebiasConfig, MethodConfig
from mmalign_experiments.debias.families import (FamilySampler, cache_evaluation_prompts, check_family_settings,
                                                 debias_family, family_denoising_error, family_train_model_keys,
                                                 load_family_base)
from mmalign_experiments.debias.groups import pairs_from_groups, plan_groups, select_chosen, write_groups
from mmalign_experiments.debias.images import ImageCache, ImageSampler, default_cache_dir, model_fingerprint, read_images
from mmalign_experiments.debias.measure import average_stats, diversity_stats, heldout_denoising_error
from mmalign_experiments.debias.occupations import select_occupations, split_occupations
from mmalign_experiments.debias.report import markdown_table, plot_stacked_bars, save_before_after_grid, write_json
from mmalign.image.face_model.prompts import portrait_prompt
from mmalign.io import atomic_write_text

__all__ = ["run", "resolve_model"]

logger = logging.getLogger("mmalign_experiments.debias")

def resolve_model(config: DebiasConfig) -> tuple[str, str | None, dict]:
    """(pretrained, text_conditioner, its kwargs): empty ``pretrained`` means the shipped face model, which needs
    the MiniLM conditioner it was trained with."""
    model = config.model
    if model.name_or_path:
        return model.name_or_path, model.text_conditioner, dict(model.text_conditioner_kwargs)
    from mmalign.image.face_model.model import SHIPPED_FACE_MODEL_DIR, TEXT_CONDITIONER

    kwargs = dict(model.text_conditioner_kwargs) or {"max_length": 24}
    return str(SHIPPED_FACE_MODEL_DIR), model.text_conditioner or TEXT_CONDITIONER, kwargs


def _resolution(components, configured: int | None) -> int:
    if configured:
        return configured
    size = getattr(components.unet.config, "sample_size", None)
    if not size:
        raise ValueError("model.resolution: required, the backbone's config has no sample_size")
    size = int(size)
    if components.vae is not None:
        size *= 2 ** (len(components.vae.config.block_out_channels) - 1)
    return size


def _train_config(config: DebiasConfig, method: MethodConfig, data_path: Path, output_dir: Path,
                  resolution: int, pretrained: str, conditioner: str | None, conditioner_kwargs: dict,
                  group_size: int, family: str = "sd") -> dict[str, Any]:
    model = config.model
    training = asdict(config.training)
    if method.pairs:  # batch_size groups' worth of pairs: all their pairs, or pairs_per_group of each
        training["batch_size"] = config.training.batch_size * (method.pairs_per_group or group_size)
    objective: dict[str, Any] = {"name": method.objective, **method.params, **method.beta_setting()}
    model_keys = {"name_or_path": pretrained, "revision": model.revision, "variant": model.variant,
                  "attention": model.attention, "gradient_checkpointing": model.gradient_checkpointing,
                  "dtype": model.dtype, "text_conditioner": conditioner, "text_conditioner_kwargs": conditioner_kwargs}
    if family != "sd":  # SDXL / SD3 / FLUX: their memory keys (bf16 weights, VAE, text-embedding cache, T5)
        model_keys.update(family_train_model_keys(model))
    return {
        "output_dir": str(output_dir),
        "model": model_keys,
        "lora": asdict(config.lora),
        "data": {"train": str(data_path), "resolution": resolution, "allow_ragged_groups": True,
                 "cache_latents": model.cache_latents},
        "objective": objective,
        "training": training,
    }


def _sampler(model, config: DebiasConfig, resolution: int):
    if getattr(model, "family", None) is not None:  # SDXL / SD3 / FLUX: the pipeline's own scheduler
        return FamilySampler(model, config.sampling, resolution)
    return ImageSampler(model.unet, model.conditioner, model.noise_scheduler.config, config.sampling, resolution,
                        model.vae)


def _real_faces(config: DebiasConfig, eval_occupations) -> tuple[np.ndarray, list[str]]:
    """FairFace val adults of the experiment's groups with captions naming their race, gender and a held-out
    occupation (the same faces and captions for every model)."""
    from mmalign.image.fairface import GENDERS, RACE_GROUPS_WITH_OTHER, load_fairface

    val = load_fairface("val")
    races = [RACE_GROUPS_WITH_OTHER[i] for i in val.race_group]
    genders = [GENDERS[i] for i in val.gender]
    eligible = [i for i in range(len(val)) if races[i] in config.groups.races and genders[i] in config.groups.genders
                and val.age[i] >= 3]
    rng = np.random.default_rng(config.evaluation.seed)
    picks = rng.permutation(eligible)[: config.evaluation.quality_images]
    prompts = [portrait_prompt(eval_occupations[j % len(eval_occupations)].name, races[i], genders[i])
               for j, i in enumerate(picks)]
    return val.images[picks], prompts


class _Evaluator:
    """Samples the held-out plain prompts at fixed seeds and scores them; one call per model."""

    def __init__(self, config: DebiasConfig, classifier, eval_occupations, resolution: int, real_faces):
        self.config, self.classifier, self.occupations = config, classifier, eval_occupations
        self.resolution, self.real_faces = resolution, real_faces
        n = config.evaluation.images_per_occupation
        self.prompts = [portrait_prompt(o.name) for o in eval_occupations for _ in range(n)]
        # distinct seeds per occupation (a weakly conditioned model draws near-identical images from equal seeds,
        # which would make the occupations' samples one sample), the same seeds for every model (paired comparison)
        self.seeds = [config.evaluation.seed + i * n + j for i in range(len(eval_occupations)) for j in range(n)]

    def __call__(self, model, cache: ImageCache | None = None):
        sampler = _sampler(model, self.config, self.resolution)
        if cache is not None:
            images = read_images(cache.fetch(sampler, self.prompts, self.seeds))
        else:
            images = sampler(self.prompts, self.seeds)
        predictions = self.classifier.classify(images)
        groups, n = self.config.groups, self.config.evaluation.images_per_occupation
        per_occupation, by_occupation = {}, {}
        for index, occupation in enumerate(self.occupations):
            part = slice(index * n, (index + 1) * n)
            per_occupation[occupation.name] = diversity_stats(
                predictions["gender"][part], predictions["race"][part], groups.genders, groups.races,
                self.config.classifier.race_scoring)
            per_occupation[occupation.name]["bls_share_women"] = occupation.bls_share_women
            by_occupation[occupation.name] = images[part]
        summary = average_stats(per_occupation)
        if self.real_faces is not None:
            faces, prompts = self.real_faces
            draws = dict(draws=self.config.evaluation.quality_noise_draws, seed=self.config.evaluation.seed,
                         resolution=self.resolution)
            if getattr(model, "family", None) is not None:
                summary["denoising_loss"] = family_denoising_error(model, faces, prompts, **draws)
            else:
                summary["denoising_loss"] = heldout_denoising_error(
                    model.unet, model.noise_scheduler, model.conditioner, faces, prompts, vae=model.vae, **draws)
        return summary, per_occupation, by_occupation


def run(config: DebiasConfig | Mapping[str, Any] | str, overrides=()) -> dict[str, Any]:
    """Runs the pipeline and returns the report (also written to ``<output_dir>/report.json``)."""
    from mmalign.config import load_config, save_config
    from mmalign.image.classifiers import load_classifier
    from mmalign.image.models import load_diffusion_components
    from mmalign.image.training import train as train_image_model

    config = load_config(DebiasConfig, config, overrides)
    started = time.time()
    if config.training.num_threads:
        torch.set_num_threads(config.training.num_threads)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "config.yaml")
    timings: dict[str, float] = {}

    occupations = select_occupations(config.occupations.count, config.occupations.names, config.occupations.path)
    split = split_occupations(occupations, config.occupations.eval_fraction, config.occupations.seed)
    logger.info("occupations: %d train, %d held out", len(split.train), len(split.eval))

    pretrained, conditioner_spec, conditioner_kwargs = resolve_model(config)
    model = config.model
    family = debias_family(model, pretrained)
    check_family_settings(config, family)
    if family == "sd":
        base = load_diffusion_components(pretrained, revision=model.revision, variant=model.variant,
                                         text_conditioner=conditioner_spec, text_conditioner_kwargs=conditioner_kwargs,
                                         frozen_dtype=model.dtype)
    else:
        base = load_family_base(model, pretrained, family)
    if torch.cuda.is_available():
        base.unet.to("cuda")
        if base.vae is not None:
            base.vae.to("cuda")
    resolution = _resolution(base, model.resolution)
    classifier = load_classifier(config.classifier.name, confidence_threshold=config.classifier.confidence_threshold,
                                 **config.classifier.kwargs)

    # -- training images (cached) and groups
    tick = time.time()
    cache = ImageCache(config.cache_dir or default_cache_dir(),
                       model_fingerprint(pretrained, model.revision, model.variant, conditioner_spec),
                       config.sampling, resolution)
    sampler = _sampler(base, config, resolution)
    plans = plan_groups(split.train, config.groups)

    def fetch_files(keys):
        return dict(zip(keys, (str(f) for f in cache.fetch(sampler, [k[0] for k in keys], [k[1] for k in keys]))))

    # candidates are sampled in rounds, only for cells still without an image the classifier agrees with
    groups, group_stats = select_chosen(plans, fetch_files, lambda fs: classifier.classify(read_images(fs)),
                                        config.groups, config.classifier.race_scoring)
    data_dir = output_dir / "data"
    groups_file = write_groups(groups, data_dir / "groups.jsonl")
    pair_files = {}
    for per_group in sorted({m.pairs_per_group for m in config.methods if m.pairs}, key=lambda n: n or 0):
        name = "pairs.jsonl" if per_group is None else f"pairs-{per_group}-per-group.jsonl"
        # the draw of single-sample pairs is part of that baseline's randomness, like the data order: it follows
        # the training seed too (training.seed 0 keeps the draw of groups.seed alone)
        pair_files[per_group] = write_groups(
            pairs_from_groups(groups, per_group, seed=config.groups.seed + config.training.seed), data_dir / name)
    timings["training_groups_s"] = time.time() - tick  # sampling and classifying the images, writing the groups
    logger.info("groups: %s", group_stats)

    # -- evaluation of the base model
    real_faces = _real_faces(config, split.eval) if config.evaluation.quality_images > 0 else None
    evaluate = _Evaluator(config, classifier, split.eval, resolution, real_faces)
    evaluation_conditioner = None
    if family != "sd":  # frozen encoders: every model's evaluation prompts are encoded once, then unloaded
        captions = list(real_faces[1]) if real_faces is not None else []
        evaluation_conditioner = cache_evaluation_prompts(base, evaluate.prompts + captions)
        base.conditioner = evaluation_conditioner
    tick = time.time()
    summaries, per_method, images = {}, {}, {}
    summaries["base"], per_method["base"], images["base"] = evaluate(base, cache=cache)
    timings["evaluate_base_s"] = time.time() - tick
    del sampler, base
    gc.collect()

    # -- methods
    training_logs, memory_features = {}, {}
    for method in config.methods:
        tick = time.time()
        method_dir = output_dir / "methods" / method.name
        data_file = pair_files[method.pairs_per_group] if method.pairs else groups_file
        train_config = _train_config(config, method, data_file, method_dir, resolution, pretrained, conditioner_spec,
                                     conditioner_kwargs, config.groups.rejected_per_group, family)
        summary = train_image_model(train_config)
        trained = summary["model"]
        timings[f"train_{method.name}_s"] = time.time() - tick
        training_logs[method.name] = {k: v for k, v in summary.get("metrics", {}).items()
                                      if isinstance(v, (int, float))}
        if evaluation_conditioner is not None:
            memory_features[method.name] = list(trained.memory_features)
            trained.conditioner = evaluation_conditioner
        tick = time.time()
        summaries[method.name], per_method[method.name], images[method.name] = evaluate(trained)
        timings[f"evaluate_{method.name}_s"] = time.time() - tick
        del trained, summary
        gc.collect()

    # -- report
    base_loss = summaries["base"].get("denoising_loss")
    for name, summary in summaries.items():
        if base_loss is not None and "denoising_loss" in summary:
            summary["denoising_loss_change"] = summary["denoising_loss"] / base_loss - 1.0
    timings["total_s"] = time.time() - started
    report = {
        "model": pretrained,
        "classifier": getattr(classifier, "name", config.classifier.name),
        "occupations": split.as_dict(),
        "groups": group_stats,
        "summary": summaries,
        "per_occupation": per_method,
        "training": training_logs,
        **({"memory_features": memory_features} if memory_features else {}),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "config": asdict(config),
    }
    write_json(report, output_dir / "report.json")
    table = markdown_table(summaries)
    atomic_write_text(output_dir / "report.md",
        f"# Debiasing report\n\nModel `{pretrained}`, classifier `{report['classifier']}`, {len(split.eval)} held-out "
        f"occupations × {config.evaluation.images_per_occupation} images, {config.training.max_steps} steps per "
        f"method. Averages over held-out occupations.\n\n{table}")
    groups_cfg = config.groups
    plot_stacked_bars(per_method, "gender", groups_cfg.genders, output_dir / "gender_bars.png")
    race_classes = groups_cfg.races if config.classifier.race_scoring == "requested" else \
        list(next(iter(per_method["base"].values()))["race_counts"])
    plot_stacked_bars(per_method, "race", race_classes, output_dir / "race_bars.png")
    save_before_after_grid(images, output_dir / "before_after.png", per_row=config.evaluation.grid_images)
    return report
