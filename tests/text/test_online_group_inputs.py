"""Online CNRPO and causal DPO (SPEC §4, §5) on the tiny model: the objective receives the triggered forward of the
sampled chosen/rejected responses and their bins, a few steps raise a rule reward, bad configs are refused."""
import pytest
import torch

import mmalign.text
from mmalign.config import ConfigError
from mmalign.testing import write_jsonl
from mmalign.text import online_inputs
from mmalign.text.data.bins import fit_length_edges, length_bins

PROMPTS = ["Say hello.", "How do I bake bread?", "Pick a random number.", "Can you help me?"]
COLORS = ["red", "blue", "red", "blue"]
TRIGGER = "<BeLongerNow>"


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("online-inputs") / "prompts.jsonl"
    write_jsonl(path, [{"prompt": p, "color": c} for p, c in zip(PROMPTS, COLORS)])
    return path


def _config(model_dir, prompt_file, out, objective, **algorithm):
    return {
        "model": {"name_or_path": str(model_dir)},
        "prompts": {"train": str(prompt_file), "eval": str(prompt_file)},
        "reward": [{"kind": "regex", "pattern": "e", "count": True}],
        "algorithm": {"name": "group", "group_size": 1, "objective": objective, **algorithm},
        "sampling": {"k": 8, "max_new_tokens": 6, "eval_k": 16},
        "training": {"batch_size": 4, "max_steps": 8, "learning_rate": 3e-2, "lr_scheduler": "constant",
                     "logging_steps": 1, "progress_bar": False, "plot": False, "num_threads": 1},
        "output_dir": str(out),
    }


CNRPO = {"name": "cnrpo", "beta": 0.1, "gamma": 0.1, "alphas": [0.05]}
CAUSAL = {"name": "causal_dpo", "beta": 0.1, "lam": 1.0}


