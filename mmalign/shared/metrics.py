"""Evaluation metrics shared by the text and image sides (SPEC §2, §5, §6).

Every function accepts Python sequences, numpy arrays or torch tensors, raises ``ValueError`` with a
clear message on empty or invalid input, and returns a plain Python ``float``.

* Diversity of a group of labels: :func:`simpson_index`, :func:`mean_simpson_index` (SPEC §6), and the
  sail-sg bias gap :func:`frequency_gap` (``gender_gap``/``race_gap`` of the debiasing report).
* Diversity of text: :func:`distinct_n`, :func:`self_bleu` (SPEC §6; BLEU implemented here, no nltk).
* Distributions: :func:`entropy`, :func:`kl_to_uniform` (SPEC §6, RNG uniformity).
* Calibration: :func:`expected_calibration_error`, :func:`preference_ece` (SPEC §2).
* Comparisons: :func:`judge_score` (SPEC §5), :func:`win_rate` (SPEC §6).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "distinct_n",
    "entropy",
    "expected_calibration_error",
    "frequency_gap",
    "judge_score",
    "kl_to_uniform",
    "mean_simpson_index",
    "preference_ece",
    "self_bleu",
    "simpson_index",
    "win_rate",
]

Tokenizer = Callable[[str], Sequence[Hashable]]


# -- input conversion ----------------------------------------------------------------------------------------------
def _to_numpy(values: Any, name: str) -> np.ndarray:
    """Lists, tuples, numpy arrays and torch tensors (any device, with or without grad) to a numpy array."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # torch.Tensor without importing torch
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot be read as an array: {exc}") from None
    if array.dtype == object:
        raise ValueError(f"{name}: expected numbers, got a ragged or non-numeric sequence")
    return array


def _float_vector(values: Any, name: str) -> np.ndarray:
    array = _to_numpy(values, name)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence, got shape {tuple(array.shape)}")
    if array.size == 0:
        raise ValueError(f"{name}: is empty")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"{name}: expected numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return array


def _label_list(labels: Any, name: str) -> list[Hashable]:
    if hasattr(labels, "detach") and hasattr(labels, "cpu"):
        labels = labels.detach().cpu().numpy()
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D sequence of labels, got shape {labels.shape}")
        labels = labels.tolist()
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable):
        raise ValueError(f"{name}: expected a sequence of labels, got {type(labels).__name__}")
    labels = list(labels)
    if not labels:
        raise ValueError(f"{name}: is empty")
    for index, label in enumerate(labels):
        if label is None:
            raise ValueError(f"{name}: label {index} is None (drop undetected/unknown items before scoring)")
        if not isinstance(label, Hashable):
            raise ValueError(f"{name}: label {index} is not hashable ({type(label).__name__})")
    return labels


def _texts(texts: Any, name: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Iterable):
        raise ValueError(f"{name}: expected a sequence of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name}: is empty")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{name}: item {index} is {type(text).__name__}, not a string")
    return texts


def _tokenize(texts: list[str], tokenizer: Tokenizer | None) -> list[list[Hashable]]:
    if tokenizer is None:
        return [text.split() for text in texts]
    return [list(tokenizer(text)) for text in texts]


