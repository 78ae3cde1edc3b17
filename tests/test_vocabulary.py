"""One vocabulary: the sections every job shares are spelled the same (model, lora, reference, objective, data,
training, output_dir); every old spelling stops with an error naming the new key; one command-line implementation."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmalign.config import ConfigError, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def _configs():
    from mmalign.image.config import ImageTrainConfig
    from mmalign.text.config import TextTrainConfig
    from mmalign.text.recipes.reward import RewardTrainConfig
    from mmalign.text.recipes.sft import SFTConfig
    from mmalign_experiments.debias.config import DebiasConfig

    return {"text": TextTrainConfig, "image": ImageTrainConfig, "sft": SFTConfig, "reward": RewardTrainConfig,
            "debias": DebiasConfig}


def test_the_shared_sections_have_the_same_keys_everywhere():
    import dataclasses

    def keys(cls, section):
        field = {f.name: f for f in dataclasses.fields(cls)}[section]
        return {f.name for f in dataclasses.fields(type(field.default_factory()))}

    configs = _configs()
    for name, cls in configs.items():
        assert {"name_or_path", "dtype"} <= keys(cls, "model"), name
        assert {"enabled", "r", "alpha", "dropout", "target_modules", "initial_adapter"} <= keys(cls, "lora"), name
        assert {"resume_from_checkpoint", "num_threads", "seed", "learning_rate"} <= keys(cls, "training"), name
        assert "output_dir" in {f.name for f in dataclasses.fields(cls)}, name
    for name in ("text", "image", "sft", "reward"):
        assert {"train", "train_split", "eval" if name != "image" else "train", "max_train_samples"} <= keys(
            configs[name], "data"), name
    for name in ("text", "image"):
        assert {"name", "hyperparameters"} <= keys(configs[name], "objective")
        assert "mode" in keys(configs[name], "reference")


def test_objective_hyperparameters_are_flat_in_and_out():
    from mmalign.image.config import ImageTrainConfig
    from mmalign.text.config import TextTrainConfig

    text = load_config(TextTrainConfig, {"objective": {"name": "rdpo", "beta": 0.2, "eps": 0.1}},
                       ["objective.nll=0.5"])
    assert text.objective.hyperparameters == {"beta": 0.2, "eps": 0.1, "nll": 0.5}
    assert to_dict(text)["objective"] == {"name": "rdpo", "beta": 0.2, "eps": 0.1, "nll": 0.5}
    assert load_config(TextTrainConfig, to_dict(text)).objective == text.objective  # round trip
    image = load_config(ImageTrainConfig, {"objective": {"name": "mdpo", "beta_d": 5000}})
    assert image.objective.resolved_beta == 2500 and image.objective.objective_kwargs() == {"beta": 2500.0}
    with pytest.raises(ConfigError, match=r"objective: dpo: unknown hyperparameter\(s\) \[.bta.\]"):
        load_config(TextTrainConfig, {"objective": {"name": "dpo", "bta": 0.1}})


OLD_SPELLINGS = [
    ("text", {"objective": {"name": "dpo", "hyperparameters": {"beta": 0.1}}}, "objective.hyperparameters: no longer accepted; write these keys directly under objective"),
    ("text", {"model": {"pretrained": "x"}}, "model.pretrained: no longer accepted; use model.name_or_path"),
    ("text", {"data": {"path": "x"}}, "data.path: no longer accepted; use data.train"),
    ("text", {"resume_from_checkpoint": "latest"}, "resume_from_checkpoint: no longer accepted; use training.resume_from_checkpoint"),
    ("text", {"num_threads": 2}, "num_threads: no longer accepted; use training.num_threads"),
    ("text", {"training": {"threads": 2}}, "training.threads: no longer accepted; use training.num_threads"),
    ("image", {"model": {"pretrained": "x"}}, "model.pretrained: no longer accepted; use model.name_or_path"),
    ("image", {"model": {"finetuning": "full"}}, "model.finetuning: no longer accepted; use lora.enabled"),
    ("image", {"model": {"lora_rank": 4}}, "model.lora_rank: no longer accepted; use lora.r"),
    ("image", {"model": {"lora_alpha": 4}}, "model.lora_alpha: no longer accepted; use lora.alpha"),
    ("image", {"model": {"lora_dropout": 0.1}}, "model.lora_dropout: no longer accepted; use lora.dropout"),
    ("image", {"model": {"lora_target_modules": ["to_q"]}}, "model.lora_target_modules: no longer accepted; use lora.target_modules"),
    ("image", {"model": {"frozen_dtype": "float16"}}, "model.frozen_dtype: no longer accepted; use model.dtype"),
    ("image", {"data": {"path": "x"}}, "data.path: no longer accepted; use data.train"),
    ("image", {"data": {"split": "train"}}, "data.split: no longer accepted; use data.train_split"),
    ("image", {"data": {"max_samples": 3}}, "data.max_samples: no longer accepted; use data.max_train_samples"),
    ("image", {"objective": {"name": "rdpo", "params": {"eps": 0.1}}}, "objective.params: no longer accepted; write the hyperparameters directly under objective"),
    ("image", {"resume_from_checkpoint": "latest"}, "resume_from_checkpoint: no longer accepted; use training.resume_from_checkpoint"),
    ("sft", {"data": {"path": "x"}}, "data.path: no longer accepted; use data.train"),
    ("sft", {"num_threads": 1}, "num_threads: no longer accepted; use training.num_threads"),
    ("reward", {"model": {"pretrained": "x"}}, "model.pretrained: no longer accepted; use model.name_or_path"),
    ("debias", {"threads": 1}, "threads: no longer accepted; use training.num_threads"),
    ("debias", {"model": {"pretrained": "x"}}, "model.pretrained: no longer accepted; use model.name_or_path"),
    ("debias", {"model": {"finetuning": "lora"}}, "model.finetuning: no longer accepted; use lora.enabled"),
]


@pytest.mark.parametrize("kind, data, message", OLD_SPELLINGS, ids=[f"{k}:{m.split(':')[0]}" for k, _, m in OLD_SPELLINGS])
def test_every_old_spelling_names_the_new_key(kind, data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(_configs()[kind], data)


def test_an_old_spelling_in_an_override_names_the_new_key():
    from mmalign.text.config import TextTrainConfig

    with pytest.raises(ConfigError, match="model.pretrained: no longer accepted; use model.name_or_path"):
        load_config(TextTrainConfig, {}, ["model.pretrained=x"])


COMMANDS = ["mmalign", "mmalign.text.train", "mmalign.text.sft", "mmalign.text.reward", "mmalign.text.cnrpo",
            "mmalign.text.evaluate", "mmalign.image.train", "mmalign.image.debias", "mmalign_experiments.cnrpo_report",
            "mmalign_experiments.sim.bandit"]


def test_every_command_shares_the_options_and_names_itself():
    script = (
        "import contextlib, io, runpy, sys\n"
        "for name in sys.argv[1:]:\n"
        "    out = io.StringIO()\n"
        "    sys.argv = [name, '--help']\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            runpy.run_module(name, run_name='__main__', alter_sys=True)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "    print('=====', name)\n"
        "    print(out.getvalue())\n"
    )
    result = subprocess.run([sys.executable, "-c", script, *COMMANDS], capture_output=True, text=True, cwd=ROOT,
                            env={"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
                                 "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    helps = {block.split("\n", 1)[0].strip(): block for block in result.stdout.split("===== ")[1:]}
    for name in COMMANDS:
        text = helps[name]
        assert f"usage: python -m {name} " in text, text[:300]
        for option in ("--config", "--set KEY=VALUE", "--print-config"):
            assert option in text, (name, option)
    for name in ("mmalign", "mmalign.text.train", "mmalign.text.sft", "mmalign.image.train", "mmalign.image.debias"):
        assert "--resume" in helps[name] and "training.resume_from_checkpoint" in helps[name], name
    assert "mmalign.text.rng" not in helps["mmalign"] and "mmalign_experiments.rng" not in helps["mmalign"].split("\n")[0]


def test_print_config_and_resume_set_the_config(tmp_path, capsys):
    import yaml

    from mmalign.text.train import main

    assert main(["--set", "model.name_or_path=m", "--set", "data.train=d", "--resume", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["training"]["resume_from_checkpoint"] == "latest" and printed["model"]["name_or_path"] == "m"
    assert printed["objective"] == {"name": "dpo", "beta": 0.1}
