"""End-to-end preference runs on a tiny model: every objective, references, resume, bad inputs, CLI."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mmalign
import mmalign.text
from mmalign.config import ConfigError, load_config
from mmalign.engine import read_metrics
from mmalign.testing import tiny_preference_rows, write_jsonl
from mmalign.text.config import TextTrainConfig

ROOT = Path(__file__).resolve().parents[2]

OBJECTIVES = {
    "dpo": {"beta": 0.1},
    "ipo": {"beta": 0.1},
    "rdpo": {"beta": 0.1, "eps": 0.1},
    "cdpo": {"beta": 0.1, "eps": 0.1},
    "hinge": {"beta": 0.1},
    "fdpo": {"beta": 0.1, "divergence": "js"},
    "mdpo": {"beta": 0.1},
    "mipo": {"beta": 0.1},
}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {kind: str(write_jsonl(root / f"{kind}.jsonl", tiny_preference_rows(16, kind=kind, seed=7)))
            for kind in ("pairs", "groups", "conversational", "hh")}


def run_config(model_dir, train, out, **sections):
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": train},
        "training": {"batch_size": 4, "max_steps": 4, "logging_steps": 2, "learning_rate": 2e-3,
                     "lr_scheduler": "constant", "progress_bar": False, "plot": False, "num_threads": 1,
                     "max_prompt_length": 32,
                     "max_response_length": 24},
        "output_dir": str(out),
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_moves_the_margin(name, tiny_model_dir, data_files, tmp_path):
    kind = "groups" if name in ("mdpo", "mipo") else "pairs"
    cfg = run_config(tiny_model_dir, data_files[kind], tmp_path / name,
                     data={"eval": data_files[kind]},
                     objective={"name": name, **OBJECTIVES[name]})
    summary = mmalign.text.train(cfg)
    metrics = summary["metrics"]
    # Before any update the policy equals the reference (margin 0); after 4 steps it prefers the chosen answers.
    assert metrics["eval_rewards/margins"] > 0.005, metrics
    assert metrics["eval_rewards/accuracies"] >= 0.75, metrics
    rows = [r for r in read_metrics(summary["metrics_path"]) if "loss" in r]
    assert rows[0]["step"] == 2 and "rewards/margins" in rows[0] and "grad_norm" in rows[0]
    final = Path(summary["final_dir"])
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    assert load_config(TextTrainConfig, final / "config.yaml").objective.name == name


def test_lora_adapter_reference_with_chat_data(tiny_model_dir, data_files, tmp_path):
    cfg = run_config(tiny_model_dir, data_files["conversational"], tmp_path / "lora",
                     lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}, training={"learning_rate": 1e-2})
    summary = mmalign.text.train(cfg)
    assert summary["reference_mode"] == "adapter"
    assert summary["metrics"]["rewards/margins"] > 0
    assert (Path(summary["final_dir"]) / "adapter_model.safetensors").exists()
    # continuing from the saved adapter: the first step already sees a policy that differs from the base
    cfg = run_config(tiny_model_dir, data_files["conversational"], tmp_path / "continued",
                     lora={"enabled": True, "initial_adapter": summary["final_dir"]},
                     training={"max_steps": 1, "logging_steps": 1})
    continued = mmalign.text.train(cfg)
    assert continued["metrics"]["rewards/margins"] > 0
    fresh = mmalign.text.train({**cfg, "lora": {"enabled": True}, "output_dir": str(tmp_path / "fresh")})
    assert fresh["metrics"]["rewards/margins"] == 0.0  # a fresh adapter starts at the base model


def test_precomputed_reference_removes_the_reference_forward(tiny_model_dir, data_files, tmp_path, monkeypatch):
    from mmalign.text.modeling import references as text_models

    calls = {"reference": 0}
    original = text_models.FrozenModelReference.__call__

    def counting(self, policy, batch):
        calls["reference"] += 1
        return original(self, policy, batch)

    monkeypatch.setattr(text_models.FrozenModelReference, "__call__", counting)
    common = dict(objective={"name": "dpo", "beta": 0.1}, training={"max_steps": 3})
    live = mmalign.text.train(run_config(tiny_model_dir, data_files["hh"], tmp_path / "live",
                                         reference={"mode": "model"}, **common))
    assert calls["reference"] == 3
    calls["reference"] = 0
    pre = mmalign.text.train(run_config(tiny_model_dir, data_files["hh"], tmp_path / "pre",
                                        reference={"mode": "precomputed"}, **common))
    assert calls["reference"] == 0  # precomputation used the initial policy, the steps used the stored values
    assert pre["reference_mode"] == "precomputed"
    assert list((tmp_path / "pre" / "reference_cache").glob("ref-logps-*.pt"))
    live_rows = [r for r in read_metrics(live["metrics_path"]) if "loss" in r]
    pre_rows = [r for r in read_metrics(pre["metrics_path"]) if "loss" in r]
    for a, b in zip(live_rows, pre_rows):  # same reference values -> same training trajectory
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)


def test_text_resume_is_exact(tiny_model_dir, data_files, tmp_path):
    import shutil

    cfg = run_config(tiny_model_dir, data_files["groups"], tmp_path / "full",
                     objective={"name": "mdpo", "beta": 0.1},
                     lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1},
                     training={"max_steps": 4, "save_steps": 2, "logging_steps": 1, "save_total_limit": None})
    full = mmalign.text.train(cfg)
    a = [r for r in read_metrics(full["metrics_path"]) if "loss" in r]
    # as if the run had died after step 3: the last checkpoint is step 2, the log runs on past it
    shutil.rmtree(tmp_path / "full" / "checkpoints" / "checkpoint-4")
    resumed = mmalign.text.train(cfg, resume_from_checkpoint="latest")
    b = [r for r in read_metrics(resumed["metrics_path"]) if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)


def test_pairwise_objective_refuses_group_data(tiny_model_dir, data_files, tmp_path):
    with pytest.raises(ValueError, match="groups .* pairwise; use objective.name mdpo or mipo"):
        mmalign.text.train(run_config(tiny_model_dir, data_files["groups"], tmp_path / "x"))


def test_bad_data_stops_before_training(tiny_model_dir, tmp_path):
    rows = tiny_preference_rows(8, kind="pairs")
    rows[5]["prompt"] = 17
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad.jsonl: row 6: field 'prompt'"):
        mmalign.text.train(run_config(tiny_model_dir, str(path), tmp_path / "out"))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_config_errors_name_file_key_and_allowed(tmp_path, data_files):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name_or_path: x}\ndata: {train: y}\ntraining: {lr_schedulr: cosine}\n")
    with pytest.raises(ConfigError, match=r"run.yaml: training.lr_schedulr: unknown key; allowed keys under "
                                          r"training: batch_size, .*lr_scheduler"):
        load_config(TextTrainConfig, path)
    path.write_text("model: {name_or_path: x}\ndata: {train: y}\ntraining: {lr_scheduler: step}\n")
    with pytest.raises(ConfigError, match=r"run.yaml: training.lr_scheduler: invalid value 'step'; expected one of "
                                          r"'constant', 'linear', 'cosine'"):
        load_config(TextTrainConfig, path)
    path.write_text("model: {name_or_path: x}\ndata: {train: y}\nobjective: {name: dop}\n")
    with pytest.raises(ConfigError, match=r"objective.name: invalid value 'dop'; expected one of .*dpo"):
        load_config(TextTrainConfig, path)
    path.write_text("model: {name_or_path: x}\ndata: {train: y}\nobjective: {name: fdpo, beta: 0.1, divergence: tv}\n")
    with pytest.raises(ConfigError, match=r"run.yaml: objective: fdpo: divergence 'tv' is not admissible"):
        load_config(TextTrainConfig, path)
    path.write_text("data: {train: y}\n")
    with pytest.raises(ConfigError, match=r"model.name_or_path: required; set it in the config or pass model=..."):
        mmalign.text.train(path)
    cfg = load_config(TextTrainConfig, {"model": {"name_or_path": "x"}, "data": {"train": "y"}},
                      ["training.learning_rate=1e-5", "objective.beta=0.5", "lora.target_modules=[q_proj,v_proj]"])
    assert cfg.training.learning_rate == 1e-5 and cfg.objective.hyperparameters == {"beta": 0.5}
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"training.batch_size: invalid value 'four'; expected an integer"):
        load_config(TextTrainConfig, {"model": {"name_or_path": "x"}, "data": {"train": "y"}}, ["training.batch_size=four"])


def test_cli_help_and_run(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from mmalign.text.train import main

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for needle in ("--config", "--set KEY=VALUE", "--resume", "training.learning_rate (a number, default 5e-07)",
                   "reference.mode", "objective.<hyperparameter>", "data.format", "training.resume_from_checkpoint",
                   "usage: python -m mmalign.text.train", "--print-config"):
        assert needle in help_text, needle
    shared_hh = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if not shared_hh.exists():
        pytest.skip("shared HH-RLHF data not present")
    result = subprocess.run(
        [sys.executable, "-m", "mmalign.text.train", "--config", "configs/text/dpo-tiny.yaml",
         "--set", f"model.name_or_path={tiny_model_dir}", "--set", f"output_dir={tmp_path / 'cli'}",
         "--set", "training.max_steps=2", "--set", "data.max_train_samples=8", "--set", "training.progress_bar=false"],
        capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 2 steps" in result.stdout
    assert (tmp_path / "cli" / "final" / "config.yaml").exists()
    assert (tmp_path / "cli" / "metrics.png").exists()
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "configs/text/dpo-tiny.yaml", "--set", "training.max_stepz=3"])
    assert exit_info.value.code == 2 and "unknown key 'training.max_stepz'" in capsys.readouterr().err


def test_numeric_columns_reach_objective_extra_inputs(tiny_model_dir, tmp_path):
    rows = tiny_preference_rows(8, kind="pairs")
    for i, row in enumerate(rows):
        row["bins"] = [i % 2, (i + 1) % 2]
    path = write_jsonl(tmp_path / "bins.jsonl", rows)
    summary = mmalign.text.train(run_config(tiny_model_dir, str(path), tmp_path / "causal",
                                            objective={"name": "causal_dpo", "beta": 0.1},
                                            training={"batch_size": 8, "max_steps": 1, "logging_steps": 1}))
    assert summary["metrics"]["mmd/bins_used"] == 2.0
    del rows[0]["bins"]
    with pytest.raises(ValueError, match=r"needs input\(s\) \['bins'\]"):
        mmalign.text.train(run_config(tiny_model_dir, str(write_jsonl(tmp_path / "nobins.jsonl", rows[:1])),
                                      tmp_path / "x", objective={"name": "causal_dpo", "beta": 0.1}))
