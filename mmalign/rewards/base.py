"""What a reward is, how its scores are checked, and how rewards combine.

A reward scores a batch of (prompt, output) pairs and returns one float per pair::

    scores = reward(prompts, outputs)                      # a float tensor [N] (or a list of floats)
    scores = reward(prompts, outputs, group_ids=ids)       # rewards that judge a group (an image set's balance)

Outputs are strings for text and images (uint8 [H, W, 3] arrays or PIL images) for the image classifier
rewards. :func:`score` is the one place that calls a reward: it turns a wrong count, NaN/inf, a wrong type or
an exception raised inside the reward into an error that names the reward, so a bad reward stops a run at the
step where it happens instead of training on garbage.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = [
    "Reward", "RewardError", "CallableReward", "WeightedSum", "NormalizedReward", "score", "normalize_per_group",
    "reward_name", "import_callable", "NORMALIZE_MODES",
]

NORMALIZE_MODES = ("none", "center", "standardize")


class RewardError(RuntimeError):
    """A reward failed or returned unusable scores; the message names the reward."""


class Reward:
    """Base class: subclasses set ``name`` and implement ``__call__(prompts, outputs, *, group_ids=None)``.

    ``needs_groups``: the reward judges groups of outputs (which outputs answer the same prompt), so it must be
    given ``group_ids``.
    """

    name: str = "reward"
    needs_groups: bool = False

    def __call__(self, prompts: Sequence[str], outputs: Sequence[Any], *, group_ids: Optional[Sequence[int]] = None):
        raise NotImplementedError


def reward_name(reward: Any) -> str:
    name = getattr(reward, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(reward, "__qualname__", None) or type(reward).__name__


def score(reward: Any, prompts: Sequence[str], outputs: Sequence[Any], *,
          group_ids: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``reward``'s scores as a float32 CPU tensor [N], checked: one finite number per pair."""
    name = reward_name(reward)
    if len(prompts) != len(outputs):
        raise ValueError(f"reward {name!r}: {len(prompts)} prompts but {len(outputs)} outputs")
    kwargs = {}
    if getattr(reward, "needs_groups", False):
        if group_ids is None:
            raise RewardError(f"reward {name!r} judges groups of outputs: pass group_ids")
        kwargs["group_ids"] = group_ids
    try:
        raw = reward(list(prompts), list(outputs), **kwargs)
    except RewardError:
        raise
    except Exception as err:  # a reward is user code: say which one failed, keep the cause
        raise RewardError(f"reward {name!r} raised {type(err).__name__}: {err}") from err
    try:
        values = torch.as_tensor(raw.detach().cpu() if isinstance(raw, torch.Tensor) else raw, dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise RewardError(f"reward {name!r} returned {type(raw).__name__}, not a sequence of numbers ({err})") from None
    values = values.reshape(-1) if values.dim() == 2 and values.shape[-1] == 1 else values
    if values.dim() != 1 or values.shape[0] != len(outputs):
        raise RewardError(f"reward {name!r} returned {tuple(values.shape)} scores for {len(outputs)} outputs; "
                          "expected one number per (prompt, output) pair")
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise RewardError(f"reward {name!r} returned {int(bad.sum())} non-finite score(s) (first: output {first}, "
                          f"{float(values[first])}); prompt {str(prompts[first])[:80]!r}")
    return values


def normalize_per_group(scores: torch.Tensor, group_ids: Sequence[int] | torch.Tensor, mode: str = "center",
                        eps: float = 1e-6) -> torch.Tensor:
    """Scores centred (``center``) or standardised (``standardize``: centred and divided by the group's standard
    deviation, population form, + ``eps``) within each group of outputs of the same prompt; ``none`` returns them
    as they are. A group of one centres to 0."""
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize: invalid value {mode!r}; expected one of {', '.join(NORMALIZE_MODES)}")
    if mode == "none":
        return scores
    ids = torch.as_tensor(group_ids, dtype=torch.long, device=scores.device)
    _, inverse = torch.unique(ids, return_inverse=True)
    groups = int(inverse.max()) + 1 if inverse.numel() else 0
    counts = torch.zeros(groups, dtype=scores.dtype, device=scores.device).index_add_(0, inverse, torch.ones_like(scores))
    means = torch.zeros(groups, dtype=scores.dtype, device=scores.device).index_add_(0, inverse, scores) / counts
    centred = scores - means[inverse]
    if mode == "center":
        return centred
    variance = torch.zeros(groups, dtype=scores.dtype, device=scores.device).index_add_(0, inverse, centred ** 2) / counts
    return centred / (variance.sqrt()[inverse] + eps)


class CallableReward(Reward):
    """A Python function ``(prompts, outputs) -> scores`` as a reward (``group_ids=`` passed when it takes it)."""

    def __init__(self, function: Callable, name: Optional[str] = None, needs_groups: bool = False):
        if not callable(function):
            raise TypeError(f"CallableReward: {function!r} is not callable")
        self.function = function
        self.name = name or getattr(function, "__name__", "callable")
        self.needs_groups = needs_groups

    def __call__(self, prompts, outputs, *, group_ids=None):
        if self.needs_groups:
            return self.function(prompts, outputs, group_ids=group_ids)
        return self.function(prompts, outputs)


def import_callable(spec: str) -> Callable:
    """``'package.module:function'`` -> the function (a module on the Python path; nothing is read from data)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"function {spec!r}: expected 'package.module:function'")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"function {spec!r}: cannot import ({err})") from None
    if not callable(target):
        raise ValueError(f"function {spec!r} is not callable")
    return target


class NormalizedReward(Reward):
    """``reward``'s scores normalised within each prompt's group (:func:`normalize_per_group`)."""

    needs_groups = True

    def __init__(self, reward: Any, mode: str = "center"):
        if mode not in NORMALIZE_MODES:
            raise ValueError(f"normalize: invalid value {mode!r}; expected one of {', '.join(NORMALIZE_MODES)}")
        self.reward, self.mode = reward, mode
        self.name = f"{reward_name(reward)}[{mode}]"

    def __call__(self, prompts, outputs, *, group_ids=None):
        return normalize_per_group(score(self.reward, prompts, outputs, group_ids=group_ids), group_ids, self.mode)


class WeightedSum(Reward):
    """``Σ_i w_i · reward_i``: every part is scored (and checked) separately, then summed."""

    def __init__(self, rewards: Sequence[Any], weights: Optional[Sequence[float]] = None, name: Optional[str] = None):
        if not rewards:
            raise ValueError("WeightedSum: needs at least one reward")
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        if len(weights) != len(rewards):
            raise ValueError(f"WeightedSum: {len(rewards)} rewards but {len(weights)} weights")
        if not all(torch.isfinite(torch.tensor(w)) for w in weights):
            raise ValueError(f"WeightedSum: weights must be finite; got {weights}")
        self.rewards, self.weights = list(rewards), weights
        self.needs_groups = any(getattr(r, "needs_groups", False) for r in rewards)
        self.name = name or " + ".join(f"{w:g}*{reward_name(r)}" for r, w in zip(self.rewards, self.weights))

    def parts(self, prompts, outputs, *, group_ids=None) -> dict[str, torch.Tensor]:
        """Each part's checked, unweighted scores by name (logged separately by the online trainer)."""
        return {reward_name(r): score(r, prompts, outputs, group_ids=group_ids) for r in self.rewards}

    def __call__(self, prompts, outputs, *, group_ids=None):
        total = torch.zeros(len(outputs))
        for reward, weight in zip(self.rewards, self.weights):
            total += weight * score(reward, prompts, outputs, group_ids=group_ids)
        return total