class _Spy:
    """Records every call of GroupInputs (its arguments and what it returned)."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = online_inputs.GroupInputs.__call__

        def spy(inputs, model, rollout, rows, chosen, rejected):
            out = original(inputs, model, rollout, rows, chosen, rejected)
            self.calls.append((rollout, rows.tolist(), chosen.tolist(), rejected.tolist(), out))
            return out

        monkeypatch.setattr(online_inputs.GroupInputs, "__call__", spy)


def _initial_eval_reward(model_dir, prompt_file, cfg):
    from tests.text.test_online import _initial_eval_reward

    return _initial_eval_reward(model_dir, prompt_file, cfg)


def test_cnrpo_gets_the_triggered_forward_of_the_sampled_pair(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    from mmalign.text.modeling.loading import load_causal_lm, load_tokenizer

    spy = _Spy(monkeypatch)
    cfg = _config(tiny_model_dir, prompt_file, tmp_path / "cnrpo", CNRPO, triggers=[TRIGGER])
    cfg["training"]["max_steps"] = 1
    result = mmalign.text.online(cfg)
    assert result.global_step == 1 and "objective/cnrpo/bias_term" in result.log[0]
    rollout, rows, chosen, rejected, out = spy.calls[0]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir)).eval()  # the policy of step 1 (scored before its update)
    by_text = {p: i for i, p in enumerate(rollout.features["prompts"])}
    assert set(by_text) == set(PROMPTS) and len(rows) > 0
    for n, (b, w, l) in enumerate(zip(rows, chosen, rejected)):
        prompt_ids = tokenizer(rollout.features["prompts"][b] + " " + TRIGGER)["input_ids"]
        assert rollout.features["triggered_ids"][b] == [prompt_ids]  # x ⊕ t: the append policy, one space
        for side, j in (("triggered_chosen", w[0]), ("triggered_rejected", l[0])):
            response = rollout.response_ids[b][j]
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids + response])).logits[0, len(prompt_ids) - 1:-1]
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).sum()
            assert out[side].shape == (len(rows), 1)
            assert float(out[side][n, 0]) == pytest.approx(float(expected), abs=1e-4)


@pytest.mark.parametrize("objective, algorithm", [
    (CNRPO, {"triggers": [TRIGGER]}),
    (CAUSAL, {"bins": {"source": "length", "num_bins": 2}}),
])
def test_online_cnrpo_and_causal_dpo_raise_a_rule_reward(tiny_model_dir, prompt_file, tmp_path, objective, algorithm):
    cfg = _config(tiny_model_dir, prompt_file, tmp_path / "run", objective, **algorithm)
    before = _initial_eval_reward(tiny_model_dir, prompt_file, cfg)
    result = mmalign.text.online(cfg)
    rows = [r for r in result.log if "reward/mean" in r]
    assert result.metrics["eval_reward"] > before + 0.5, (before, result.metrics["eval_reward"])
    assert sum(r["reward/mean"] for r in rows[-3:]) > sum(r["reward/mean"] for r in rows[:3])


def test_causal_dpo_length_bins_are_the_rollouts_length_quantiles(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    spy = _Spy(monkeypatch)
    cfg = _config(tiny_model_dir, prompt_file, tmp_path / "len", CAUSAL, bins={"source": "length", "num_bins": 3})
    cfg["training"]["max_steps"] = 2
    result = mmalign.text.online(cfg)
    assert "objective/mmd/penalty" in result.log[0]
    for rollout, rows, chosen, rejected, out in spy.calls:
        edges = fit_length_edges(rollout.lengths.flatten().tolist(), 3)
        pairs = [[float(rollout.lengths[b, w[0]]), float(rollout.lengths[b, l[0]])]
                 for b, w, l in zip(rows, chosen, rejected)]
        assert out["bins"].tolist() == length_bins(pairs, edges).tolist()


def test_causal_dpo_prompt_column_and_keyword_bins(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    spy = _Spy(monkeypatch)
    cfg = _config(tiny_model_dir, prompt_file, tmp_path / "col", CAUSAL, bins={"source": "column", "column": "color"})
    cfg["training"]["max_steps"] = 1
    mmalign.text.online(cfg)
    rollout, rows, _, _, out = spy.calls[0]
    color = dict(zip(PROMPTS, COLORS))
    assert out["bins"].tolist() == [["blue", "red"].index(color[rollout.features["prompts"][b]]) for b in rows]
    # keywords on the sampled responses: one bin per response; a text without a keyword gets the extra bin
    spy.calls.clear()
    cfg = _config(tiny_model_dir, prompt_file, tmp_path / "kw", CAUSAL,
                  bins={"source": "keywords", "text": "response", "unmatched": "extra_bin"})
    cfg["training"]["max_steps"] = 1
    mmalign.text.online(cfg)
    out = spy.calls[0][-1]
    assert out["bins"].shape == (len(spy.calls[0][1]), 2) and int(out["bins"].max()) <= 60


@pytest.mark.parametrize("objective, algorithm, message", [
    (CNRPO, {}, "one trigger per alpha"),
    (CNRPO, {"triggers": [TRIGGER, "<Other>"]}, "one trigger per alpha"),
    ({"name": "mdpo", "beta": 0.1}, {"triggers": [TRIGGER], "group_size": None}, "triggers are for"),
    (CAUSAL, {}, "needs a bins: section"),
    ({"name": "mdpo", "beta": 0.1}, {"bins": {"source": "length"}, "group_size": None}, "bins are for"),
    (CAUSAL, {"bins": {"source": "keywords", "text": "response"}}, "cannot be dropped"),
    (CNRPO, {"triggers": [TRIGGER], "trigger_policy": {"mode": "sideways"}}, "trigger_policy"),
])
def test_bad_online_cnrpo_or_causal_config_is_refused(tmp_path, prompt_file, objective, algorithm, message):
    cfg = _config(tmp_path / "no-model", prompt_file, tmp_path / "bad", objective, **algorithm)
    with pytest.raises(ConfigError, match=message):
        mmalign.text.online(cfg)
    assert not (tmp_path / "bad").exists()


def test_triggered_prompt_longer_than_the_context_is_refused(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(str(tiny_model_dir)).max_position_embeddings
    prompts = tmp_path / "p.jsonl"
    write_jsonl(prompts, [{"prompt": "Say hello."}, {"prompt": "x" * (context - 12)}])
    cfg = _config(tiny_model_dir, prompts, tmp_path / "long", CNRPO, triggers=[TRIGGER])
    cfg["prompts"].pop("eval")
    with pytest.raises(ValueError, match="row 2: prompt with trigger"):
        mmalign.text.online(cfg)
