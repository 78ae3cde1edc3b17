"""Golden values of the shared metrics (SPEC §2, §5, §6), each computed by hand in the comment beside it."""

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch

from mmalign.shared.metrics import (
    distinct_n,
    entropy,
    expected_calibration_error,
    judge_score,
    kl_to_uniform,
    mean_simpson_index,
    preference_ece,
    self_bleu,
    simpson_index,
    win_rate,
)


# -- Simpson -------------------------------------------------------------------------------------------------------
def test_simpson_index_golden_values():
    assert simpson_index(["m", "m", "m", "m"]) == 0.0
    assert simpson_index(["m", "m", "f", "f"]) == pytest.approx(0.5)  # 1 − (½² + ½²)
    assert simpson_index(["a", "b", "c"]) == pytest.approx(2 / 3)  # maximum 1 − 1/C
    assert simpson_index(["m", "m", "m", "f"]) == pytest.approx(0.375)  # 1 − (9/16 + 1/16)


def test_simpson_index_accepts_arrays_and_tensors_and_returns_float():
    for labels in (np.array([0, 0, 0, 1]), torch.tensor([0, 0, 0, 1]), (0, 0, 0, 1)):
        value = simpson_index(labels)
        assert type(value) is float and value == pytest.approx(0.375)


def test_mean_simpson_index_is_unweighted_over_groups():
    # group a: 1 − (¼ + ¼) = ½ ; group b (larger): 0 → mean ¼ whatever the group sizes
    assert mean_simpson_index({"a": ["m", "f"], "b": ["m"] * 10}) == pytest.approx(0.25)
    assert mean_simpson_index([["m", "f"], ["m", "m"]]) == pytest.approx(0.25)


def test_simpson_errors_are_clear():
    with pytest.raises(ValueError, match="empty"):
        simpson_index([])
    with pytest.raises(ValueError, match="label 1 is None"):
        simpson_index(["m", None])
    with pytest.raises(ValueError, match="group 'nurse'.*empty"):
        mean_simpson_index({"doctor": ["m"], "nurse": []})
    with pytest.raises(ValueError, match="no groups"):
        mean_simpson_index({})


# -- distinct-n ----------------------------------------------------------------------------------------------------
def test_distinct_n_golden_values():
    texts = ["a b a", "b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 5)  # {a, b, c} / [a b a b c]
    assert distinct_n(texts, 2) == pytest.approx(1.0)  # (a b), (b a), (b c): all distinct
    assert distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)  # (a a) three times
    # a custom tokenizer: characters
    assert distinct_n(["aab"], 1, tokenizer=list) == pytest.approx(2 / 3)


def test_distinct_n_errors():
    with pytest.raises(ValueError, match="empty"):
        distinct_n([], 1)
    with pytest.raises(ValueError, match="no text has 3 or more tokens"):
        distinct_n(["a b", "c"], 3)
    with pytest.raises(ValueError, match="positive integer"):
        distinct_n(["a b"], 0)
    with pytest.raises(ValueError, match="not a string"):
        distinct_n(["a", 3], 1)


# -- self-BLEU -----------------------------------------------------------------------------------------------------
def test_self_bleu_symmetric_pair_by_hand():
    # "a b c" vs "a b d": p1 = 2/3, p2 = (1 + 1)/(2 + 1) = 2/3 (BLEU+1), BP = 1 → BLEU = 2/3 both ways
    assert self_bleu(["a b c", "a b d"], max_n=2) == pytest.approx(2 / 3)


def test_self_bleu_clipping_brevity_and_zero_match_by_hand():
    texts = ["the the the", "the cat", "a dog sat"]
    # text 0: "the" clipped to 1 (best single reference) → p1 = 1/3; p2 = (0+1)/(2+1); r = 3 = c → BP 1
    bleu0 = math.sqrt(1 / 3 * 1 / 3)
    # text 1: p1 = 1/2, p2 = (0+1)/(1+1); refs have 3 tokens, c = 2 → BP = exp(1 − 3/2)
    bleu1 = math.exp(-0.5) * math.sqrt(0.5 * 0.5)
    # text 2: no unigram in common with the others → 0
    assert self_bleu(texts, max_n=2) == pytest.approx((bleu0 + bleu1 + 0.0) / 3)


