"""The RNG experiment's data: training and held-out intervals, prompts and preference groups."""
from __future__ import annotations

import logging
import random
from typing import Any

from mmalign.text.evaluation.uniformity import Interval, parse_first_integer
from mmalign_experiments.rng.config import RngDataConfig
from mmalign_experiments.rng.groups import build_pool_rows, draw_chosen

logger = logging.getLogger("mmalign_experiments.rng")


# ------------------------------------------------------------------------------------------------ data
def make_intervals(cfg: RngDataConfig) -> tuple[list[Interval], list[Interval]]:
    """Training intervals (gap in [train_gap_min, train_gap_max], distinct) and held-out intervals that overlap
    no training interval (nor each other), all with a in [low_min, low_max]."""
    rng = random.Random(cfg.seed)

    def draw(gap_min: int, gap_max: int, count: int, forbidden: list[Interval], kind: str) -> list[Interval]:
        chosen: list[Interval] = []
        for _ in range(1000 * count):
            if len(chosen) == count:
                return chosen
            low = rng.randint(cfg.low_min, cfg.low_max)
            candidate = Interval(low, low + rng.randint(gap_min, gap_max))
            if candidate in chosen or any(candidate.overlaps(other) for other in forbidden):
                continue
            chosen.append(candidate)
            if kind == "test":
                forbidden = forbidden + [candidate]
        raise ValueError(
            f"data: could not place {count} {kind} intervals in [{cfg.low_min}, {cfg.low_max}] (found {len(chosen)}); "
            "widen low_min..low_max or ask for fewer intervals"
        )

    train = draw(cfg.train_gap_min, cfg.train_gap_max, cfg.num_train_intervals, [], "train")
    test = draw(cfg.test_gap_min, cfg.test_gap_max, cfg.num_test_intervals, list(train), "test")
    return train, test


def format_prompt(tokenizer, interval: Interval, cfg: RngDataConfig) -> str:
    """The full prompt text: chat-templated user request + generation prompt + ``answer_prefix``."""
    question = cfg.prompt_template.format(low=interval.low, high=interval.high)
    if not cfg.use_chat_template:
        return f"{question}\n{cfg.answer_prefix}"
    messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [
        {"role": "user", "content": question}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + cfg.answer_prefix


def _answer_text(value: int) -> str:
    # The answer prefix ends with ":"; the number follows after one space, as the model writes it.
    return f" {value}"


def build_preference_rows(
    prompts: list[str], intervals: list[Interval], model_answers: list[list[str]], cfg: RngDataConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """(group rows, pair rows, stats) for the training intervals.

    Chosen group: ``k`` integers drawn uniformly from the interval, i.i.d. (``member_draws: iid``) or distinct
    (see :mod:`mmalign_experiments.rng.groups`). Rejected group: ``k`` answers drawn
    without replacement from the model's own samples that contain an integer (the first integer, as text), topped
    up with its non-numeric answers when fewer than ``k`` contain one; a prompt with fewer than ``k`` non-empty
    answers is skipped. Pairs: ``(chosen_i, rejected_i)`` for ``i < k``, so the
    pairwise and group methods see exactly the same sequences.
    """
    rng = random.Random(cfg.seed + 1)
    groups, pairs = [], []
    skipped = 0
    for prompt, interval, answers in zip(prompts, intervals, model_answers, strict=True):
        parsed = [_answer_text(v) for v in map(parse_first_integer, answers) if v is not None]
        # Too few numbers: top up with the model's other (non-numeric) answers, which are just as rejected.
        others = [a.rstrip() for a in answers if parse_first_integer(a) is None and a.strip()]
        if len(parsed) >= cfg.group_size:
            rejected = rng.sample(parsed, cfg.group_size)
        elif len(parsed) + len(others) >= cfg.group_size:
            rejected = parsed + rng.sample(others, cfg.group_size - len(parsed))
        else:
            skipped += 1
            continue
        chosen = [_answer_text(v) for v in draw_chosen(rng, interval.low, interval.high, cfg.group_size, cfg.member_draws)]
        meta = {"low": interval.low, "high": interval.high}
        groups.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, **meta})
        pairs.extend({"prompt": prompt, "chosen": c, "rejected": r, **meta} for c, r in zip(chosen, rejected))
    if not groups:
        raise ValueError(
            "rng data: the model produced fewer than group_size non-empty answers for every training prompt; check the prompt "
            "(data.prompt_template, data.answer_prefix) or raise data.rejected_pool_size"
        )
    return groups, pairs, {"train_prompts": len(groups), "skipped_prompts": skipped}


def build_pool_preference_rows(prompts: list[str], intervals: list[Interval], model_answers: list[list[str]],
                               cfg: RngDataConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """Pools re-drawn every epoch (``data.redraw_pool_size``): see :func:`mmalign_experiments.rng.groups.build_pool_rows`."""
    return build_pool_rows(prompts, intervals, model_answers, cfg, _answer_text, parse_first_integer)
