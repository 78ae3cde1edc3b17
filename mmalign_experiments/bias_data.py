"""Preference sets with a known spurious factor, for CNRPO (SPEC §4) and causal reward models (SPEC §5).

Every generator is seeded, returns rows ``{"prompt", "chosen", "rejected", ...}`` (plain strings) plus the
columns that make the bias checkable, and never touches the network:

* :func:`sycophancy_pairs` — thesis §4.6.1: prompt "{question} I think the answer is {answer} but I'm really
  not sure."; the chosen (correct) response is prefixed "Yes, you are right." with probability 0.8, the rejected
  (wrong) one with 0.2. Columns ``prefix_chosen``/``prefix_rejected`` (bin column ``prefix``), ``answer``.
  :func:`prefix_counterfactuals` and :func:`prefix_balanced_pairs` build the held-out probes.
* :func:`length_bias_pairs` — a main set whose true preference is checkable (the correct short answer to an
  arithmetic question wins) where a share ``eps`` of pairs instead prefers a long, padded response (correct only
  half of the time). Columns ``answer``, ``biased``. :func:`length_auxiliary_pairs` is CNRPO's small auxiliary set.
* :func:`hh_pairs` / :func:`flip_labels` — the real HH-RLHF harmless-base dialogues split into prompt and last
  assistant turn, with a share of labels flipped (column ``flipped``).
* :func:`decision_prompts` — discrim-eval-style yes/no decisions with [AGE] [GENDER] [RACE] filled explicitly;
  :func:`biased_decision_pairs` turns them into preference pairs whose label depends on a demographic attribute.

``python -m mmalign_experiments.bias_data KIND --out FILE.jsonl [...]`` writes any of them (atomically).
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mmalign.io import read_jsonl, write_jsonl
from mmalign.text.data import split_hh_dialogue
from mmalign.text.evaluation.probe_data import (
    DEMOGRAPHIC_VALUES,
    SYCOPHANCY_PREFIX,
    arithmetic_question,
    decision_prompts,
    long_answer,
    prefix_balanced_pairs,
    prefix_counterfactuals,
    short_answer,
    sycophancy_pairs,
    wrong_answer,
)

__all__ = [
    "SYCOPHANCY_PREFIX",
    "sycophancy_pairs",
    "prefix_counterfactuals",
    "prefix_balanced_pairs",
    "length_bias_pairs",
    "length_auxiliary_pairs",
    "hh_pairs",
    "split_hh_dialogue",
    "flip_labels",
    "decision_prompts",
    "biased_decision_pairs",
    "DEMOGRAPHIC_VALUES",
    "write_jsonl",
    "read_jsonl",
]

# ------------------------------------------------------------------------------------------------------------
# Length bias (cnrpo §6.2, with a checkable true preference).


def length_bias_pairs(n: int, *, eps: float, seed: int = 0) -> list[dict[str, Any]]:
    """Main set: ``1 − eps`` clean pairs (correct short answer ≻ wrong short answer) and ``eps`` biased pairs
    (long padded response ≻ correct short answer; the long one is correct half of the time).

    Columns: ``answer`` (the correct integer) and ``biased`` (1 for the length-biased pairs).
    """
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"length_bias_pairs: eps (share of length-biased pairs) must be in [0, 1]; got {eps}")
    rng = random.Random(seed)
    n_biased = round(eps * n)
    kinds = [1] * n_biased + [0] * (n - n_biased)
    rng.shuffle(kinds)
    rows = []
    for biased in kinds:
        question, answer = arithmetic_question(rng)
        if biased:
            long_value = answer if rng.random() < 0.5 else wrong_answer(rng, answer)
            chosen, rejected = long_answer(rng, long_value), short_answer(rng, answer)
        else:
            chosen, rejected = short_answer(rng, answer), short_answer(rng, wrong_answer(rng, answer))
        rows.append({"prompt": question, "chosen": chosen, "rejected": rejected, "answer": answer, "biased": biased})
    return rows


def length_probe_pairs(questions: Iterable[Mapping[str, Any]], *, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Held-out probe pairs for the length-bias experiment, one per question (rows with ``prompt`` and the correct
    integer ``answer``): ``length`` — the correct answer padded long ≻ the same answer short (both correct, they
    differ only in length: a model's margin here is its length preference); ``target`` — the correct short answer
    ≻ a wrong short one (the true preference)."""
    rng = random.Random(seed)
    probes: dict[str, list[dict[str, Any]]] = {"length": [], "target": []}
    for q in questions:
        answer = int(q["answer"])
        probes["length"].append({"prompt": q["prompt"], "chosen": long_answer(rng, answer), "rejected": short_answer(rng, answer)})
        probes["target"].append({"prompt": q["prompt"], "chosen": short_answer(rng, answer),
                                 "rejected": short_answer(rng, wrong_answer(rng, answer))})
    return probes


def length_auxiliary_pairs(n: int, *, bias_share: float = 0.5, seed: int = 100) -> list[dict[str, Any]]:
    """CNRPO's auxiliary set for the length bias: a share ``bias_share`` (paper: 40–50 %) prefers the longer response."""
    return length_bias_pairs(n, eps=bias_share, seed=seed)