def test_self_bleu_identical_texts_score_one_and_disjoint_zero():
    assert self_bleu(["x y z w"] * 3) == pytest.approx(1.0)
    assert self_bleu(["a b", "c d", "e f"]) == 0.0


def _naive_self_bleu(texts, max_n):
    """Direct O(N²) reference implementation of the documented definition, to check the fast path."""
    tokens = [t.split() for t in texts]
    scores = []
    for i, hyp in enumerate(tokens):
        refs = [r for j, r in enumerate(tokens) if j != i]
        if not hyp:
            scores.append(0.0)
            continue
        logp = 0.0
        for n in range(1, max_n + 1):
            grams = Counter(tuple(hyp[k : k + n]) for k in range(len(hyp) - n + 1))
            best = Counter()
            for ref in refs:
                for g, c in Counter(tuple(ref[k : k + n]) for k in range(len(ref) - n + 1)).items():
                    best[g] = max(best[g], c)
            match = sum(min(c, best[g]) for g, c in grams.items())
            total = sum(grams.values())
            if n == 1:
                if match == 0:
                    logp = -math.inf
                    break
                logp += math.log(match / total)
            else:
                logp += math.log((match + 1) / (total + 1))
        if logp == -math.inf:
            scores.append(0.0)
            continue
        r = min((abs(len(ref) - len(hyp)), len(ref)) for ref in refs)[1]
        bp = 1.0 if len(hyp) > r else math.exp(1 - r / len(hyp))
        scores.append(bp * math.exp(logp / max_n))
    return sum(scores) / len(scores)


def test_self_bleu_matches_a_naive_implementation_on_random_texts():
    rng = random.Random(0)
    vocab = "a b c d e f".split()
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 9))) for _ in range(25)]
    assert self_bleu(texts) == pytest.approx(_naive_self_bleu(texts, 4), rel=1e-12)


def test_self_bleu_errors():
    with pytest.raises(ValueError, match="at least two texts"):
        self_bleu(["only one"])
    with pytest.raises(ValueError, match="sequence of strings"):
        self_bleu("a single string")


# -- entropy and KL ------------------------------------------------------------------------------------------------
def test_entropy_golden_values():
    # counts [1, 1, 2, 0] → p = (¼, ¼, ½): H = 1.5 bits = 1.5 ln 2 nats; the zero count is harmless
    assert entropy([1, 1, 2, 0], base=2) == pytest.approx(1.5)
    assert entropy([1, 1, 2, 0]) == pytest.approx(1.5 * math.log(2))
    assert entropy(np.array([0.25, 0.25, 0.5])) == pytest.approx(1.5 * math.log(2))
    assert entropy(torch.tensor([5.0])) == 0.0
    assert entropy([1, 1, 1, 1], base=2) == pytest.approx(2.0)


def test_kl_to_uniform_golden_values():
    assert kl_to_uniform([2, 0, 0, 0]) == pytest.approx(math.log(4))  # all mass on one of 4
    assert kl_to_uniform([3, 3, 3]) == pytest.approx(0.0, abs=1e-15)
    # two observed values out of 4 allowed: log 4 − log 2
    assert kl_to_uniform([1, 1], support_size=4) == pytest.approx(math.log(2))
    assert kl_to_uniform([1, 1], support_size=4, base=2) == pytest.approx(1.0)


def test_distribution_errors():
    with pytest.raises(ValueError, match="non-negative"):
        entropy([1, -1])
    with pytest.raises(ValueError, match="all entries are zero"):
        entropy([0, 0])
    with pytest.raises(ValueError, match="empty"):
        entropy([])
    with pytest.raises(ValueError, match="NaN"):
        entropy([1.0, float("nan")])
    with pytest.raises(ValueError, match="support_size=2"):
        kl_to_uniform([1, 1, 1], support_size=2)
    with pytest.raises(ValueError, match="base"):
        entropy([1, 1], base=1)


# -- calibration ---------------------------------------------------------------------------------------------------
def test_expected_calibration_error_golden_value():
    # bin [0.9, 1.0]: conf 0.9, acc ½ → 0.4 × 2/5 ; bin [0.6, 0.7): conf 0.6, acc ⅔ → 1/15 × 3/5 ; total 0.2
    assert expected_calibration_error([0.9, 0.9, 0.6, 0.6, 0.6], [1, 0, 1, 1, 0]) == pytest.approx(0.2)


