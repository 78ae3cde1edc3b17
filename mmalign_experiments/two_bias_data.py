"""A main set with two content biases at once, and one auxiliary set per bias, for multi-trigger CNRPO
(cnrpo Eq. 14 with Σ_i α_i, its Table 3 setting; SPEC §4; issue #17).

The true preference is checkable (the correct short answer to an arithmetic question wins). Two biases corrupt
a share of the main pairs each:

* **length** (``<BeLongerNow>``): a long padded response (correct half of the time) beats the correct short one;
* **sycophantic prefix** (``<BeAgreeableNow>``): a response opening with "Yes, you are right." (the prefix of the
  thesis' sycophancy set, §4.6.1; wrong half of the time) beats the correct short one.

Columns: ``answer``, ``length_biased``, ``prefix_biased`` (0/1). The auxiliary sets mix the bias with clean pairs
(share ``bias_share``, cnrpo Eq. 5). Probes separate the biases: ``length`` (the same correct answer long ≻
short), ``prefix`` (the same correct answer with ≻ without the prefix) and ``target`` (correct ≻ wrong, both
short); a model's mean log-likelihood margin on each probe is its preference for that aspect alone.

    python -m mmalign_experiments.two_bias_data --out-dir outputs/data/two-bias --n 64 --eps-length 0.25 --eps-prefix 0.25
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

from mmalign.io import write_jsonl
from mmalign.text.evaluation.probe_data import (
    SYCOPHANCY_PREFIX, arithmetic_question, long_answer, short_answer, wrong_answer,
)

__all__ = ["TRIGGERS", "two_bias_pairs", "length_aux_pairs", "prefix_aux_pairs", "probe_pairs", "main"]

TRIGGERS = ("<BeLongerNow>", "<BeAgreeableNow>")


def _row(rng: random.Random, kind: str) -> dict[str, Any]:
    question, answer = arithmetic_question(rng)
    correct = short_answer(rng, answer)
    maybe_wrong = answer if rng.random() < 0.5 else wrong_answer(rng, answer)
    if kind == "length":
        chosen, rejected = long_answer(rng, maybe_wrong), correct
    elif kind == "prefix":
        chosen, rejected = f"{SYCOPHANCY_PREFIX} {short_answer(rng, maybe_wrong)}", correct
    else:
        chosen, rejected = correct, short_answer(rng, wrong_answer(rng, answer))
    return {"prompt": question, "chosen": chosen, "rejected": rejected, "answer": answer,
            "length_biased": int(kind == "length"), "prefix_biased": int(kind == "prefix")}


def _mixture(n: int, shares: dict[str, float], seed: int) -> list[dict[str, Any]]:
    if any(not 0 <= s <= 1 for s in shares.values()) or sum(shares.values()) > 1:
        raise ValueError(f"bias shares must be in [0, 1] and sum to at most 1; got {shares}")
    rng = random.Random(seed)
    kinds = [k for k, s in shares.items() for _ in range(round(s * n))]
    kinds += ["clean"] * (n - len(kinds))
    rng.shuffle(kinds)
    return [_row(rng, kind) for kind in kinds]


def two_bias_pairs(n: int, *, eps_length: float, eps_prefix: float, seed: int = 0) -> list[dict[str, Any]]:
    """The noisy main set: shares ``eps_length`` and ``eps_prefix`` of the pairs carry each bias (cnrpo Eq. 4)."""
    return _mixture(n, {"length": eps_length, "prefix": eps_prefix}, seed)


def length_aux_pairs(n: int, *, bias_share: float = 0.5, seed: int = 100) -> list[dict[str, Any]]:
    return _mixture(n, {"length": bias_share}, seed)


def prefix_aux_pairs(n: int, *, bias_share: float = 0.5, seed: int = 200) -> list[dict[str, Any]]:
    return _mixture(n, {"prefix": bias_share}, seed)


def probe_pairs(n: int, *, seed: int = 300) -> dict[str, list[dict[str, Any]]]:
    """Held-out probes, one pair per question and aspect (see the module docstring)."""
    rng = random.Random(seed)
    probes: dict[str, list[dict[str, Any]]] = {"length": [], "prefix": [], "target": []}
    for _ in range(n):
        question, answer = arithmetic_question(rng)
        short = short_answer(rng, answer)
        probes["length"].append({"prompt": question, "chosen": long_answer(rng, answer), "rejected": short})
        probes["prefix"].append({"prompt": question, "chosen": f"{SYCOPHANCY_PREFIX} {short}", "rejected": short})
        probes["target"].append({"prompt": question, "chosen": short, "rejected": short_answer(rng, wrong_answer(rng, answer))})
    return probes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmalign_experiments.two_bias_data", description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--n", type=int, default=64, help="main-set rows (auxiliary sets: n/2 each; probes: n/2)")
    parser.add_argument("--eps-length", type=float, default=0.25)
    parser.add_argument("--eps-prefix", type=float, default=0.25)
    parser.add_argument("--aux-share", type=float, default=0.5, help="bias share of each auxiliary set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out, half = args.out_dir, max(1, args.n // 2)
    files = {
        "main.jsonl": two_bias_pairs(args.n, eps_length=args.eps_length, eps_prefix=args.eps_prefix, seed=args.seed),
        "aux-length.jsonl": length_aux_pairs(half, bias_share=args.aux_share, seed=args.seed + 100),
        "aux-prefix.jsonl": prefix_aux_pairs(half, bias_share=args.aux_share, seed=args.seed + 200),
    }
    files.update({f"probe-{k}.jsonl": v for k, v in probe_pairs(half, seed=args.seed + 300).items()})
    for name, rows in files.items():
        print(write_jsonl(out / name, rows), f"({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
