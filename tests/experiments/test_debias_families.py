"""The debias pipeline on SDXL and SD3.5 (``configs/image/debias-sdxl.yaml``, ``debias-sd35.yaml``): each recipe's
code path end to end on a tiny pipeline of its layout (family sampling with the pipeline's own scheduler, every
method trained with the memory features the recipe names), the family quality measure against a direct
computation, and the settings errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmalign.config import load_config
from mmalign_experiments.debias.config import DebiasConfig

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "image"


@pytest.fixture(scope="module")
def tiny_family_paths(tmp_path_factory):
    from mmalign.image.families.tiny import save_tiny_pipeline

    return {family: save_tiny_pipeline(family, tmp_path_factory.mktemp(f"debias-{family}"))
            for family in ("sdxl", "sd3")}


# recipe -> (tiny family, its sampling scheduler class, memory features the recipe names)
CASES = {
    "debias-sdxl.yaml": ("sdxl", "EulerDiscreteScheduler",
                         {"gradient_checkpointing", "bfloat16_weights_fp32_lora", "latent_cache",
                          "text_embedding_cache"}),
    "debias-sd35.yaml": ("sd3", "FlowMatchEulerDiscreteScheduler",
                         {"gradient_checkpointing", "bfloat16_weights_fp32_lora", "latent_cache",
                          "text_embedding_cache"}),
}


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_shipped_family_debias_recipe_validates(recipe):
    config = load_config(DebiasConfig, RECIPES / recipe)
    assert config.sampling.scheduler == "pipeline" and config.model.cache_text_embeddings
    assert [m.name for m in config.methods] == ["mdpo", "dpo", "dpo_all_pairs", "mipo"]


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_family_debias_recipe_runs_end_to_end_on_a_tiny_pipeline(recipe, tiny_family_paths, tmp_path, monkeypatch):
    """The recipe's own code path on a tiny pipeline of its layout. Overridden only what cannot run here: the
    weights (and SDXL's fp16-fix VAE), deepface (no weights offline; the tiny model draws no faces, so no filter),
    bf16 autocast and the scale."""
    import diffusers

    from mmalign.image.families import sampling as family_sampling
    from mmalign_experiments.debias.cli import main

    family, scheduler_name, features = CASES[recipe]
    calls = {"family_sampling": 0, "own_scheduler": 0}
    scheduler_class = getattr(diffusers, scheduler_name)
    original_generate, original_set = family_sampling.generate_family_images, scheduler_class.set_timesteps

    def generate(*args, **kwargs):
        calls["family_sampling"] += 1
        return original_generate(*args, **kwargs)

    def set_timesteps(*args, **kwargs):
        calls["own_scheduler"] += 1
        return original_set(*args, **kwargs)

    monkeypatch.setattr(family_sampling, "generate_family_images", generate)
    monkeypatch.setattr(scheduler_class, "set_timesteps", set_timesteps)
    out = tmp_path / "run"
    main(["--config", str(RECIPES / recipe), "--set", f"output_dir={out}", "--set", f"cache_dir={tmp_path / 'cache'}",
          "--set", f"model.name_or_path={tiny_family_paths[family]}", "--set", "model.vae=null",
          "--set", "model.dtype=float32", "--set", "model.resolution=64", "--set", "model.max_sequence_length=null",
          "--set", "training.mixed_precision=no", "--set", "classifier.name=default", "--set", "classifier.kwargs={}",
          "--set", "groups.filter=none", "--set", "groups.groups_per_occupation=1",
          "--set", "groups.candidates_per_cell=1", "--set", "groups.rejected_per_group=2",
          "--set", "groups.min_chosen=1",
          "--set", "occupations.count=6", "--set", "occupations.eval_fraction=0.34",
          "--set", "sampling.num_inference_steps=2", "--set", "sampling.batch_size=8",
          "--set", "evaluation.images_per_occupation=2", "--set", "evaluation.quality_images=4",
          "--set", "evaluation.quality_noise_draws=1", "--set", "evaluation.grid_images=2",
          "--set", "training.max_steps=1", "--set", "training.warmup_steps=0",
          "--set", "training.gradient_accumulation_steps=1", "--set", "training.save_steps=0",
          "--set", "training.progress_bar=false"])
    written = json.loads((out / "report.json").read_text())
    methods = ("mdpo", "dpo", "dpo_all_pairs", "mipo")
    assert set(written["summary"]) == {"base", *methods}
    prefix = "unet." if family == "sdxl" else "transformer."
    for method in methods:
        assert written["training"][method]["step"] == 1
        assert features <= set(written["memory_features"][method]), written["memory_features"][method]
        weights = load_file(str(out / "methods" / method / "final" / "pytorch_lora_weights.safetensors"))
        assert weights and all(key.startswith(prefix) for key in weights)  # the pipeline's LoRA format
    losses = [written["summary"][name]["denoising_loss"] for name in ("base", *methods)]
    assert all(np.isfinite(losses)) and min(losses) > 0
    for name in ("report.md", "gender_bars.png", "race_bars.png", "before_after.png"):
        assert (out / name).is_file(), name
    # every image came from the family's pipeline with its own scheduler: training candidates + base evaluation
    # (cached) and one evaluation per method, in batches of 8
    assert calls["family_sampling"] >= 1 + len(methods), calls
    assert calls["own_scheduler"] >= calls["family_sampling"], calls


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_family_denoising_error_equals_a_direct_computation(family, tiny_family_paths):
    from types import SimpleNamespace

    from mmalign_experiments.debias.families import family_denoising_error, load_family_base

    model_config = SimpleNamespace(revision=None, variant=None, weights_dtype="float32", dtype="float32", vae=None,
                                   use_t5=True, max_sequence_length=None)
    base = load_family_base(model_config, str(tiny_family_paths[family]), family)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    prompts = ["a doctor", "a nurse", "a judge"]
    value = family_denoising_error(base, images, prompts, draws=2, seed=5, resolution=64)

    # by hand: posterior mean latents, shifted and scaled; the family's noise and target; the backbone called as
    # the pipelines call it
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        x0 = base.vae.encode(pixels).latent_dist.mean
        x0 = (x0 - (base.vae.config.shift_factor or 0.0)) * base.vae.config.scaling_factor
        encoded = base.conditioner(prompts)
        errors = []
        for _ in range(2):
            noise = torch.randn(x0.shape, generator=generator)
            if family == "sd3":
                table = torch.as_tensor(base.noise_scheduler.timesteps, dtype=torch.float32)
                t = table[torch.randint(0, len(table), (3,), generator=generator)]
                sigma = (t / 1000).view(-1, 1, 1, 1)
                noisy, target = (1 - sigma) * x0 + sigma * noise, noise - x0
                prediction = base.unet(hidden_states=noisy, timestep=t, encoder_hidden_states=encoded["states"],
                                       pooled_projections=encoded["pooled"]).sample
            else:
                t = torch.randint(0, 1000, (3,), generator=generator)
                noisy, target = base.noise_scheduler.add_noise(x0, noise, t), noise
                ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).expand(3, 6)
                prediction = base.unet(noisy, t, encoder_hidden_states=encoded["states"], added_cond_kwargs={
                    "text_embeds": encoded["pooled"], "time_ids": ids}).sample
            errors.append(((prediction - target) ** 2).mean(dim=(1, 2, 3)))
    assert value == pytest.approx(torch.cat(errors).mean().item(), rel=1e-5)
    assert family_denoising_error(base, images, prompts, draws=2, seed=5, resolution=64) == value  # paired
    assert family_denoising_error(base, images, prompts, draws=2, seed=6, resolution=64) != value


def test_family_and_sd_settings_are_checked_before_sampling(tiny_family_paths, tmp_path):
    from mmalign_experiments.debias.cli import main

    common = ["--set", f"output_dir={tmp_path / 'run'}", "--set", f"cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(ValueError, match="set sampling.scheduler: pipeline"):
        main(common + ["--set", f"model.name_or_path={tiny_family_paths['sd3']}"])
    with pytest.raises(ValueError, match="model.cache_text_embeddings: for sdxl, sd3 and flux"):
        main(common + ["--set", "model.cache_text_embeddings=true"])  # the shipped (sd) face model
    with pytest.raises(ValueError, match="sampling.scheduler: pipeline is for sdxl"):
        main(common + ["--set", "sampling.scheduler=pipeline"])
    assert not list((tmp_path / "cache").rglob("*.png"))
