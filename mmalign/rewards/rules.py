"""Rule rewards on text: a regular expression, the length of the output."""
from __future__ import annotations

import re
from typing import Literal, Optional

import torch

from mmalign.rewards.base import Reward

__all__ = ["RegexReward", "LengthReward"]


class RegexReward(Reward):
    """``match`` when ``pattern`` is found in the output (``re.search``), else ``miss``; with ``count=True`` the
    number of non-overlapping matches times ``match`` (plus ``miss`` when there is none)."""

    def __init__(self, pattern: str, *, match: float = 1.0, miss: float = 0.0, count: bool = False,
                 ignore_case: bool = False, name: Optional[str] = None):
        try:
            self.regex = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
        except re.error as err:
            raise ValueError(f"regex reward: invalid pattern {pattern!r} ({err})") from None
        self.match, self.miss, self.count = float(match), float(miss), count
        self.name = name or f"regex:{pattern}"

    def __call__(self, prompts, outputs, *, group_ids=None):
        scores = []
        for text in outputs:
            if self.count:
                n = len(self.regex.findall(text))
                scores.append(n * self.match if n else self.miss)
            else:
                scores.append(self.match if self.regex.search(text) else self.miss)
        return torch.tensor(scores, dtype=torch.float32)


class LengthReward(Reward):
    """The output's length in ``unit`` (characters or whitespace-separated words) times ``scale``; with a
    ``target``, ``−scale·|length − target|`` (closest to the target is best)."""

    def __init__(self, *, unit: Literal["chars", "words"] = "chars", target: Optional[float] = None,
                 scale: float = 1.0, name: Optional[str] = None):
        if unit not in ("chars", "words"):
            raise ValueError(f"length reward: unit must be 'chars' or 'words'; got {unit!r}")
        self.unit, self.target, self.scale = unit, target, float(scale)
        self.name = name or (f"length({unit})" if target is None else f"length({unit}, target={target:g})")

    def __call__(self, prompts, outputs, *, group_ids=None):
        lengths = torch.tensor([len(t) if self.unit == "chars" else len(t.split()) for t in outputs],
                               dtype=torch.float32)
        if self.target is None:
            return self.scale * lengths
        return -self.scale * (lengths - float(self.target)).abs()
