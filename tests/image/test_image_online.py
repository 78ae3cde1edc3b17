"""Online image rounds on the tiny pipeline: generate k images per prompt, score, group, train, evaluate."""
import json

import numpy as np
import pytest
import torch

import mmalign.image
from mmalign.config import ConfigError
from mmalign.rewards import CallableReward
from mmalign.rewards.image import ClassifierReward


class _RedIsFemale:
    """A stand-in face classifier: P(female) is the image's mean red value (every image "has a face")."""
    name, attributes, confidence_threshold = "red", ("gender",), 0.5

    def classify(self, images):
        from mmalign.image.classifiers.base import predictions_from_probabilities

        red = images[..., 0].astype(np.float64).mean(axis=(1, 2)) / 255.0
        return {"gender": predictions_from_probabilities("gender", np.stack([1 - red, red], 1), 0.5)}


def _config(tiny_sd_path, out, **extra):
    return {"prompts": ["a photo of a doctor", "a photo of a nurse"], "heldout_prompts": ["a photo of a teacher"],
            "model": {"name_or_path": str(tiny_sd_path)}, "lora": {"r": 4, "alpha": 8},
            "rounds": 2, "k": 4, "eval_k": 4, "resolution": 32, "num_inference_steps": 3, "guidance_scale": 1.0,
            "objective": {"name": "mdpo", "beta_d": 1000}, "diffusion": {"latent_sampling": "mode"},
            "training": {"batch_size": 2, "max_steps": 3, "learning_rate": 5e-3, "lr_scheduler": "constant",
                         "logging_steps": 1, "progress_bar": False, "num_threads": 1, "plot": False},
            "output_dir": str(out), **extra}


def test_rounds_generate_score_group_and_train(tiny_sd_path, tmp_path):
    balance = ClassifierReward(_RedIsFemale(), attribute="gender", mode="balance")
    result = mmalign.image.online(_config(tiny_sd_path, tmp_path / "run"), reward=balance)
    rows = result["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all({"heldout_reward", "simpson_gender"} <= set(r) for r in rows)
    assert all(0.0 <= r["simpson_gender"] <= 0.5 for r in rows)
    assert [json.loads(x)["round"] for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()] == [0, 1, 2]
    for r in (1, 2):
        directory = tmp_path / "run" / f"round-{r:02d}"
        scores = torch.tensor(json.loads((directory / "scores.json").read_text())["scores"])
        groups = [json.loads(line) for line in (directory / "data.jsonl").read_text().splitlines()]
        for g in groups:  # chosen images are the better-scored half of their prompt's k images
            prompt = ["a photo of a doctor", "a photo of a nurse"].index(g["prompt"])
            member = lambda name: int(name.split("_")[1].split(".")[0])  # noqa: E731
            chosen = [scores[prompt, member(n)] for n in g["chosen"]]
            rejected = [scores[prompt, member(n)] for n in g["rejected"]]
            assert len(chosen) == len(rejected) == 2 and min(chosen) >= max(rejected)
        assert (directory / "final" / "pytorch_lora_weights.safetensors").exists()
        assert len(list((directory / "images").glob("*.png"))) == 8
    # the held-out images (same seeds every round) change once the policy is trained: the rounds train the policy
    assert rows[1]["heldout_reward"] != rows[0]["heldout_reward"]
    assert result["plot"] is not None


@pytest.mark.slow
def test_brightness_reward_moves_up_over_rounds(tiny_pixel_path, tmp_path):
    """A pixel-space UNet (a random VAE would hide brightness in its latents) learns "brighter is better"."""
    brightness = CallableReward(lambda prompts, images: [float(np.asarray(i).mean()) for i in images], name="bright")
    cfg = _config(tiny_pixel_path, tmp_path / "run", rounds=2, resolution=16)
    cfg["diffusion"]["timestep_max"] = 200
    cfg["eval_k"] = 8
    cfg["training"] = {**cfg["training"], "max_steps": 12, "learning_rate": 5e-2, "max_grad_norm": None}
    rows = mmalign.image.online(cfg, reward=brightness)["rounds"]
    # measured: 126.6 -> 128.8 -> 130.5 (mean pixel value of the held-out images, same seeds every round)
    assert rows[0]["heldout_reward"] < rows[1]["heldout_reward"] < rows[2]["heldout_reward"], rows


def test_bad_settings_are_refused(tiny_sd_path, tmp_path):
    with pytest.raises(ConfigError, match="k >= 2"):
        mmalign.image.online(_config(tiny_sd_path, tmp_path / "a", k=1), reward=lambda p, o: [0.0] * len(o))
    with pytest.raises(ConfigError, match="lora.enabled: online rounds use LoRA"):
        cfg = _config(tiny_sd_path, tmp_path / "b")
        cfg["lora"] = {"enabled": False}
        mmalign.image.online(cfg, reward=lambda p, o: [0.0] * len(o))
    with pytest.raises(ValueError, match="tie on the reward"):
        mmalign.image.online(_config(tiny_sd_path, tmp_path / "c"), reward=lambda p, o: [0.0] * len(o))
