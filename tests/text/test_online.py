"""Online training on the tiny model: every algorithm raises a rule reward, exact resume, the shared-prompt sampler,
LoRA with the adapter-disabled reference, the CLI, and bad input stopping at or before the first step."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmalign
import mmalign.text
from mmalign.config import ConfigError
from mmalign.rewards import RegexReward, RewardError
from mmalign.testing import write_jsonl

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["Say hello.", "How do I bake bread?", "Pick a random number.", "Can you help me?"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("online") / "prompts.jsonl"
    write_jsonl(path, [{"prompt": p} for p in PROMPTS])
    return path


def _config(model_dir, prompt_file, out, **sections):
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "prompts": {"train": str(prompt_file)},
        "reward": [{"kind": "regex", "pattern": "e", "count": True}],
        "algorithm": {"name": "rloo", "beta": 0.01, "threshold": 2.0},
        "sampling": {"k": 8, "max_new_tokens": 6, "eval_k": 16},
        "training": {"batch_size": 4, "max_steps": 8, "learning_rate": 3e-2, "lr_scheduler": "constant",
                     "logging_steps": 1, "progress_bar": False, "plot": False, "num_threads": 1},
        "output_dir": str(out),
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _initial_eval_reward(model_dir, prompt_file, cfg):
    from mmalign.config import load_config
    from mmalign.rewards import build_reward
    from mmalign.text.modeling.loading import load_causal_lm, load_tokenizer
    from mmalign.text.online import _evaluator, load_prompts
    from mmalign.text.online_config import OnlineConfig

    cfg = load_config(OnlineConfig, cfg)
    tokenizer = load_tokenizer(str(model_dir))
    items = load_prompts(str(prompt_file), tokenizer, cfg, max_samples=None, context=None)
    return _evaluator(cfg, tokenizer, items, build_reward(cfg.reward), None)(load_causal_lm(str(model_dir)))["reward"]


@pytest.mark.parametrize("algorithm", [
    {"name": "rloo"}, {"name": "grpo", "divergence": "js", "divergence_in": "reward"},
    {"name": "group"}, {"name": "best_of_n"}, {"name": "rejection_sampling"},
])
def test_each_algorithm_raises_a_rule_reward(tiny_model_dir, prompt_file, tmp_path, algorithm):
    # the group objective learns from best-vs-worst groups only: after 8 steps its gain varies by seed from -0.1 to
    # +3.4 (both sample streams, seeds 42-45); after 12 steps +2.2 to +2.5 (seeds 42-44)
    steps = 12 if algorithm["name"] == "group" else 8
    cfg = _config(tiny_model_dir, prompt_file, tmp_path / "run", algorithm=algorithm,
                  prompts={"eval": str(prompt_file)}, training={"max_steps": steps})
    before = _initial_eval_reward(tiny_model_dir, prompt_file, cfg)
    result = mmalign.text.online(cfg)
    after = result.metrics["eval_reward"]
    rows = [r for r in _rows(tmp_path / "run") if "reward/mean" in r]
    assert after > before + 0.5, (before, after)
    # one result type with mmalign.text.train: the TrainResult, its log = metrics.jsonl, the trained model in it
    assert isinstance(result, mmalign.TrainResult) and result.global_step == steps
    assert result.log == _rows(tmp_path / "run") and result["algorithm"] == algorithm["name"]
    assert result.final_dir == tmp_path / "run" / "final" and result.tokenizer is not None
    assert isinstance(result.model, torch.nn.Module)
    assert sum(r["reward/mean"] for r in rows[-3:]) > sum(r["reward/mean"] for r in rows[:3])
    assert {"reward/std", "response/length", "entropy"} <= set(rows[0])
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_exact_resume_mid_rollout(tiny_model_dir, prompt_file, tmp_path):
    """Two updates per rollout (PPO inner epochs): stopping after step 3 (inside the second rollout) and resuming
    gives the same step 4 as an uninterrupted run: same samples (sampler seed), same old log-probs, same weights."""
    common = dict(algorithm={"name": "grpo", "updates_per_rollout": 2, "divergence": "forward_kl"},
                  sampling={"k": 4, "max_new_tokens": 5})
    exact = {"deterministic": torch.cuda.is_available()}  # CUDA repeats exactly only with deterministic kernels
    full = _config(tiny_model_dir, prompt_file, tmp_path / "full", **common,
                   training={"batch_size": 2, "max_steps": 4, **exact})
    mmalign.text.online(full)
    part = _config(tiny_model_dir, prompt_file, tmp_path / "part", **common,
                   training={"batch_size": 2, "max_steps": 3, "save_steps": 1, "save_total_limit": None, **exact})
    mmalign.text.online(part)
    resumed = {**part, "training": {**part["training"], "max_steps": 4}}
    mmalign.text.online(resumed, resume_from_checkpoint=str(tmp_path / "part" / "checkpoints" / "checkpoint-3"))
    a, b = _rows(tmp_path / "full"), _rows(tmp_path / "part")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("loss", "kl", "divergence", "grad_norm"):
        assert b[3][key] == pytest.approx(a[3][key], rel=1e-5, abs=1e-7), key
    for key in ("reward/mean", "response/length"):  # the rollout of steps 3-4 is logged at step 3
        assert b[2][key] == pytest.approx(a[2][key]), key
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "full" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "part" / "final" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_shared_prompt_sampler_matches_per_sequence_scoring(tiny_model_dir):
    """The sampler pre-fills each prompt once and copies its cache to its k rows; the log-probability it records
    for each sample equals the policy's log-likelihood of that sample scored alone (padded layout, one sequence per
    sample) and in the shared-prompt training layout."""
    from mmalign.text.data import PreferenceCollator
    from mmalign.text.modeling.logprobs import batch_logprobs
    from mmalign.text.modeling.loading import load_causal_lm, load_tokenizer
    from mmalign.text.modeling.sampling import sample_completions

    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_causal_lm(str(tiny_model_dir)).eval()
    samples = sample_completions(model, tokenizer, PROMPTS[:3], n=4, max_new_tokens=6, seed=5, batch_size=5)
    items = [{"prompt_ids": tokenizer(p)["input_ids"], "chosen_ids": ids, "rejected_ids": []}
             for p, ids in zip(PROMPTS[:3], samples.token_ids)]
    recorded = torch.tensor([lp for row in samples.logprob for lp in row])
    with torch.no_grad():
        shared, _ = batch_logprobs(model, PreferenceCollator(tokenizer.pad_token_id, share_prompt=True)(items))
        alone = torch.cat([batch_logprobs(model, PreferenceCollator(tokenizer.pad_token_id)(
            [{**item, "chosen_ids": [ids]}]))[0] for item in items for ids in item["chosen_ids"]])
    assert torch.allclose(recorded, alone, atol=1e-4)
    assert torch.allclose(shared, alone, atol=1e-4)
    for texts, ids in zip(samples.texts, samples.token_ids):
        assert texts == [tokenizer.decode(i, skip_special_tokens=True) for i in ids]
    # greedy decoding: the k rows expanded from one pre-filled cache equal each prompt generated on its own
    together = sample_completions(model, tokenizer, PROMPTS, n=3, max_new_tokens=6, temperature=0, batch_size=12)
    for prompt, rows in zip(PROMPTS, together.token_ids):
        alone = sample_completions(model, tokenizer, [prompt], n=1, max_new_tokens=6, temperature=0).token_ids[0][0]
        assert rows == [alone] * 3


def test_lora_uses_the_adapter_disabled_reference(tiny_model_dir, prompt_file, tmp_path):
    cfg = _config(tiny_model_dir, prompt_file, tmp_path / "lora", lora={"enabled": True, "r": 4, "dropout": 0.0},
                  algorithm={"name": "group", "objective": {"name": "mipo", "beta": 0.1}},
                  heldout_reward=[{"kind": "length"}], training={"max_steps": 3, "plot": True})
    summary = mmalign.text.online(cfg)
    rows = _rows(tmp_path / "lora")
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] > 0  # base = reference at step 1
    assert "heldout_reward/mean" in rows[0] and "objective/rewards/margins" in rows[0]
    assert (tmp_path / "lora" / "final" / "adapter_config.json").exists()
    assert summary["reward_hacking_plot"] and Path(summary["reward_hacking_plot"]).exists()


def test_cli_runs_one_step(tiny_model_dir, prompt_file, tmp_path):
    import yaml

    config = tmp_path / "online.yaml"
    config.write_text(yaml.safe_dump(_config(tiny_model_dir, prompt_file, tmp_path / "cli")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "mmalign.text.online", "--config", str(config), "--set",
                           "training.max_steps=1", "--set", "algorithm.name=best_of_n"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "done: 1 steps" in done.stdout
    assert _rows(tmp_path / "cli")[0]["step"] == 1


# ------------------------------------------------------------------------------------------------ bad input
class _Flaky:
    """A reward that is fine on its first call and then returns ``then``."""
    name = "flaky"

    def __init__(self, then):
        self.calls, self.then = 0, then

    def __call__(self, prompts, outputs):
        self.calls += 1
        if self.calls == 1:
            return [1.0] * len(outputs)
        return self.then(outputs)


@pytest.mark.parametrize("then, error, message", [
    (lambda o: [float("nan")] * len(o), RewardError, "non-finite"),
    (lambda o: [1.0] * (len(o) - 1), RewardError, "one number per"),
    (lambda o: {}["key"], RewardError, "raised KeyError"),
    (lambda o: [3e38] * len(o), FloatingPointError, "non-finite loss"),
])
def test_bad_reward_stops_without_a_checkpoint_of_the_bad_step(tiny_model_dir, prompt_file, tmp_path, then, error, message):
    cfg = _config(tiny_model_dir, prompt_file, tmp_path / "bad", algorithm={"name": "grpo"},
                  training={"batch_size": 2, "max_steps": 3, "save_steps": 1, "save_total_limit": None})
    with pytest.raises(error, match=message):
        mmalign.text.online(cfg, reward=_Flaky(then))
    checkpoints = sorted(p.name for p in (tmp_path / "bad" / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-1"]
    assert not (tmp_path / "bad" / "final").exists()


@pytest.mark.parametrize("sections, message", [
    ({"sampling": {"k": 1}}, "needs k >= 2"),
    ({"algorithm": {"name": "group"}, "sampling": {"k": 1}}, "needs k >= 2"),
    ({"algorithm": {"divergence": "tv"}}, "not admissible"),
    ({"algorithm": {"divergence": "alpha"}}, r"alpha in \(0, 1\)"),
    ({"reference": {"mode": "precomputed"}}, "impossible online"),
    ({"algorithm": {"name": "rejection_sampling", "threshold": None}}, "needs a reward threshold"),
    ({"reward": [{"kind": "regex"}]}, "needs pattern"),
])
def test_bad_config_is_refused_before_loading(tmp_path, sections, message):
    cfg = _config(tmp_path / "no-model", tmp_path / "no-prompts", tmp_path / "out", **sections)
    with pytest.raises(ConfigError, match=message):
        mmalign.text.online(cfg)
    assert not (tmp_path / "out").exists()


def test_prompt_longer_than_the_context_is_refused(tiny_model_dir, tmp_path):
    long_prompts = tmp_path / "long.jsonl"
    write_jsonl(long_prompts, [{"prompt": "Say hello."}, {"prompt": "hello " * 600}])
    cfg = _config(tiny_model_dir, long_prompts, tmp_path / "out")
    with pytest.raises(ValueError, match=r"row 2: prompt of \d+ tokens .* exceeds the model's context of 512"):
        mmalign.text.online(cfg)
    assert not (tmp_path / "out").exists()


def test_pairwise_objective_needs_single_member_groups(tiny_model_dir, prompt_file, tmp_path):
    cfg = _config(tiny_model_dir, prompt_file, tmp_path / "out",
                  algorithm={"name": "group", "objective": {"name": "dpo", "beta": 0.1}})
    with pytest.raises(ValueError, match="pairwise: set group_size: 1"):
        mmalign.text.online(cfg)
    cfg["algorithm"]["group_size"] = 1
    cfg["training"]["max_steps"] = 1
    assert mmalign.text.online(cfg)["global_step"] == 1


def test_member_pairs_take_top_bottom_groups_but_not_ragged_threshold_ones(tiny_model_dir, prompt_file, tmp_path):
    cfg = _config(tiny_model_dir, prompt_file, tmp_path / "out",
                  algorithm={"name": "group", "selection": "threshold", "threshold": 0.5,
                             "objective": {"name": "dpo", "beta": 0.1, "pairs": "members"}})
    with pytest.raises(ValueError, match="pairwise on member pairs; threshold groups are ragged"):
        mmalign.text.online(cfg)
    assert not (tmp_path / "out").exists()
    cfg["algorithm"]["selection"] = "top_bottom"
    cfg["training"]["max_steps"] = 1
    assert mmalign.text.online(cfg)["global_step"] == 1


def test_missing_reward_is_refused(tiny_model_dir, prompt_file, tmp_path):
    cfg = _config(tiny_model_dir, prompt_file, tmp_path / "out", reward=[])
    with pytest.raises(ValueError, match="reward: missing"):
        mmalign.text.online(cfg)
    assert RegexReward("x").name == "regex:x"


def test_hh_prompts_and_skipping_long_ones(tiny_model_dir, tmp_path):
    from mmalign.config import load_config
    from mmalign.text.modeling.loading import load_tokenizer
    from mmalign.text.online import load_prompts
    from mmalign.text.online_config import OnlineConfig

    rows = tmp_path / "hh.jsonl"
    write_jsonl(rows, [{"chosen": "\n\nHuman: Say hello.\n\nAssistant: hello", "rejected": "x"},
                       {"chosen": "\n\nHuman: " + "hello " * 600 + "\n\nAssistant: no", "rejected": "x"}])
    cfg = load_config(OnlineConfig, _config(tiny_model_dir, rows, tmp_path / "out",
                                            prompts={"hh": True, "too_long": "skip"}))
    items = load_prompts(str(rows), load_tokenizer(str(tiny_model_dir)), cfg, max_samples=None, context=512)
    assert [i["prompt"] for i in items] == ["\n\nHuman: Say hello.\n\nAssistant:"]


def test_shipped_online_config_validates():
    from mmalign.config import load_config
    from mmalign.resources import shipped_config
    from mmalign.text.online_config import OnlineConfig

    cfg = load_config(OnlineConfig, shipped_config("text/online-rloo-tiny.yaml"))
    assert cfg.algorithm.name == "rloo" and cfg.prompts.hh and cfg.heldout_reward[0].kind == "length"


def test_the_layout_is_decided_on_the_trainers_device(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    import mmalign.text.online as online
    from mmalign.text.rollout import OnlineLoss

    asked, used = [], []
    real_layout = OnlineLoss.use_shared_prompt
    monkeypatch.setattr(online, "shared_prompt_slower_on", lambda device: asked.append(device) or "slower here")
    monkeypatch.setattr(OnlineLoss, "use_shared_prompt", lambda self, share: used.append(share) or real_layout(self, share))
    mmalign.text.online(_config(tiny_model_dir, prompt_file, tmp_path / "auto", training={"max_steps": 1}))
    assert [d.type for d in asked] == ["cpu"] and used == [False]  # the trainer's device; auto then pads
    mmalign.text.online(_config(tiny_model_dir, prompt_file, tmp_path / "on", training={"max_steps": 1, "share_prompt": "on"}))
    assert used == [False, True]  # "on" is kept whatever the device