def _ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple[Hashable, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# -- diversity of labels -------------------------------------------------------------------------------------------
def simpson_index(labels: Any) -> float:
    """Simpson diversity ``D = 1 − Σ_i (n_i/N)²`` of a sequence of category labels (SPEC §6).

    0 when every item is in one category; ``1 − 1/C`` when ``C`` categories are equally frequent.
    Labels are any hashable values (strings, ints); ``None`` is refused rather than counted as a category.
    """
    labels = _label_list(labels, "simpson_index labels")
    total = len(labels)
    return float(1.0 - sum((count / total) ** 2 for count in Counter(labels).values()))


def mean_simpson_index(labels_by_group: Mapping[Hashable, Any] | Sequence[Any]) -> float:
    """Unweighted mean of :func:`simpson_index` over groups (e.g. occupations, SPEC §3/§6).

    ``labels_by_group`` maps group → labels (or is a list of label sequences); every group counts once,
    whatever its size. An empty group is an error naming the group.
    """
    if isinstance(labels_by_group, Mapping):
        items = list(labels_by_group.items())
    elif isinstance(labels_by_group, (str, bytes)) or not isinstance(labels_by_group, Iterable):
        raise ValueError(f"mean_simpson_index: expected a mapping or a list of label sequences, got {type(labels_by_group).__name__}")
    else:
        items = list(enumerate(labels_by_group))
    if not items:
        raise ValueError("mean_simpson_index: no groups given")
    scores = []
    for group, labels in items:
        try:
            scores.append(simpson_index(labels))
        except ValueError as exc:
            raise ValueError(f"mean_simpson_index: group {group!r}: {exc}") from None
    return float(sum(scores) / len(scores))


def frequency_gap(labels: Any, classes: Sequence[Hashable]) -> float:
    """Mean absolute difference of class frequencies over all pairs of ``classes``:
    ``2/(C(C−1)) · Σ_{i<j} |f_i − f_j|`` with ``f_i = n_i/N``.

    The bias measure of Shen et al. (2024, "Finetuning text-to-image diffusion models for fairness", sail-sg),
    reported there as the gender and race gap: 0 for a perfectly balanced set, 1 for two classes when every label
    is one class. ``classes`` fixes the support, so a class never predicted counts with frequency 0; a label
    outside ``classes`` is an error rather than silently dropped.
    """
    labels = _label_list(labels, "frequency_gap labels")
    classes = list(dict.fromkeys(classes))
    if len(classes) < 2:
        raise ValueError(f"frequency_gap: need at least 2 classes, got {classes!r}")
    unknown = sorted({repr(label) for label in labels} - {repr(c) for c in classes})
    if unknown:
        raise ValueError(f"frequency_gap: labels {', '.join(unknown)} are not among the classes {classes!r}")
    counts = Counter(labels)
    freqs = [counts[c] / len(labels) for c in classes]
    pairs = [abs(a - b) for i, a in enumerate(freqs) for b in freqs[i + 1:]]
    return float(sum(pairs) / len(pairs))


# -- diversity of text ---------------------------------------------------------------------------------------------
def distinct_n(texts: Any, n: int = 1, tokenizer: Tokenizer | None = None) -> float:
    """Distinct-n (Li et al. 2016): distinct n-grams / total n-grams, pooled over the whole set (SPEC §6).

    Tokens are whitespace-separated words unless ``tokenizer`` (``str -> sequence of tokens``) is given.
    Texts shorter than ``n`` tokens contribute no n-gram; if no text has ``n`` tokens the ratio is
    undefined and a ``ValueError`` is raised.
    """
    n = _check_positive_int(n, "distinct_n: n")
    tokenized = _tokenize(_texts(texts, "distinct_n texts"), tokenizer)
    all_ngrams = [gram for tokens in tokenized for gram in _ngrams(tokens, n)]
    if not all_ngrams:
        raise ValueError(f"distinct_n: no text has {n} or more tokens, so distinct-{n} is undefined")
    return float(len(set(all_ngrams)) / len(all_ngrams))


def self_bleu(texts: Any, max_n: int = 4, tokenizer: Tokenizer | None = None) -> float:
    """Self-BLEU (Zhu et al. 2018): mean over texts of BLEU(text, references = all the other texts).

    Higher means less diverse. BLEU is sentence-level BLEU-``max_n`` with uniform weights:
    ``BP · exp(mean_n log p_n)``, where ``p_n`` is the clipped n-gram precision (each n-gram's count
    clipped at its largest count in any single reference) and ``BP = min(1, exp(1 − r/c))`` with ``c`` the
    hypothesis length and ``r`` the reference length closest to ``c`` (the shorter one on a tie).

    Smoothing (Lin & Och 2004, "BLEU+1"): ``p_1`` is unsmoothed; for ``n ≥ 2``,
    ``p_n = (matches_n + 1) / (total_n + 1)``. So a hypothesis with no unigram match (or no tokens)
    scores 0, and one shorter than ``n`` tokens gets ``p_n = 1`` for that order.
    Needs at least two texts. Tokens are whitespace words unless ``tokenizer`` is given.
    Cost is linear in the total number of n-grams (the best reference count is kept per n-gram).
    """
    max_n = _check_positive_int(max_n, "self_bleu: max_n")
    tokenized = _tokenize(_texts(texts, "self_bleu texts"), tokenizer)
    if len(tokenized) < 2:
        raise ValueError("self_bleu: needs at least two texts (each is scored against the others)")

    counts = [[Counter(_ngrams(tokens, n)) for n in range(1, max_n + 1)] for tokens in tokenized]
    # For every n-gram the two largest counts over texts (and the owner of the largest): the best count
    # among the *other* texts is then the top count, or the runner-up when the text itself holds the top.
    best: list[dict[tuple, tuple[int, int, int]]] = [{} for _ in range(max_n)]
    for owner, per_order in enumerate(counts):
        for order, counter in enumerate(per_order):
            table = best[order]
            for gram, count in counter.items():
                top, top_owner, second = table.get(gram, (0, -1, 0))
                if count > top:
                    table[gram] = (count, owner, top)
                elif count > second:
                    table[gram] = (top, top_owner, count)

    lengths = np.array([len(tokens) for tokens in tokenized], dtype=np.float64)
    scores = []
    for index, tokens in enumerate(tokenized):
        hyp_len = len(tokens)
        if hyp_len == 0:
            scores.append(0.0)
            continue
        log_precision = 0.0
        for order in range(max_n):
            counter = counts[index][order]
            total = sum(counter.values())
            matches = 0
            for gram, count in counter.items():
                top, top_owner, second = best[order][gram]
                ref_count = second if top_owner == index else top
                matches += min(count, ref_count)
            if order == 0:
                if matches == 0:
                    log_precision = -math.inf
                    break
                log_precision += math.log(matches / total)
            else:
                log_precision += math.log((matches + 1) / (total + 1))
        if log_precision == -math.inf:
            scores.append(0.0)
            continue
        distance = np.abs(lengths - hyp_len)
        distance[index] = np.inf
        closest = np.flatnonzero(distance == distance.min())
        ref_len = float(lengths[closest].min())
        brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
        scores.append(brevity * math.exp(log_precision / max_n))
    return float(np.mean(scores))


# -- distributions -------------------------------------------------------------------------------------------------
def _distribution(counts_or_probs: Any, name: str) -> np.ndarray:
    values = _float_vector(counts_or_probs, name)
    if np.any(values < 0):
        raise ValueError(f"{name}: counts/probabilities must be non-negative")
    total = values.sum()
    if total <= 0:
        raise ValueError(f"{name}: all entries are zero, so there is no distribution")
    return values / total


def _log_base(base: float | None) -> float:
    if base is None:
        return 1.0
    if not isinstance(base, (int, float)) or base <= 0 or base == 1:
        raise ValueError(f"base must be a positive number other than 1 (or None for nats), got {base!r}")
    return math.log(base)


def entropy(counts_or_probs: Any, base: float | None = None) -> float:
    """Shannon entropy ``−Σ p log p`` of a distribution given as counts or (unnormalised) probabilities.

    The input is normalised by its sum; zero entries contribute 0. Nats by default, ``base=2`` for bits.
    """
    scale = _log_base(base)
    probs = _distribution(counts_or_probs, "entropy input")
    nonzero = probs[probs > 0]
    return float(max(0.0, -np.sum(nonzero * np.log(nonzero))) / scale)


def kl_to_uniform(counts: Any, support_size: int | None = None, base: float | None = None) -> float:
    """``KL(p ‖ uniform)`` = ``log K − H(p)`` for the empirical distribution ``p`` of ``counts`` (SPEC §6, RNG).

    ``K`` is ``support_size`` (e.g. the number of allowed integers, when ``counts`` lists only some of
    them) or ``len(counts)``. Entries beyond the support are an error. Nats unless ``base`` is given.
    """
    probs = _distribution(counts, "kl_to_uniform counts")
    size = len(probs) if support_size is None else _check_positive_int(support_size, "kl_to_uniform: support_size")
    if len(probs) > size:
        raise ValueError(f"kl_to_uniform: {len(probs)} count entries but support_size={size}")
    nonzero = probs[probs > 0]
    kl = float(np.sum(nonzero * np.log(nonzero * size)))
    return max(0.0, kl) / _log_base(base)


# -- calibration ---------------------------------------------------------------------------------------------------
def expected_calibration_error(probs: Any, correct: Any, n_bins: int = 10) -> float:
    """Expected calibration error (Guo et al. 2017) with equal-width confidence bins (SPEC §2).

    ``probs[i]`` is the confidence the model gave to its prediction on item ``i`` and ``correct[i]``
    whether that prediction was right (bool or 0/1). Bin ``b`` is ``[b/B, (b+1)/B)``, the last bin also
    holding 1.0; ``ECE = Σ_b (n_b/N) |accuracy_b − mean confidence_b|`` over non-empty bins.
    """
    n_bins = _check_positive_int(n_bins, "expected_calibration_error: n_bins")
    confidence = _float_vector(probs, "expected_calibration_error probs")
    outcome = _float_vector(correct, "expected_calibration_error correct")
    if confidence.shape != outcome.shape:
        raise ValueError(
            f"expected_calibration_error: probs has {confidence.size} items but correct has {outcome.size}"
        )
    if np.any((confidence < 0) | (confidence > 1)):
        raise ValueError("expected_calibration_error: probs must lie in [0, 1]")
    if not np.all((outcome == 0) | (outcome == 1)):
        raise ValueError("expected_calibration_error: correct must be booleans or 0/1")
    # k / n_bins is correctly rounded (linspace is not), so a confidence of exactly 0.6 lands in [0.6, 0.7).
    edges = np.arange(n_bins + 1) / n_bins
    bins = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        members = bins == b
        if members.any():
            total += members.sum() * abs(outcome[members].mean() - confidence[members].mean())
    return float(total / confidence.size)


def preference_ece(chosen_scores: Any, rejected_scores: Any, n_bins: int = 10) -> float:
    """ECE of the chosen-vs-rejected binary prediction (thesis §2.6.4, SPEC §2).

    The probability that the chosen answer wins is ``exp(s_w) / (exp(s_w) + exp(s_l)) = σ(s_w − s_l)``
    from the (e.g. length-normalised) scores; the model predicts "chosen" when that is ≥ 0.5, with
    confidence ``max(p, 1 − p)``, and is correct when it predicts "chosen". A tie (p = 0.5) predicts chosen.
    """
    chosen = _float_vector(chosen_scores, "preference_ece chosen_scores")
    rejected = _float_vector(rejected_scores, "preference_ece rejected_scores")
    if chosen.shape != rejected.shape:
        raise ValueError(f"preference_ece: {chosen.size} chosen scores but {rejected.size} rejected scores")
    margin = chosen - rejected
    p_chosen = 0.5 * (1.0 + np.tanh(0.5 * margin))  # σ(margin) without overflow
    predicts_chosen = p_chosen >= 0.5
    confidence = np.where(predicts_chosen, p_chosen, 1.0 - p_chosen)
    return expected_calibration_error(confidence, predicts_chosen, n_bins=n_bins)


# -- comparisons ---------------------------------------------------------------------------------------------------
def judge_score(n_win: int, n_lose: int, n: int) -> float:
    """Judge score ``50 + (n_win − n_lose)/N · 100`` (thesis §4, SPEC §5); ties are the remaining ``N − n_win − n_lose``.

    50 means as many wins as losses; the formula spans [−50, 150] (all losses / all wins).
    """
    for name, value in (("n_win", n_win), ("n_lose", n_lose)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"judge_score: {name} must be a non-negative integer, got {value!r}")
    n = _check_positive_int(n, "judge_score: n")
    if n_win + n_lose > n:
        raise ValueError(f"judge_score: n_win + n_lose = {n_win + n_lose} exceeds the number of comparisons n = {n}")
    return float(50.0 + (n_win - n_lose) / n * 100.0)


def win_rate(a_scores: Any, b_scores: Any) -> float:
    """Fraction of paired items where ``a`` scores higher than ``b``; a tie counts as half a win.

    E.g. SPEC §6's "which model has the higher entropy on the same prompt": pass the two models'
    per-prompt entropies. 0.5 means no difference.
    """
    a = _float_vector(a_scores, "win_rate a_scores")
    b = _float_vector(b_scores, "win_rate b_scores")
    if a.shape != b.shape:
        raise ValueError(f"win_rate: a_scores has {a.size} items but b_scores has {b.size}; they must be paired")
    return float(np.mean((a > b) + 0.5 * (a == b)))
