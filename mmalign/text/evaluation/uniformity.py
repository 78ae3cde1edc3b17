"""RNG uniformity of sampled answers (SPEC §6): asked for a random integer in ``[low, high]``, how uniform are the
answers? Per-prompt entropy, normalised entropy, KL to uniform and the out-of-range rate, and their mean."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from mmalign.shared.metrics import entropy, kl_to_uniform

__all__ = ["Interval", "parse_first_integer", "uniformity_metrics", "summarize"]

_INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Interval:
    low: int
    high: int

    @property
    def size(self) -> int:
        return self.high - self.low + 1

    def overlaps(self, other: "Interval") -> bool:
        return self.low <= other.high and other.low <= self.high


def parse_first_integer(text: str) -> Optional[int]:
    """The first integer in ``text`` (a leading minus sign included), or None."""
    match = _INTEGER.search(text)
    return int(match.group()) if match else None


def uniformity_metrics(answers: list[str], interval: Interval) -> dict[str, Any]:
    """SPEC §6 RNG metrics for one prompt's sampled answers.

    ``entropy``: of the distribution of in-range answers over the ``K`` allowed integers (nats; 0 when no answer
    is in range); ``normalized_entropy`` = entropy / log K; ``kl_to_uniform`` = log K − entropy (log K when no
    answer is in range); ``out_of_range_rate``: answers whose first integer is missing or outside the interval.
    """
    if not answers:
        raise ValueError(f"uniformity_metrics: no answers for interval [{interval.low}, {interval.high}]")
    counts = [0] * interval.size
    out_of_range = 0
    for text in answers:
        value = parse_first_integer(text)
        if value is None or not interval.low <= value <= interval.high:
            out_of_range += 1
        else:
            counts[value - interval.low] += 1
    log_k = math.log(interval.size)
    if sum(counts):
        h = entropy(counts)
        kl = kl_to_uniform(counts, support_size=interval.size)
    else:
        h, kl = 0.0, log_k
    return {
        "low": interval.low,
        "high": interval.high,
        "counts": counts,
        "entropy": h,
        "normalized_entropy": h / log_k if log_k > 0 else 1.0,
        "kl_to_uniform": kl,
        "out_of_range_rate": out_of_range / len(answers),
    }


def summarize(per_interval: list[dict[str, Any]]) -> dict[str, float]:
    n = len(per_interval)
    return {
        name: sum(row[name] for row in per_interval) / n
        for name in ("entropy", "normalized_entropy", "kl_to_uniform", "out_of_range_rate")
    }
