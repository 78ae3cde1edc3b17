"""The ``reward:`` config section: a list of reward specs, built into one reward (a weighted sum)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

from mmalign.rewards.base import NORMALIZE_MODES, CallableReward, NormalizedReward, Reward, WeightedSum, import_callable

__all__ = ["RewardSpec", "build_reward", "REWARD_KINDS"]

REWARD_KINDS = ("model", "judge", "callable", "regex", "length", "classifier")


@dataclass
class RewardSpec:
    """One reward of the ``reward:`` list; the list is summed with the ``weight``s."""

    kind: Literal["model", "judge", "callable", "regex", "length", "classifier"] = field(
        metadata={"help": "model (reward-model folder), judge (causal-LM folder asked yes/no), callable "
                  "('package.module:function'), regex, length, classifier (images: face demographics)"})
    weight: float = field(default=1.0, metadata={"help": "weight of this reward in the sum"})
    name: Optional[str] = field(default=None, metadata={"help": "name in logs and errors; default from the kind"})
    path: Optional[str] = field(default=None, metadata={"help": "model/judge: the model folder"})
    function: Optional[str] = field(default=None, metadata={"help": "callable: 'package.module:function'"})
    pattern: Optional[str] = field(default=None, metadata={"help": "regex: the pattern (re.search)"})
    match: float = field(default=1.0, metadata={"help": "regex: score when found (per match with count)"})
    miss: float = field(default=0.0, metadata={"help": "regex: score when not found"})
    count: bool = field(default=False, metadata={"help": "regex: count the matches"})
    unit: Literal["chars", "words"] = field(default="chars", metadata={"help": "length: characters or words"})
    target: Optional[str] = field(default=None, metadata={
        "help": "length: target length (score −|len − target|); classifier attribute mode: the label or from_prompt"})
    scale: float = field(default=1.0, metadata={"help": "length: multiplier"})
    classifier: str = field(default="fairface-cnn", metadata={"help": "classifier: backend name"})
    attribute: str = field(default="gender", metadata={"help": "classifier: gender or race"})
    mode: Literal["attribute", "balance"] = field(default="balance", metadata={
        "help": "classifier: balance (contribution to the group's Simpson index) or attribute (p(target))"})
    normalize: Literal["none", "center", "standardize"] = field(default="none", metadata={
        "help": "normalise this reward within each prompt's group of samples before weighting"})
    batch_size: int = field(default=16, metadata={"help": "model/judge: texts per forward"})
    max_length: int = field(default=1024, metadata={"help": "model/judge: tokens kept (from the right)"})

    def __post_init__(self) -> None:
        required = {"model": "path", "judge": "path", "callable": "function", "regex": "pattern"}
        key = required.get(self.kind)
        if key and getattr(self, key) is None:
            raise ValueError(f"reward kind {self.kind!r} needs {key}")
        if self.kind == "length" and self.target is not None:
            try:
                float(self.target)
            except ValueError:
                raise ValueError(f"reward length: target must be a number; got {self.target!r}") from None
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"reward normalize: expected one of {NORMALIZE_MODES}")


def _build_one(spec: RewardSpec) -> Any:
    from mmalign.rewards import image, models, rules

    kind = spec.kind
    if kind == "model":
        reward = models.RewardModelReward(spec.path, batch_size=spec.batch_size, max_length=spec.max_length, name=spec.name)
    elif kind == "judge":
        reward = models.JudgeReward(spec.path, batch_size=spec.batch_size, max_length=spec.max_length, name=spec.name)
    elif kind == "callable":
        reward = CallableReward(import_callable(spec.function), name=spec.name or spec.function)
    elif kind == "regex":
        reward = rules.RegexReward(spec.pattern, match=spec.match, miss=spec.miss, count=spec.count, name=spec.name)
    elif kind == "length":
        target = None if spec.target is None else float(spec.target)
        reward = rules.LengthReward(unit=spec.unit, target=target, scale=spec.scale, name=spec.name)
    else:
        reward = image.ClassifierReward(spec.classifier, attribute=spec.attribute, mode=spec.mode, target=spec.target,
                                        name=spec.name)
    return NormalizedReward(reward, spec.normalize) if spec.normalize != "none" else reward


def build_reward(source: Any) -> Any:
    """A reward from a :class:`RewardSpec`, a list of specs (or of dicts), a reward object or a plain callable.
    Several specs, or one with a weight other than 1, become a :class:`WeightedSum`."""
    from mmalign.config import from_dict

    if source is None:
        raise ValueError("reward: missing; give a reward: section or pass reward=... (an object or a callable)")
    if isinstance(source, (RewardSpec, dict)):
        source = [source]
    if isinstance(source, Sequence) and not isinstance(source, str):
        if not source:
            raise ValueError("reward: the list is empty")
        specs = [s if isinstance(s, RewardSpec) else from_dict(RewardSpec, s, source=f"reward[{i}]")
                 for i, s in enumerate(source)]
        parts = [_build_one(s) for s in specs]
        if len(parts) == 1 and specs[0].weight == 1.0:
            return parts[0]
        return WeightedSum(parts, [s.weight for s in specs])
    if isinstance(source, Reward) or callable(source):
        return source
    raise TypeError(f"reward: cannot build a reward from {type(source).__name__}")