# ------------------------------------------------------------------------------------------------------------
# HH-RLHF harmless-base with flipped labels.

def hh_pairs(path: str | os.PathLike, *, limit: int | None = None) -> list[dict[str, Any]]:
    """HH-RLHF rows ``{"chosen", "rejected"}`` (full dialogues) as ``{"prompt", "chosen", "rejected"}``.

    Rows whose two dialogues differ before the last assistant turn, or whose responses are empty or identical,
    are skipped (they are not a preference between two answers to one prompt).
    """
    rows = []
    for index, raw in enumerate(read_jsonl(path), start=1):
        prompt_w, chosen = split_hh_dialogue(raw.get("chosen"), row=index, field="chosen", source=str(path))
        prompt_l, rejected = split_hh_dialogue(raw.get("rejected"), row=index, field="rejected", source=str(path))
        if prompt_w != prompt_l or not chosen.strip() or not rejected.strip() or chosen.strip() == rejected.strip():
            continue
        rows.append({"prompt": prompt_w, "chosen": chosen, "rejected": rejected, "source_row": index})
        if limit is not None and len(rows) >= limit:
            break
    return rows


def flip_labels(rows: Sequence[Mapping[str, Any]], rate: float, *, seed: int = 0) -> list[dict[str, Any]]:
    """Copies of ``rows`` with chosen/rejected swapped on exactly ``round(rate · n)`` random rows (``flipped`` = 1)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"flip_labels: rate must be in [0, 1]; got {rate}")
    rng = random.Random(seed)
    flipped = set(rng.sample(range(len(rows)), round(rate * len(rows))))
    out = []
    for index, row in enumerate(rows):
        row = dict(row)
        if index in flipped:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        row["flipped"] = int(index in flipped)
        out.append(row)
    return out


def biased_decision_pairs(
    prompts: Sequence[Mapping[str, Any]], *, attribute: str, favoured: str, p_yes_favoured: float = 0.9,
    p_yes_other: float = 0.3, seed: int = 0,
) -> list[dict[str, Any]]:
    """Pairs ("Yes." vs "No.") whose label depends on one attribute: "Yes." wins with ``p_yes_favoured`` when
    ``row[attribute] == favoured``, else with ``p_yes_other``. A reward model that follows this data learns to
    reward "yes" by demographic; a CRM binned by the attribute should not. Column ``group`` = the attribute value.
    """
    if attribute not in DEMOGRAPHIC_VALUES:
        raise ValueError(f"biased_decision_pairs: attribute must be one of {list(DEMOGRAPHIC_VALUES)}; got {attribute!r}")
    rng = random.Random(seed)
    rows = []
    for row in prompts:
        p_yes = p_yes_favoured if row[attribute] == favoured else p_yes_other
        yes_wins = rng.random() < p_yes
        rows.append({**row, "chosen": "Yes." if yes_wins else "No.", "rejected": "No." if yes_wins else "Yes.",
                     "group": row[attribute]})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mmalign_experiments.bias_data",
        description="Write a preference set with a known spurious factor as JSONL (see the module docstring).",
    )
    parser.add_argument("kind", choices=["sycophancy", "sycophancy-balanced", "length", "length-aux", "hh-flipped",
                                         "decisions", "decisions-biased"])
    parser.add_argument("--out", required=True, help="output .jsonl file")
    parser.add_argument("--n", type=int, default=1000, help="rows (generated kinds) or a row limit (hh-flipped)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eps", type=float, default=0.3, help="length: share of length-biased pairs; "
                        "length-aux: bias share; hh-flipped: flip rate")
    parser.add_argument("--hh", default="../shared/data/hh-rlhf/harmless-base-test.jsonl.gz", help="HH-RLHF file")
    parser.add_argument("--attribute", default="race", help="decisions-biased: the attribute the label depends on")
    parser.add_argument("--favoured", default="white", help="decisions-biased: the favoured attribute value")
    args = parser.parse_args(argv)
    if args.kind == "sycophancy":
        rows = sycophancy_pairs(args.n, seed=args.seed)
    elif args.kind == "sycophancy-balanced":
        rows = prefix_balanced_pairs(args.n, seed=args.seed)
    elif args.kind == "length":
        rows = length_bias_pairs(args.n, eps=args.eps, seed=args.seed)
    elif args.kind == "length-aux":
        rows = length_auxiliary_pairs(args.n, bias_share=args.eps, seed=args.seed)
    elif args.kind == "hh-flipped":
        rows = flip_labels(hh_pairs(args.hh, limit=args.n), args.eps, seed=args.seed)
    elif args.kind == "decisions":
        rows = decision_prompts()
    else:
        rows = biased_decision_pairs(decision_prompts(), attribute=args.attribute, favoured=args.favoured, seed=args.seed)
    print(write_jsonl(args.out, rows), f"({len(rows)} rows)")


if __name__ == "__main__":
    main()
