"""Online image rounds on the tiny pipeline: generate k images per prompt, score, group, train, evaluate."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mmalign
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
    # the library's one result type: the TrainResult, every round's metric rows as its log
    assert isinstance(result, mmalign.TrainResult) and result.global_step == 6
    assert [r["round"] for r in result.log] == [1, 1, 1, 2, 2, 2] and result.final_dir.name == "final"
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
def test_pixel_unet_rounds_train_on_a_callable_reward_without_clipping(tiny_pixel_path, tmp_path):
    """Two rounds on a pixel-space UNet with a callable (brightness) reward, the direct LoRA forward and no gradient
    clipping: every round trains (the held-out images, same seeds every round, change) and stays finite.

    What it does NOT check: that brightness rises. Measured (docs/image.md, Known limits): on this 16 px, 3-step
    model a run rewarded for DARK images moves the held-out brightness as much and in the same direction as one
    rewarded for bright images (bright - dark after the last round -2.7, +0.08, -4.4 over three settings), so a
    "moves up" assertion here would test drift of +-2-4 per round, not learning; an earlier version did."""
    brightness = CallableReward(lambda prompts, images: [float(np.asarray(i).mean()) for i in images], name="bright")
    cfg = _config(tiny_pixel_path, tmp_path / "run", rounds=2, resolution=16)
    cfg["diffusion"]["timestep_max"] = 200
    cfg["eval_k"] = 8
    cfg["training"] = {**cfg["training"], "max_steps": 12, "learning_rate": 5e-2, "max_grad_norm": None}
    result = mmalign.image.online(cfg, reward=brightness)
    rows = result["rounds"]
    held_out = [r["heldout_reward"] for r in rows]
    assert len(held_out) == 3 and all(np.isfinite(held_out)) and all(0.0 <= b <= 255.0 for b in held_out), rows
    assert held_out[0] != held_out[1] != held_out[2], rows
    assert all(np.isfinite(r["loss"]) for r in result.log), result.log


def test_bad_settings_are_refused(tiny_sd_path, tmp_path):
    with pytest.raises(ConfigError, match="k >= 2"):
        mmalign.image.online(_config(tiny_sd_path, tmp_path / "a", k=1), reward=lambda p, o: [0.0] * len(o))
    with pytest.raises(ConfigError, match="reference"):
        mmalign.image.online(_config(tiny_sd_path, tmp_path / "b", reference="last"), reward=lambda p, o: [0.0] * len(o))
    with pytest.raises(ValueError, match="tie on the reward"):
        mmalign.image.online(_config(tiny_sd_path, tmp_path / "c"), reward=lambda p, o: [0.0] * len(o))


def bright(prompts, images):
    """A brightness reward importable by path (the config's reward: section, the CLI and the resume test)."""
    return [float(np.asarray(i).mean()) for i in images]


def _bright_config(tiny_pixel_path, out, **training):
    cfg = _config(tiny_pixel_path, out, resolution=16, reward=[{"kind": "callable", "function": "tests.image.test_image_online:bright"}])
    cfg["training"] = {**cfg["training"], **training}
    return cfg


def test_cli_print_config_and_one_round(tiny_pixel_path, tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[2]
    config = tmp_path / "rounds.yaml"
    config.write_text(yaml.safe_dump(_bright_config(tiny_pixel_path, tmp_path / "cli", max_steps=1)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mmalign.image.online", "--config", str(config), "--set", "rounds=1"]
    printed = subprocess.run(command + ["--print-config"], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert printed.returncode == 0 and yaml.safe_load(printed.stdout)["rounds"] == 1, printed.stderr[-2000:]
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: 1 rounds, 1 steps" in done.stdout
    assert (tmp_path / "cli" / "round-01" / "policy.safetensors").exists()
    bad = subprocess.run(command + ["--set", "k=1"], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "k >= 2" in bad.stderr


def test_a_fresh_run_refuses_a_folder_with_rounds(tiny_pixel_path, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "rounds.jsonl").write_text('{"round": 0}\n')
    with pytest.raises(ValueError, match="holds the rounds of another run"):
        mmalign.image.online(_bright_config(tiny_pixel_path, tmp_path / "used"))
    with pytest.raises(ValueError, match="resume from their output_dir only"):
        mmalign.image.online(_bright_config(tiny_pixel_path, tmp_path / "x", resume_from_checkpoint="/some/where"))


def test_rounds_section_makes_image_train_run_rounds(tiny_pixel_path, tmp_path):
    online = _bright_config(tiny_pixel_path, tmp_path / "online", max_steps=2)
    rounds = {key: online.pop(key) for key in ("prompts", "heldout_prompts", "rounds", "k", "eval_k",
                                               "num_inference_steps", "guidance_scale", "reward")}
    train_cfg = {**{k: v for k, v in online.items() if k != "resolution"}, "data": {"resolution": 16},
                 "rounds": {**rounds, "rounds": 1}, "output_dir": str(tmp_path / "train")}
    result = mmalign.image.train(train_cfg)
    assert [r["round"] for r in result["rounds"]] == [0, 1] and result.global_step == 2
    # the same run as mmalign.image.online with the same settings
    direct = mmalign.image.online({**_bright_config(tiny_pixel_path, tmp_path / "direct", max_steps=2), "rounds": 1})
    strip = lambda rows: [{k: v for k, v in r.items() if k != "train_runtime_s"} for r in rows]  # noqa: E731
    assert strip(result["rounds"]) == strip(direct["rounds"])
    with pytest.raises(ConfigError, match="rounds: rounds >= 1, k >= 2"):
        mmalign.image.train({**train_cfg, "rounds": {**rounds, "k": 1}})


def _outcome(out):
    """rounds.jsonl, rounds 1–2's metrics (wall-clock fields dropped) and round 2's policy tensors of a run."""
    from safetensors.torch import load_file

    wall = ("train_runtime_s", "tokens/s", "samples/s", "step_s")
    rounds = [{k: v for k, v in json.loads(x).items() if k not in wall}
              for x in (out / "rounds.jsonl").read_text().splitlines()]
    metrics = [[{k: v for k, v in json.loads(x).items() if k not in wall}
                for x in (out / f"round-{r:02d}" / "metrics.jsonl").read_text().splitlines()] for r in (1, 2)]
    return rounds, metrics, load_file(str(out / "round-02" / "policy.safetensors"))


@pytest.mark.slow
def test_rounds_resume_bit_exact_after_kills(tiny_pixel_path, tmp_path):
    """Killed inside round 1's training, before round 1's final save, between rounds and after round 2's data:
    the resumed run's rounds.jsonl, every round's metrics and the last policy equal an uninterrupted run's."""
    from tests.torture import run

    def make(out):
        return _bright_config(tiny_pixel_path, out, max_steps=3, save_steps=2, seed=0, plot=False)

    reference = make(tmp_path / "reference")
    assert run("image_online", reference).returncode == 0
    expected = _outcome(tmp_path / "reference")
    assert [r["round"] for r in expected[0]] == [0, 1, 2]
    for fault in ("checkpoint_files:2", "before_final:3", "round_done:1", "round_data:2"):
        config = make(tmp_path / fault.replace(":", "-"))
        killed = run("image_online", config, fault=fault)
        assert killed.returncode == -9, (fault, killed.stderr[-2000:])
        resumed = run("image_online", config, resume=True)
        assert resumed.returncode == 0, (fault, resumed.stderr[-3000:])
        rounds, metrics, weights = _outcome(Path(config["output_dir"]))
        assert rounds == expected[0] and metrics == expected[1], fault
        assert weights.keys() == expected[2].keys() and all(weights[k].equal(v) for k, v in expected[2].items()), fault


def test_reference_previous_trains_each_round_against_the_last_rounds_policy(tiny_pixel_path, tmp_path, monkeypatch):
    """reference: previous — the reference of round r is round r−1's policy (round 1: the adapter-disabled base),
    so each round's first loss is mDPO's at ρ = 0, ln 2."""
    import math

    from safetensors.torch import load_file

    import mmalign.engine

    seen = {}

    class Recording(mmalign.engine.Trainer):
        def __init__(self, model, *args, **kwargs):
            reference = model.reference_unet
            seen[len(seen) + 1] = None if reference is None else {
                name: p.detach().clone() for name, p in reference.named_parameters()}
            super().__init__(model, *args, **kwargs)

    monkeypatch.setattr(mmalign.engine, "Trainer", Recording)
    out = tmp_path / "previous"
    result = mmalign.image.online({**_bright_config(tiny_pixel_path, out, max_steps=2), "rounds": 3,
                                   "reference": "previous"})
    assert [r["round"] for r in result["rounds"]] == [0, 1, 2, 3] and sorted(seen) == [1, 2, 3]
    assert seen[1] is None  # round 1: the base (adapters disabled)
    for r in (2, 3):
        policy = load_file(str(out / f"round-{r - 1:02d}" / "policy.safetensors"))
        assert set(policy) < set(seen[r])
        assert all(seen[r][name].cpu().equal(tensor) for name, tensor in policy.items()), r
        first = json.loads((out / f"round-{r:02d}" / "metrics.jsonl").read_text().splitlines()[0])
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-4), (r, first)
    later = load_file(str(out / "round-02" / "policy.safetensors"))
    assert not all(seen[2][name].cpu().equal(tensor) for name, tensor in later.items())  # the policy moved in round 2


@pytest.mark.slow
def test_reference_previous_resumes_bit_exact(tiny_pixel_path, tmp_path):
    """Killed between rounds, and inside round 2's training (round 1 finished by an earlier call): the resumed
    run rebuilds round 2's reference from round 1's policy and ends bit-exact with an uninterrupted run."""
    from tests.torture import run

    def make(out, rounds=2):
        return {**_bright_config(tiny_pixel_path, out, max_steps=3, save_steps=2, seed=0, plot=False),
                "reference": "previous", "rounds": rounds}

    assert run("image_online", make(tmp_path / "reference")).returncode == 0
    expected = _outcome(tmp_path / "reference")
    between = make(tmp_path / "between")
    assert run("image_online", between, fault="round_done:1").returncode == -9
    inside = make(tmp_path / "inside", rounds=1)
    assert run("image_online", inside).returncode == 0
    inside = make(tmp_path / "inside")
    killed = run("image_online", inside, fault="checkpoint_files:2", resume=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "inside" / "round-02").is_dir()
    for config in (between, inside):
        resumed = run("image_online", config, resume=True)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        rounds, metrics, weights = _outcome(Path(config["output_dir"]))
        assert rounds == expected[0] and metrics == expected[1], config["output_dir"]
        assert weights.keys() == expected[2].keys() and all(weights[k].equal(v) for k, v in expected[2].items())
