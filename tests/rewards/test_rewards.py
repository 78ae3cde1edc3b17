"""Rewards: values of each kind, checks of what a reward returns, weighted sums, per-group normalisation."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.config import ConfigError, load_config
from mmalign.rewards import (CallableReward, LengthReward, RegexReward, RewardError, RewardSpec, WeightedSum,
                             build_reward, normalize_per_group, score)
from mmalign.rewards.image import ClassifierReward
from mmalign.rewards.models import check_encodable

REPO = Path(__file__).resolve().parents[2]


def test_rule_rewards():
    outputs = ["aaa b", "b", "a a"]
    assert score(RegexReward("a"), ["p"] * 3, outputs).tolist() == [1.0, 0.0, 1.0]
    assert score(RegexReward("a", count=True, match=2.0, miss=-1.0), ["p"] * 3, outputs).tolist() == [6.0, -1.0, 4.0]
    assert score(LengthReward(), ["p"] * 3, outputs).tolist() == [5.0, 1.0, 3.0]
    assert score(LengthReward(unit="words", target=2, scale=0.5), ["p"] * 3, outputs).tolist() == [0.0, -0.5, 0.0]
    with pytest.raises(ValueError, match="invalid pattern"):
        RegexReward("(")


def test_weighted_sum_and_parts():
    total = WeightedSum([RegexReward("a", name="has_a"), LengthReward(name="len")], [2.0, -0.5])
    assert score(total, ["p", "q"], ["ab", "bbbb"]).tolist() == [2.0 - 1.0, -2.0]
    parts = total.parts(["p", "q"], ["ab", "bbbb"])
    assert set(parts) == {"has_a", "len"} and parts["len"].tolist() == [2.0, 4.0]


def test_normalize_per_group():
    scores = torch.tensor([1.0, 3.0, 10.0, 10.0, 4.0])
    ids = [0, 0, 1, 1, 2]
    assert normalize_per_group(scores, ids, "center").tolist() == [-1.0, 1.0, 0.0, 0.0, 0.0]
    standard = normalize_per_group(scores, ids, "standardize")
    assert torch.allclose(standard[:2], torch.tensor([-1.0, 1.0]), atol=1e-5)
    assert normalize_per_group(scores, ids, "none") is scores
    with pytest.raises(ValueError, match="normalize"):
        normalize_per_group(scores, ids, "minmax")


@pytest.mark.parametrize("bad, message", [
    (lambda p, o: [float("nan")] * len(o), "non-finite"),
    (lambda p, o: [1.0, float("inf")][: len(o)], "non-finite"),
    (lambda p, o: [1.0] * (len(o) + 1), "expected one number per"),
    (lambda p, o: "high", "not a sequence of numbers|expected one number"),
    (lambda p, o: 1 / 0, "raised ZeroDivisionError"),
])
def test_bad_reward_outputs_name_the_reward(bad, message):
    reward = CallableReward(bad, name="my_reward")
    with pytest.raises(RewardError, match=message) as info:
        score(reward, ["p", "q"], ["a", "b"])
    assert "my_reward" in str(info.value)


def test_config_specs_build_rewards():
    reward = build_reward([{"kind": "regex", "pattern": "x", "weight": 2.0}, {"kind": "length", "target": "3"}])
    assert score(reward, ["p"], ["xx"]).tolist() == [2.0 - 1.0]
    assert build_reward({"kind": "callable", "function": "math:fsum"}).function is math.fsum
    normalized = build_reward([{"kind": "length", "normalize": "center"}])
    assert score(normalized, ["p"] * 2, ["a", "abc"], group_ids=[0, 0]).tolist() == [-1.0, 1.0]
    with pytest.raises(ConfigError, match="needs pattern"):
        load_config(RewardSpec, {"kind": "regex"})
    with pytest.raises(ConfigError, match="kind"):
        load_config(RewardSpec, {"kind": "oracle"})
    with pytest.raises(ValueError, match="missing"):
        build_reward(None)


def _tiny_classifier_dir(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    return tmp_path / "rm", model


def test_reward_model_folder_scores_like_the_project_scorer(tmp_path):
    from mmalign.rewards import RewardModelReward
    from mmalign.testing import build_tiny_tokenizer
    from mmalign.text.evaluation.reward_probes import RewardScorer

    path, _ = _tiny_classifier_dir(tmp_path, build_tiny_tokenizer())
    reward = RewardModelReward(path)
    prompts, outputs = ["Say hello.", "Pick a number."], [" hello thanks", " 7"]
    got = score(reward, prompts, outputs)
    assert torch.allclose(got, RewardScorer.from_pretrained(str(path)).score(prompts, outputs))
    assert got[0] != got[1]
    with pytest.raises(FileNotFoundError, match="not a folder"):
        RewardModelReward(tmp_path / "missing")


def test_tokenizer_that_cannot_encode_outputs_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    check_encodable(tokenizer, ["hello"], "rm")
    with pytest.raises(RewardError, match="cannot encode output 1"):
        check_encodable(tokenizer, ["hello", "hello wörld"], "rm")


def test_judge_reward_is_yes_minus_no_logprob():
    from mmalign.rewards import JudgeReward
    from mmalign.testing import build_tiny_causal_lm, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm(tokenizer=tokenizer).eval()
    yes, no = tokenizer(" the", add_special_tokens=False)["input_ids"], tokenizer("no", add_special_tokens=False)["input_ids"]
    assert len(yes) == len(no) == 1  # one-token answers of the tiny vocabulary
    with pytest.raises(ValueError, match="one-token answers"):
        JudgeReward(model=model, tokenizer=tokenizer, positive=" yes")
    judge = JudgeReward(model=model, tokenizer=tokenizer, template="{prompt}{output} ok?", positive=" the", negative="no")
    got = score(judge, ["Say hello.", "Q"], [" hello", " no no no"])
    ids = torch.tensor([tokenizer("Say hello. hello ok?", add_special_tokens=False)["input_ids"]])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)
    assert got[0].item() == pytest.approx((logp[yes[0]] - logp[no[0]]).item(), abs=1e-4)


class _FakeFaces:
    """gender probabilities from the image's mean red value; an all-black image has no face."""
    name, attributes, confidence_threshold = "fake", ("gender",), 0.8

    def classify(self, images):
        from mmalign.image.classifiers.base import predictions_from_probabilities

        red = images[..., 0].mean(axis=(1, 2)) / 255.0
        probs = np.stack([red, 1 - red], axis=1)
        return {"gender": predictions_from_probabilities("gender", probs, 0.8, face_found=images.max(axis=(1, 2, 3)) > 0)}


