"""Reward models with the binned MMD penalty (SPEC §5): loss, data checks, and that the penalty works."""
import json
import math

import pytest
import torch

from mmalign.config import from_dict
from mmalign_experiments.bias_data import sycophancy_pairs, write_jsonl
from mmalign.text.data.reward_rows import load_reward_rows
from mmalign.text.evaluation.reward_probes import RewardScorer
from mmalign.text.recipes.reward import CRMConfig, RewardTrainConfig, crm_loss, train_reward_model


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return str(tiny_model_dir)


def test_crm_loss_is_bradley_terry_plus_lambda_times_the_binned_mmd():
    from mmalign.shared.mmd import binned_mmd_penalty

    torch.manual_seed(0)
    rewards, hidden = torch.randn(8), torch.randn(8, 5)
    bins = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])
    bt = -torch.nn.functional.logsigmoid(rewards[:4] - rewards[4:]).mean()
    vanilla, _ = crm_loss(rewards, hidden, bins, CRMConfig(lam=0.0))
    assert torch.allclose(vanilla, bt)
    loss, metrics = crm_loss(rewards, hidden, bins, CRMConfig(lam=3.0, representation="hidden"))
    assert torch.allclose(loss, bt + 3.0 * binned_mmd_penalty(hidden, bins)[0])
    conditional, _ = crm_loss(rewards, hidden, bins, CRMConfig(lam=3.0, conditional=True, representation="reward"))
    groups = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    assert torch.allclose(conditional, bt + 3.0 * binned_mmd_penalty(rewards.unsqueeze(-1), bins, groups=groups)[0])
    assert metrics["mmd/bins_used"] == 2


def test_reward_rows_are_validated(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b", "score": 1.0}\n'
                    '{"prompt": "q", "chosen": "a", "rejected": "b", "score": NaN}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl: row 2: field 'score': NaN"):
        load_reward_rows(str(path))
    path.write_text('{"prompt": "q", "chosen": "", "rejected": "b"}\n')
    with pytest.raises(ValueError, match=r"row 1: field 'chosen': the response is empty"):
        load_reward_rows(str(path))
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}) + "\n")
    assert load_reward_rows(str(hh))[0]["prompt"] == "\n\nHuman: hi\n\nAssistant:"
    with pytest.raises(ValueError, match="needs a bins"):
        from_dict(RewardTrainConfig, {"model": {"name_or_path": "x"}, "data": {"train": "x"}, "crm": {"lam": 1.0}})


def _config(model, train, evalf, out, **crm):
    return from_dict(RewardTrainConfig, {
        "model": {"name_or_path": model}, "data": {"train": train, "eval": evalf},
        "bins": {"source": "column", "column": "prefix"}, "crm": crm,
        "training": {"batch_size": 32, "learning_rate": 3e-3, "num_epochs": 4, "progress_bar": False,
                     "logging_steps": 100, "lr_scheduler": "constant", "seed": 0, "num_threads": 1},
        "output_dir": out,
    })


def test_crm_penalty_lowers_the_reward_mmd_between_bins_of_a_spurious_feature(tiny_model, tmp_path):
    # The prefix marks the chosen response 90% of the time: a spurious feature that predicts the label.
    train = write_jsonl(tmp_path / "t.jsonl", sycophancy_pairs(64, seed=0, p_prefix_chosen=0.9, p_prefix_rejected=0.1))
    held = write_jsonl(tmp_path / "e.jsonl", sycophancy_pairs(64, seed=1, p_prefix_chosen=0.9, p_prefix_rejected=0.1))
    vanilla = train_reward_model(_config(tiny_model, str(train), str(held), str(tmp_path / "v"), lam=0.0))
    crm = train_reward_model(_config(tiny_model, str(train), str(held), str(tmp_path / "c"), lam=10.0, representation="reward"))
    v, c = vanilla["eval"], crm["eval"]
    # The vanilla model learns the shortcut: prefixed responses get a clearly different reward.
    assert v["reward_mmd_between_bins"] > 0.1
    assert c["reward_mmd_between_bins"] < 0.25 * v["reward_mmd_between_bins"]
    for report in (v, c):
        assert set(report["per_bin_reward"]) == {"0", "1"} and math.isfinite(report["reward_length_correlation"])
    assert (tmp_path / "c" / "reward_per_bin.png").exists() and (tmp_path / "c" / "reward_report.json").exists()
    scorer = RewardScorer.from_pretrained(tmp_path / "c" / "final")
    assert scorer.score(["q"], ["a"]).shape == (1,)


def test_hidden_features_are_pooled_where_the_reward_is_read():
    """With pad == EOS the head scores the token before a trailing EOS; the MMD features must come from there too."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from mmalign.text.modeling.reward_model import reward_forward

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=2, eos_token_id=2)
    model = LlamaForSequenceClassification(config).eval()
    input_ids = torch.tensor([[5, 6, 7, 2, 2], [5, 6, 7, 8, 2]])  # EOS-terminated, right-padded with EOS
    attention_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        rewards, hidden = reward_forward(model, input_ids, attention_mask)
        torch.testing.assert_close(model.score(hidden).squeeze(-1), rewards)
