"""``model.optimizer: adamw_8bit`` with the real bitsandbytes (skipped where it is not installed; the wiring with a
stand-in is tests/image/test_family_recipes.py): the optimiser is bitsandbytes' ``AdamW8bit`` with 8-bit state,
and its steps move the preference margin of a tiny SD3 pipeline."""

import types

import pytest
import torch

bitsandbytes = pytest.importorskip("bitsandbytes")

FULL = {"enabled": False}  # full fine-tuning: weights of >= 4096 elements get bitsandbytes' 8-bit state


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from mmalign.image.families.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sd3", tmp_path_factory.mktemp("sd3-8bit"))


def _eight_bit_states(optimizer) -> int:
    return sum(state.get("state1") is not None and state["state1"].dtype == torch.uint8
               for state in optimizer.state.values())


def test_train_uses_bitsandbytes_adamw8bit_with_8bit_state(tiny_sd3, toy_data, tmp_path, monkeypatch):
    from mmalign.image.training import train

    built = []

    class Recorded(bitsandbytes.optim.AdamW8bit):  # the real optimiser, remembered for the checks below
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(bitsandbytes.optim, "AdamW8bit", Recorded)
    result = train({"output_dir": str(tmp_path / "run"), "lora": FULL,
                    "model": {"name_or_path": str(tiny_sd3), "optimizer": "adamw_8bit"},
                    "data": {"train": str(toy_data), "resolution": 64},
                    "training": {"max_steps": 2, "batch_size": 2, "progress_bar": False, "learning_rate": 1e-4,
                                 "save_steps": 0}})
    assert result.global_step == 2 and "adamw_8bit" in result.details["preference_model"].memory_features
    assert len(built) == 1 and isinstance(built[0], bitsandbytes.optim.optimizer.Optimizer8bit)
    assert _eight_bit_states(built[0]) > 0


def test_8bit_adamw_steps_move_the_margin(tiny_sd3):
    from mmalign.config import load_config
    from mmalign.image.config import ImageTrainConfig
    from mmalign.image.families.build import build_family_model
    from mmalign.image.families.memory import trainer_class
    from mmalign.image.testing import margin_before_and_after_steps

    config = load_config(ImageTrainConfig, {"model": {"name_or_path": str(tiny_sd3), "optimizer": "adamw_8bit"},
                                            "lora": FULL, "data": {"train": "unused", "resolution": 64},
                                            "training": {"learning_rate": 1e-3}})
    torch.manual_seed(0)
    model = build_family_model(config)
    params = [p for p in model.parameters() if p.requires_grad]
    # the optimiser exactly as the training run builds it (Trainer8bit._build_optimizer)
    optimizer = trainer_class("adamw_8bit")._build_optimizer(types.SimpleNamespace(config=config.training,
                                                                                     _params=params))
    assert type(optimizer) is bitsandbytes.optim.AdamW8bit
    generator = torch.Generator().manual_seed(1)
    shape = (2, 1, model.vae.config.latent_channels, 16, 16)
    batch = {"prompts": ["a photo of thing 0", "a photo of thing 1"], "inputs": "latents",
             "chosen": torch.randn(shape, generator=generator), "rejected": torch.randn(shape, generator=generator),
             "noise": torch.randn(shape[:1] + shape[2:], generator=generator), "timesteps": torch.tensor([700.0, 250.0])}
    before, after = margin_before_and_after_steps(model, batch, optimizer)
    assert _eight_bit_states(optimizer) > 0
    assert after > before + 1e-4