def _image(red):
    image = np.full((8, 8, 3), 10, dtype=np.uint8)
    image[..., 0] = red
    return image


def test_classifier_reward_balance_and_requested_attribute():
    images = [_image(255), _image(255), _image(0), _image(255), np.zeros((8, 8, 3), np.uint8)]
    balance = ClassifierReward(_FakeFaces(), mode="balance", no_face=-1.0)
    scores = score(balance, ["a doctor"] * 5, images, group_ids=[0, 0, 0, 1, 1])
    # group 0: two male-looking images and one female: the minority image adds more to the balance
    assert scores[2] > scores[0] == pytest.approx(scores[1])
    assert scores[4] == -1.0
    assert scores[:3].mean() == pytest.approx(1 - ((2 / 3) ** 2 + (1 / 3) ** 2), abs=1e-3)  # the group's Simpson index
    with pytest.raises(RewardError, match="group_ids"):
        score(balance, ["a"], [images[0]])
    requested = ClassifierReward(_FakeFaces(), mode="attribute", target="from_prompt")
    got = score(requested, ["a female nurse", "a male nurse"], [_image(0), _image(0)])
    assert got[0] > 0.9 and got[1] < 0.1
    with pytest.raises(RewardError, match="names no gender label"):
        score(requested, ["a nurse"], [_image(0)])
    with pytest.raises(ValueError, match="predicts"):
        ClassifierReward(_FakeFaces(), attribute="race")


def test_shipped_classifier_by_name_scores_images():
    reward = ClassifierReward("fairface-cnn", attribute="race", mode="balance")
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    scores = score(reward, ["a doctor"] * 4, list(images), group_ids=[0, 0, 1, 1])
    assert scores.shape == (4,) and bool(torch.isfinite(scores).all())


def test_rewards_do_not_import_the_image_backend():
    code = "import sys, mmalign.rewards, mmalign.text.online; assert not any(m.startswith('mmalign.image') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": ""})
