"""The RNG experiment's preference groups on the terms mIPO's estimator needs (thesis §3.5.2, Prop. 1; issue #17).

Proposition 1 makes ``(R_w − R_l − c)² − s_w²/k − s_l²/k`` unbiased for the population loss only when the ``k``
members of each group are i.i.d. draws from the chosen and the rejected distribution. Two builders:

* ``member_draws: iid`` (default): the chosen group is ``k`` integers drawn uniformly **with replacement** from
  the interval (repeats happen: they are i.i.d. draws of the uniform answer); the rejected group is ``k`` of the
  model's own sampled answers, which are i.i.d. draws of the model's answer (any ``k`` of ``n`` i.i.d. samples,
  chosen without looking at their values, are i.i.d.). ``member_draws: distinct`` is the previous builder
  (``k`` *distinct* integers: a draw without replacement from a small population, for which the estimator is
  biased low; see ``mmalign_experiments.sim.theory.finite_pool_bias``).
* ``redraw_pool_size: P``: each training prompt gets *pools* — ``P`` i.i.d. uniform integers and all of its
  non-empty model answers (ragged across prompts) — and training draws ``k`` members of each pool with
  replacement afresh at every epoch (``data.redraw_members``, :mod:`mmalign.text.data.redraw`). Pairwise methods get
  every pool row ``k`` times with one member re-drawn per row, so they see ``k`` pairs per prompt per epoch, as
  the group methods see ``k`` members.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

__all__ = ["draw_chosen", "build_pool_rows"]


def draw_chosen(rng: random.Random, low: int, high: int, count: int, how: str) -> list[int]:
    """``count`` integers of ``[low, high]``: i.i.d. uniform (``iid``) or distinct (``distinct``)."""
    if how == "iid":
        return [rng.randint(low, high) for _ in range(count)]
    if how == "distinct":
        return rng.sample(range(low, high + 1), count)
    raise ValueError(f"data.member_draws: invalid value {how!r}; expected 'iid' or 'distinct'")


def build_pool_rows(prompts: Sequence[str], intervals: Sequence[Any], model_answers: Sequence[list[str]], cfg,
                    answer_text, parse) -> tuple[list[dict], list[dict], dict[str, int]]:
    """(pool rows for group methods, the same rows ``group_size`` times for pairwise methods, stats).

    Rejected pool: the first integer of each answer that has one, then the model's other non-empty answers (as
    in the fixed-group builder); a prompt with no non-empty answer is skipped.
    """
    rng = random.Random(cfg.seed + 1)
    pools, skipped = [], 0
    for prompt, interval, answers in zip(prompts, intervals, model_answers, strict=True):
        numbers = [answer_text(v) for v in map(parse, answers) if v is not None]
        others = [a.rstrip() for a in answers if parse(a) is None and a.strip()]
        rejected = numbers + others
        if not rejected:
            skipped += 1
            continue
        chosen = [answer_text(v) for v in draw_chosen(rng, interval.low, interval.high, cfg.redraw_pool_size, "iid")]
        pools.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                      "low": interval.low, "high": interval.high})
    if not pools:
        raise ValueError("rng data: the model produced no non-empty answer for any training prompt; check the prompt")
    pair_rows = [row for row in pools for _ in range(cfg.group_size)]  # one re-drawn member per copy
    return pools, pair_rows, {"train_prompts": len(pools), "skipped_prompts": skipped}
