"""Rewards: score a batch of (prompt, output) pairs with one float each (used by online training).

    from mmalign.rewards import RegexReward, WeightedSum, build_reward, score
    reward = WeightedSum([RegexReward(r"\\bthanks\\b"), LengthReward(target=40, scale=0.01)], [1.0, 0.5])
    reward = build_reward([{"kind": "model", "path": "runs/rm/final"}, {"kind": "length", "weight": -0.01}])
    scores = score(reward, prompts, outputs)          # checked float tensor [N]

Kinds: reward-model folders and LM judges (:mod:`~mmalign.rewards.models`), Python callables, rules
(:mod:`~mmalign.rewards.rules`), image classifiers (:mod:`~mmalign.rewards.image`, imports the image backend
lazily); weighted sums and per-group normalisation (:mod:`~mmalign.rewards.base`); the ``reward:`` config
section (:mod:`~mmalign.rewards.config`).
"""
from mmalign.rewards.base import (
    CallableReward,
    NormalizedReward,
    Reward,
    RewardError,
    WeightedSum,
    normalize_per_group,
    reward_name,
    score,
)
from mmalign.rewards.config import RewardSpec, build_reward
from mmalign.rewards.rules import LengthReward, RegexReward


def __getattr__(name):
    # the model and image rewards load transformers / the image backend: import them on first use
    if name in ("RewardModelReward", "JudgeReward"):
        from mmalign.rewards import models

        return getattr(models, name)
    if name == "ClassifierReward":
        from mmalign.rewards.image import ClassifierReward

        return ClassifierReward
    raise AttributeError(f"module 'mmalign.rewards' has no attribute {name!r}")


__all__ = [
    "Reward", "RewardError", "CallableReward", "NormalizedReward", "WeightedSum", "RegexReward", "LengthReward",
    "RewardModelReward", "JudgeReward", "ClassifierReward", "RewardSpec", "build_reward", "score",
    "normalize_per_group", "reward_name",
]