def test_ece_bins_are_left_closed_with_1_in_the_last_bin():
    # 0.6 sits in [0.6, 0.7) with 0.65 (not with 0.55): conf mean 0.625, acc 1 → ECE 0.375
    assert expected_calibration_error([0.6, 0.65], [True, True]) == pytest.approx(0.375)
    # 1.0 shares the last bin with 0.9: conf mean 0.95, acc ½ → 0.45
    assert expected_calibration_error(torch.tensor([1.0, 0.9]), torch.tensor([1, 0])) == pytest.approx(0.45)
    assert expected_calibration_error([0.5, 1.0], [0, 1], n_bins=1) == pytest.approx(0.25)


def test_preference_ece_by_hand():
    # margin 0: p = ½, predicts chosen (tie rule), correct, bin [0.5, 0.6): |1 − ½| ; margin 2: p = σ(2), correct
    expected = 0.5 * 0.5 + 0.5 * (1 - 1 / (1 + math.exp(-2)))
    assert preference_ece([0.0, 2.0], [0.0, 0.0]) == pytest.approx(expected)
    # a wrong-way confident prediction: p(chosen) = σ(−3) → predicts rejected with conf σ(3), wrong
    assert preference_ece([0.0], [3.0]) == pytest.approx(1 / (1 + math.exp(-3)))


def test_ece_errors():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.2], [1])
    with pytest.raises(ValueError, match="booleans or 0/1"):
        expected_calibration_error([0.5], [2])
    with pytest.raises(ValueError, match="2 items but correct has 1"):
        expected_calibration_error([0.5, 0.7], [1])


# -- comparisons ---------------------------------------------------------------------------------------------------
def test_judge_score():
    assert judge_score(6, 2, 10) == pytest.approx(90.0)  # 50 + 4/10·100
    assert judge_score(0, 0, 7) == 50.0
    assert judge_score(0, 10, 10) == -50.0
    with pytest.raises(ValueError, match="exceeds"):
        judge_score(6, 6, 10)
    with pytest.raises(ValueError, match="positive integer"):
        judge_score(0, 0, 0)


def test_win_rate_counts_ties_as_half():
    # wins: 2 > 1 ; tie: 1 = 1 ; loss: 3 < 4 → (1 + ½) / 3
    assert win_rate([1, 2, 3], [1, 1, 4]) == pytest.approx(0.5)
    assert win_rate(np.array([2.0, 2.0]), torch.tensor([1.0, 1.0])) == 1.0
    with pytest.raises(ValueError, match="paired"):
        win_rate([1, 2], [1])
    with pytest.raises(ValueError, match="empty"):
        win_rate([], [])


# -- frequency_gap (sail-sg bias gap) ------------------------------------------------------------------------------
def test_frequency_gap_on_hand_made_label_sets():
    from mmalign.shared.metrics import frequency_gap

    assert frequency_gap(["male", "female"] * 3, ["male", "female"]) == pytest.approx(0.0)
    assert frequency_gap(["male"] * 5, ["male", "female"]) == pytest.approx(1.0)
    assert frequency_gap(["male", "male", "male", "female"], ["male", "female"]) == pytest.approx(0.5)
    # three races: shares 1/2, 1/2, 0 -> pairs |0|, |1/2|, |1/2| -> 1/3
    assert frequency_gap(["white", "black"], ["white", "black", "asian"]) == pytest.approx(1 / 3)
    # one class only: every pair involving it differs by 1, the others by 0 -> 2/3
    assert frequency_gap(["white"] * 4, ["white", "black", "asian"]) == pytest.approx(2 / 3)


def test_frequency_gap_refuses_unknown_labels_and_tiny_supports():
    from mmalign.shared.metrics import frequency_gap

    with pytest.raises(ValueError, match="not among the classes"):
        frequency_gap(["male", "robot"], ["male", "female"])
    with pytest.raises(ValueError, match="at least 2 classes"):
        frequency_gap(["male"], ["male"])
    with pytest.raises(ValueError):
        frequency_gap([], ["male", "female"])
