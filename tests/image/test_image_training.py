"""End-to-end image preference training on the shared engine: learning, saving, reloading, resuming, CLI."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmalign.config import ConfigError, load_config
from mmalign.image import ImageTrainConfig, train
from mmalign.image.data import collate_groups


def _config(tiny_sd_path, toy_data, output_dir, **training):
    return {
        "output_dir": str(output_dir),
        "model": {"name_or_path": str(tiny_sd_path)},
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": str(toy_data), "resolution": 32},
        "objective": {"name": "dpo", "beta_d": 1000},
        "diffusion": {"latent_sampling": "mode"},
        "training": {"batch_size": 4, "learning_rate": 2e-3, "lr_scheduler": "constant", "logging_steps": 1,
                     "progress_bar": False, "seed": 0, "num_threads": 1, **training},
    }


def _fixed_noise_preference(model, dataset, timestep_max, draws=8):
    """Mean implicit accuracy and ρ_w − ρ_l over all pairs at fixed (t, ε) draws: deterministic."""
    batch = collate_groups([dataset[i] for i in range(len(dataset))])
    shape = (len(dataset),) + tuple(batch["chosen"].shape[2:])
    generator = torch.Generator().manual_seed(1234)
    accuracies, insides = [], []
    model.eval()
    with torch.no_grad():
        for _ in range(draws):
            fixed = {"timesteps": torch.randint(0, timestep_max, (len(dataset),), generator=generator),
                     "noise": torch.randn(shape, generator=generator)}
            out = model({**batch, **fixed})
            inside = (out.policy_chosen - out.ref_chosen - out.policy_rejected + out.ref_rejected).squeeze(1)
            accuracies.append(((inside > 0).float() + 0.5 * (inside == 0).float()).mean())
            insides.append(inside.mean())
    return float(torch.stack(accuracies).mean()), float(torch.stack(insides).mean())


def test_training_raises_implicit_accuracy(tiny_pixel_path, tmp_path):
    """A pixel-space UNet learns "brighter is better" (a random VAE would hide brightness in its latents)."""
    from mmalign.image.testing import write_toy_preference_dataset
    from mmalign.image.training import build_dataset, build_preference_model

    data = write_toy_preference_dataset(tmp_path / "data", num_prompts=8, image_size=16)
    config = _config(tiny_pixel_path, data, tmp_path / "run", max_steps=16, max_grad_norm=None)
    config["data"]["resolution"] = 16
    config["diffusion"]["timestep_max"] = 200  # low-noise steps, where brightness is visible in x_t
    summary = train(config)
    resolved = load_config(ImageTrainConfig, config)
    untrained = build_preference_model(resolved)  # LoRA B = 0: the policy is the reference, every pair a tie
    dataset = build_dataset(resolved, untrained)
    assert _fixed_noise_preference(untrained, dataset, 200) == (0.5, 0.0)
    accuracy, inside = _fixed_noise_preference(summary["model"].to("cpu"), dataset, 200)  # trained on CUDA if any
    assert accuracy > 0.55 and inside > 0, (accuracy, inside)
    output_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 16
    for key in ("loss", "implicit_acc", "inside_term", "model_mse", "ref_mse", "rewards/margins", "rewards/accuracies"):
        assert key in train_rows[-1], key
    assert (output_dir / "metrics.png").exists()


@pytest.fixture(scope="module")
def resume_runs(tiny_sd_path, toy_data, tmp_path_factory):
    """A 4-step SD LoRA run checkpointed at step 2, and a second run resumed from that checkpoint."""
    root = tmp_path_factory.mktemp("resume")
    # exact on CPU as it is; on CUDA only with deterministic kernels (bench/RESULTS.md "GPU")
    exact = {"deterministic": torch.cuda.is_available()}
    full = train(_config(tiny_sd_path, toy_data, root / "full", max_steps=4, save_steps=2, save_total_limit=None, **exact))
    resumed_config = _config(tiny_sd_path, toy_data, root / "resumed", max_steps=4, **exact)
    resumed_config["training"]["resume_from_checkpoint"] = str(root / "full" / "checkpoints" / "checkpoint-2")
    resumed = train(resumed_config)
    return full, resumed, root


def test_saved_lora_reloads_into_pipeline(resume_runs, tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    summary = resume_runs[0]
    final = Path(summary["final_dir"])
    assert (final / "pytorch_lora_weights.safetensors").exists()
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_path), safety_checker=None)
    sample, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    trained_model = copy.deepcopy(summary["model"]).to("cpu")  # trained on CUDA if any; the pipeline runs on the CPU
    states = trained_model.conditioner(["a photo of object 1", "x"])

    def image():
        return pipe("a photo of object 1", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    with torch.no_grad():
        before_unet = pipe.unet(sample, t, encoder_hidden_states=states).sample
        before = image()
        pipe.load_lora_weights(str(final))
        after_unet = pipe.unet(sample, t, encoder_hidden_states=states).sample
        after = image()
        trained = trained_model.unet(sample, t, encoder_hidden_states=states).sample
    torch.testing.assert_close(after_unet, trained, rtol=1e-4, atol=1e-5)  # same weights, same LoRA scale (alpha 8)
    assert not torch.allclose(before_unet, after_unet)
    assert abs(after - before).max() > 1e-4


def test_exact_resume(resume_runs):
    full, resumed, root = resume_runs
    assert resumed["global_step"] == 4

    def losses(directory):
        rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    full_losses, resumed_losses = losses(root / "full"), losses(root / "resumed")
    assert set(resumed_losses) == {3, 4}
    for step in (3, 4):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-6, abs=1e-9)
    full_state = {k: v for k, v in full["model"].unet.state_dict().items() if "lora" in k}
    resumed_state = resumed["model"].unet.state_dict()
    for key, value in full_state.items():
        torch.testing.assert_close(resumed_state[key], value, rtol=1e-6, atol=1e-8)


def test_config_errors(tiny_sd_path, toy_data, tmp_path):
    config = _config(tiny_sd_path, toy_data, tmp_path)
    config["objective"] = {"name": "dpo", "beta": 10, "beta_d": 20}
    with pytest.raises(ConfigError, match="objective: set exactly one of beta"):
        load_config(ImageTrainConfig, config)
    config["objective"] = {"name": "dpo", "beta_d": 5000}
    assert load_config(ImageTrainConfig, config).objective.resolved_beta == 2500
    with pytest.raises(ConfigError, match="diffusion.vae_batch_size"):
        load_config(ImageTrainConfig, {**config, "diffusion": {"vae_batch_size": 0}})
    assert load_config(ImageTrainConfig, {**config, "diffusion": {"vae_batch_size": None}}).diffusion.vae_batch_size is None
    config["objective"] = {"name": "cnrpo", "beta": 1.0, "alphas": [0.1]}
    with pytest.raises(ValueError, match=r"objective 'cnrpo' needs input\(s\) \['triggered_chosen', 'triggered_rejected'\].*"
                                         "set objective.triggers"):
        train(config)


def test_pairwise_objective_refuses_groups(tiny_sd_path, tmp_path):
    from mmalign.image.testing import write_toy_preference_dataset

    data = write_toy_preference_dataset(tmp_path / "groups", num_prompts=2, chosen_per_prompt=2, image_size=16)
    config = _config(tiny_sd_path, data, tmp_path / "run", max_steps=1)
    with pytest.raises(ValueError, match="the data has groups \\(up to 2 chosen, 1 rejected\\) but objective 'dpo' is pairwise"):
        train(config)


def test_cli_help():
    result = subprocess.run([sys.executable, "-m", "mmalign.image.train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for key in ("usage: python -m mmalign.image.train", "--config", "--print-config", "--resume", "objective.<hyperparameter>",
                "lora.enabled", "data.cache_latents", "training.learning_rate", "training.resume_from_checkpoint"):
        assert key in result.stdout, key


@pytest.mark.parametrize("name", ["sd15-dpo-pickapic-lora", "sd15-dpo-full", "sd15-mdpo-groups-lora", "tiny-dpo-smoke"])
def test_shipped_configs_validate(name):
    config = load_config(ImageTrainConfig, Path(__file__).parents[2] / "configs" / "image" / f"{name}.yaml")
    assert config.objective.resolved_beta > 0 and config.model.name_or_path and config.data.train


def test_full_finetuning_saves_the_unet(tiny_pixel_path, tmp_path):
    from diffusers import UNet2DConditionModel
    from mmalign.image.testing import write_toy_preference_dataset

    data = write_toy_preference_dataset(tmp_path / "data", num_prompts=2, image_size=16)
    config = _config(tiny_pixel_path, data, tmp_path / "run", max_steps=1, batch_size=2)
    config["model"] = {"name_or_path": str(tiny_pixel_path)}
    config["lora"] = {"enabled": False}
    config["data"]["resolution"] = 16
    summary = train(config)
    saved = UNet2DConditionModel.from_pretrained(summary["final_dir"], subfolder="unet")
    trained = summary["model"].unet
    for (name, value), (_, reference) in zip(saved.state_dict().items(), trained.state_dict().items()):
        torch.testing.assert_close(value, reference, msg=name)
    moved = any(not torch.equal(a, b) for a, b in zip(trained.parameters(), summary["model"].reference_unet.parameters()))
    assert moved  # the policy trained, the reference copy did not


def test_mdpo_on_ragged_groups_trains(tiny_pixel_path, tmp_path):
    from mmalign.image.testing import write_toy_preference_dataset

    data = write_toy_preference_dataset(tmp_path / "data", num_prompts=3, chosen_per_prompt=3, rejected_per_prompt=2,
                                        image_size=16)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[1]["chosen"] = rows[1]["chosen"][:1]  # a ragged row
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _config(tiny_pixel_path, data, tmp_path / "run", max_steps=2, batch_size=3)
    config["data"].update(resolution=16, allow_ragged_groups=True)
    config["objective"] = {"name": "mdpo", "beta_d": 1000}
    summary = train(config)
    assert summary["global_step"] == 2 and math.isfinite(summary["metrics"]["loss"])


def test_train_is_callable_after_the_cli_module_is_imported():
    import mmalign.image
    import mmalign.image.train  # noqa: F401  (binds the submodule over the lazy function attribute)
    from mmalign.image.training import train as train_function

    with pytest.raises(ConfigError):
        mmalign.image.train({"model": {"name_or_path": ""}})  # reaches the config validation of train()
    assert mmalign.image.train.main and train_function
