"""The bright-vs-dark contrast experiment's data and rule (mmalign_experiments/image_brightness_contrast.py;
docs/image.md, "Known limits"). The measured runs themselves are in docs/image.md; they take minutes, so here only
what decides their outcome: the pairs and the analysis rule."""
import numpy as np
import pytest

from mmalign_experiments.image_brightness_contrast import apply_rule, brightness_images, preference_rows


def test_images_spread_brightness_in_range():
    images = brightness_images(np.random.default_rng(0), 64)
    assert images.shape == (64, 16, 16, 3) and images.dtype == np.uint8
    levels = images.reshape(64, -1).mean(axis=1)
    assert levels.max() - levels.min() > 80  # a spread for the preference to act on


def test_bright_and_dark_rows_are_the_same_pairs_swapped():
    bright, dark = preference_rows(3, 16, "bright"), preference_rows(3, 16, "dark")
    assert len(bright) == len(dark) > 0
    for b, d in zip(bright, dark):
        assert b["prompt"] == d["prompt"]
        assert np.array_equal(b["chosen"][0], d["rejected"][0]) and np.array_equal(b["rejected"][0], d["chosen"][0])
        assert b["chosen"][0].mean() > b["rejected"][0].mean()
    with pytest.raises(ValueError, match="prefer"):
        preference_rows(0, 4, "grey")


@pytest.mark.parametrize("contrasts, passed", [
    ([3.0, 3.5, 4.0, 3.2, 3.8], True),
    ([1.28, 2.64, 3.38, 2.89, -0.98], False),   # one seed below zero (session 13's pretrained run)
    ([0.5, 0.6, 0.55, 0.52, 0.58], False),      # all positive, but the mean is under 1 pixel level
    ([1.0, 9.0, 1.2, 8.0, 1.1], False),         # all positive, mean under 2 sd
])
def test_rule(contrasts, passed):
    assert apply_rule(contrasts)["passed"] is passed


def test_presets_v2_is_full_finetuning_and_first_guess_is_session_13s_lora():
    from pathlib import Path

    from mmalign_experiments.image_brightness_contrast import PRESETS, ContrastSettings, _run_config

    assert PRESETS["v2"] == ContrastSettings()
    v2 = _run_config(Path("start"), Path("/nonexistent/out"), 0, PRESETS["v2"], "dpo", 60)
    assert v2["lora"] == {"enabled": False} and v2["training"]["learning_rate"] == 3e-5
    first = _run_config(Path("start"), Path("/nonexistent/out"), 0, PRESETS["first-guess"], "dpo", 60)
    assert first["lora"] == {"r": 8, "alpha": 8} and first["training"]["learning_rate"] == 5e-3
    assert "nll" not in first["objective"] and first["objective"]["beta_d"] == 2000.0
    with pytest.raises(ValueError, match="finetuning"):
        _run_config(Path("start"), Path("/nonexistent/out"), 0, ContrastSettings(finetuning="half"), "dpo", 60)


def test_cli_flags_override_the_chosen_preset():
    import argparse
    from dataclasses import asdict

    from mmalign_experiments.image_brightness_contrast import ContrastSettings, settings_from_args

    args = argparse.Namespace(preset="first-guess", **{name: None for name in asdict(ContrastSettings())})
    args.dpo_steps, args.nll = 240, 1000.0
    settings = settings_from_args(args)
    assert (settings.finetuning, settings.learning_rate, settings.dpo_steps, settings.nll) == ("lora", 5e-3, 240, 1000.0)
