"""The SDXL / SD3.5 / FLUX recipes run end to end (mmalign.image.train) on tiny pipelines of the same layout, and
use the memory features they name. Only what cannot run here is overridden: weights, data, scale, precision."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.config import load_config
from mmalign.image.config import ImageTrainConfig

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "image"


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    from mmalign.image.families.tiny import save_tiny_pipeline

    return {family: save_tiny_pipeline(family, tmp_path_factory.mktemp(f"recipe-{family}"))
            for family in ("sdxl", "sd3", "flux")}


@pytest.fixture(scope="module")
def group_data(tmp_path_factory):
    from mmalign.image.testing import write_toy_preference_dataset

    return write_toy_preference_dataset(tmp_path_factory.mktemp("groups"), num_prompts=4, chosen_per_prompt=2,
                                        rejected_per_prompt=2)


# recipe -> (tiny family, memory features the recipe names, that the run must have used)
CASES = {
    "sdxl-dpo-pickapic-lora.yaml": ("sdxl", {"gradient_checkpointing", "bfloat16_weights_fp32_lora", "vae_slicing"}),
    "sd35-mdpo-lora.yaml": ("sd3", {"gradient_checkpointing", "bfloat16_weights_fp32_lora", "text_embedding_cache",
                                    "latent_cache"}),
    "flux-dpo-lora.yaml": ("flux", {"gradient_checkpointing", "bfloat16_weights_fp32_lora", "text_embedding_cache",
                                    "latent_cache", "vae_tiling"}),
}


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_recipe_runs_end_to_end_on_a_tiny_pipeline_of_its_layout(recipe, tiny_paths, toy_data, group_data, tmp_path):
    from mmalign.image.training import train

    family, features = CASES[recipe]
    shipped = load_config(ImageTrainConfig, RECIPES / recipe)
    assert shipped.model.family in ("auto", family)
    data = group_data if shipped.objective.name == "mdpo" else toy_data
    overrides = [f"model.name_or_path={tiny_paths[family]}", "model.vae=null", f"data.train={data}",
                 "data.format=groups", "data.prompt_field=prompt", "data.chosen_field=chosen",
                 "data.rejected_field=rejected", "data.resolution=64", "model.max_sequence_length=null",
                 f"output_dir={tmp_path / 'run'}", "training.max_steps=2", "training.batch_size=2",
                 "training.gradient_accumulation_steps=1", "training.warmup_steps=0", "training.save_steps=0",
                 "training.mixed_precision=no", "training.logging_steps=1", "training.learning_rate=1e-3",
                 "generation.num_inference_steps=2", "generation.images_per_prompt=1", "generation.resolution=64",
                 "training.progress_bar=false", "model.dtype=float32"]  # bf16 convs are slow on CPU
    summary = train(RECIPES / recipe, overrides)
    model = summary["model"]
    assert summary["global_step"] == 2
    assert model.family.name == family
    assert features <= set(model.memory_features), model.memory_features
    if "text_embedding_cache" in features:
        assert not any("text_encoder" in name for name, _ in model.named_parameters())
    final = Path(summary["final_dir"])
    weights = load_file(str(final / "pytorch_lora_weights.safetensors"))
    prefix = "unet." if family == "sdxl" else "transformer."
    assert weights and all(key.startswith(prefix) for key in weights)
    assert list((tmp_path / "run" / "samples").glob("*.png"))  # a grid sampled with the pipeline's scheduler
    lora = [p for n, p in model.unet.named_parameters() if "lora" in n]
    assert all(p.dtype == torch.float32 for p in lora)


def test_adamw_8bit_is_the_optimizer_when_bitsandbytes_is_present(tiny_paths, toy_data, tmp_path, monkeypatch):
    """The wiring of model.optimizer: adamw_8bit, with a stand-in bitsandbytes module (the real one, where installed:
    tests/image/test_adamw_8bit.py)."""
    import sys
    import types

    from mmalign.image.training import train

    built = []

    class AdamW8bit(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            built.append(kwargs)
            super().__init__(params, **kwargs)

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    summary = train({"output_dir": str(tmp_path / "run"),
                     "model": {"name_or_path": str(tiny_paths["sd3"]), "optimizer": "adamw_8bit"}, "lora": {"r": 4},
                     "data": {"train": str(toy_data), "resolution": 64},
                     "training": {"max_steps": 1, "batch_size": 2, "progress_bar": False, "learning_rate": 1e-4}})
    assert len(built) == 1 and built[0]["lr"] == 1e-4
    assert "adamw_8bit" in summary["model"].memory_features
