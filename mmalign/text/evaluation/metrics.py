"""Metrics of a text policy: sampled-answer metrics (length, longer-length ratio, distinct-n, self-BLEU, predictive
entropy), RNG uniformity, preference accuracy / ECE and margin shifts on pairs, and judge win rates (SPEC §2, §5, §6)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from mmalign.shared import metrics as M
from mmalign.text.modeling.loading import load_model_for_eval
from mmalign.text.modeling.sampling import Samples, sample_completions
from mmalign.text.evaluation.judges import Judge

__all__ = ["format_prompts", "longer_length_ratio", "length_bias_metrics", "evaluate_length_bias", "answer_metrics",
           "rng_metrics", "pair_logprobs", "preference_metrics", "margin_shifts", "judge_metrics"]


def format_prompts(tokenizer, prompts: Sequence[str], *, use_chat_template: bool, system_prompt: Optional[str] = None) -> list[str]:
    """Prompt strings as the model sees them, rendered as in training (:func:`mmalign.text.data.render_prompt`:
    chat template + generation prompt when asked, HH dialogues split into turns). Chat-rendered text holds its own
    special tokens: tokenise it with ``add_special_tokens=not use_chat_template``."""
    from mmalign.text.data import render_prompt

    return [render_prompt(tokenizer, p, use_chat_template=use_chat_template, system_prompt=system_prompt)[0]
            for p in prompts]


def longer_length_ratio(lengths: Sequence[Sequence[int]], baseline_lengths: Sequence[Sequence[int]]) -> float:
    """Fraction of (prompt, i) where answer i is longer than the baseline's answer i to the same prompt."""
    if len(lengths) != len(baseline_lengths):
        raise ValueError(f"longer_length_ratio: {len(lengths)} prompts vs {len(baseline_lengths)} baseline prompts")
    pairs = [(a, b) for row, base in zip(lengths, baseline_lengths, strict=True)
             for a, b in zip(row, base, strict=True)]
    if not pairs:
        raise ValueError("longer_length_ratio: no answers")
    return sum(a > b for a, b in pairs) / len(pairs)


def length_bias_metrics(texts: Sequence[str], lengths: Sequence[int], sft_lengths: Sequence[int],
                        answers: Sequence[int]) -> dict[str, float]:
    """Length-bias metrics of one answer per question (SPEC §4): average length (tokens), longer-length ratio
    against the SFT model's answer to the same question, and target accuracy (share of answers whose numbers
    are exactly the correct one)."""
    import re

    if not (len(texts) == len(lengths) == len(answers)) or not texts:
        raise ValueError(f"length_bias_metrics: {len(texts)} texts, {len(lengths)} lengths, {len(answers)} answers")
    correct = [set(re.findall(r"-?\d+", t)) == {str(a)} for t, a in zip(texts, answers)]
    return {
        "avg_length_tokens": sum(lengths) / len(lengths),
        "longer_than_sft": longer_length_ratio([[n] for n in lengths], [[n] for n in sft_lengths]),
        "target_accuracy": sum(correct) / len(correct),
    }


def evaluate_length_bias(
    models: Mapping[str, str | Path], sft: str | Path, questions: Sequence[Mapping[str, Any]], *,
    use_chat_template: bool = True, max_new_tokens: int = 96, dtype: str = "float32", seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Greedy answers of every model (and the SFT model) to ``questions`` (rows with ``prompt`` and the correct
    integer ``answer``, e.g. from :func:`mmalign_experiments.bias_data.length_bias_pairs`), prompts rendered as in
    training. A model path may be a full model folder or a LoRA adapter folder (a LoRA run's ``final/``): the
    adapter is applied to its base model and merged before decoding. Per model (``"SFT"`` included):
    :func:`length_bias_metrics`, the first answer as ``example``, and every answer as ``answers``."""
    from mmalign.text.data import render_prompt

    def answer(path):
        model, tokenizer = load_model_for_eval(str(path), dtype=dtype)
        if hasattr(model, "merge_and_unload"):  # a PeftModel: merged weights decode faster (equal up to rounding)
            model = model.merge_and_unload().eval()
        rendered = [render_prompt(tokenizer, q["prompt"], use_chat_template=use_chat_template) for q in questions]
        out = sample_completions(model, tokenizer, [text for text, _ in rendered], n=1, max_new_tokens=max_new_tokens,
                                 temperature=0.0, seed=seed, add_special_tokens=rendered[0][1])
        return [t[0] for t in out.texts], [n[0] for n in out.num_tokens]

    correct_answers = [q["answer"] for q in questions]
    sft_texts, sft_lengths = answer(sft)
    table: dict[str, dict[str, Any]] = {}
    for name, path in {"SFT": sft, **dict(models)}.items():
        texts, lengths = (sft_texts, sft_lengths) if name == "SFT" else answer(path)
        table[name] = {**length_bias_metrics(texts, lengths, sft_lengths, correct_answers), "example": texts[0],
                       "answers": texts}
    return table


def _mean_over_prompts(fn: Callable[[list[str]], float], texts: list[list[str]]) -> Optional[float]:
    values = []
    for answers in texts:
        try:
            values.append(fn(answers))
        except ValueError:  # e.g. no bigram among very short answers, or a single answer for self-BLEU
            continue
    return sum(values) / len(values) if values else None


def answer_metrics(samples: Samples, tokenizer=None, baseline: Optional[Samples] = None) -> dict[str, Optional[float]]:
    """Length, diversity and predictive-entropy metrics of sampled answers (SPEC §4 evaluation, §6).

    distinct-n and self-BLEU are computed per prompt over its answers (with the model tokenizer's tokens when
    given, else whitespace words) and averaged over prompts; None when undefined for every prompt.
    """
    lengths = [n for row in samples.num_tokens for n in row]
    if not lengths:
        raise ValueError("answer_metrics: no samples")
    tok = (lambda text: tokenizer.tokenize(text)) if tokenizer is not None else None
    entropies = [e for row_e, row_n in zip(samples.token_entropy, samples.num_tokens) for e, n in zip(row_e, row_n) if n]
    out: dict[str, Optional[float]] = {
        "avg_length_tokens": sum(lengths) / len(lengths),
        "distinct_1": _mean_over_prompts(lambda a: M.distinct_n(a, 1, tokenizer=tok), samples.texts),
        "distinct_2": _mean_over_prompts(lambda a: M.distinct_n(a, 2, tokenizer=tok), samples.texts),
        "self_bleu": _mean_over_prompts(lambda a: M.self_bleu(a, tokenizer=tok), samples.texts),
        "predictive_entropy": sum(entropies) / len(entropies) if entropies else None,
        "finished_rate": sum(f for row in samples.finished for f in row) / len(lengths),
    }
    if baseline is not None:
        out["longer_length_ratio"] = longer_length_ratio(samples.num_tokens, baseline.num_tokens)
    return out


def rng_metrics(texts: list[list[str]], intervals: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """SPEC §6 RNG uniformity averaged over prompts, plus the per-prompt entropies (for win rates)."""
    from mmalign.text.evaluation.uniformity import Interval, summarize, uniformity_metrics

    per_prompt = [uniformity_metrics(a, Interval(lo, hi)) for a, (lo, hi) in zip(texts, intervals, strict=True)]
    return {**{f"rng/{k}": v for k, v in summarize(per_prompt).items()},
            "rng/per_prompt_entropy": [r["entropy"] for r in per_prompt]}


@torch.no_grad()
def pair_logprobs(model, tokenizer, dataset, *, batch_size: int = 8) -> dict[str, list[float]]:
    """Summed response log-likelihoods of every pair's chosen and rejected response (``chosen``, ``rejected``)
    and their token counts (``chosen_tokens``, ``rejected_tokens``), for a tokenised pair dataset
    (:func:`mmalign.text.data.load_preference_dataset`); the model is scored in eval mode."""
    from mmalign.text.data import PreferenceCollator
    from mmalign.text.modeling.logprobs import gather_groups, sequence_logprobs

    if dataset.max_group_sizes != (1, 1):
        raise ValueError("pair log-likelihoods need pairs (one chosen and one rejected per row)")
    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    device = next(model.parameters()).device
    out: dict[str, list[float]] = {"chosen": [], "rejected": [], "chosen_tokens": [], "rejected_tokens": []}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            logps, counts = sequence_logprobs(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                              batch["loss_mask"].to(device), logits_start=batch["logits_start"])
            for side in ("chosen", "rejected"):
                index = batch[f"{side}_index"].to(device)
                out[side] += gather_groups(logps, index)[:, 0].tolist()
                out[f"{side}_tokens"] += gather_groups(counts.float(), index)[:, 0].tolist()
    finally:
        model.train(was_training)
    return out


def preference_metrics(model, tokenizer, data_path: Any, *, use_chat_template: bool = False,
                       system_prompt: Optional[str] = None, max_pairs: Optional[int] = None, batch_size: int = 8,
                       ece_bins: int = 10, name: Optional[str] = None) -> dict[str, float]:
    """Preference accuracy and ECE on pairs, from length-normalised log-likelihoods (SPEC §2). ``data_path``: a file
    or folder, or in-memory rows (a ``datasets.Dataset``, a list of dicts) that ``name`` names in errors."""
    from mmalign.text.data import load_preference_dataset

    dataset = load_preference_dataset(data_path, tokenizer, max_samples=max_pairs, use_chat_template=use_chat_template,
                                      system_prompt=system_prompt, refuse_identical=False,  # scored, not trained on
                                      name=name)
    if dataset.max_group_sizes != (1, 1):
        raise ValueError(f"{name or data_path}: preference metrics need pairs (one chosen and one rejected per row)")
    scores = pair_logprobs(model, tokenizer, dataset, batch_size=batch_size)
    chosen_scores = [lp / max(n, 1) for lp, n in zip(scores["chosen"], scores["chosen_tokens"])]
    rejected_scores = [lp / max(n, 1) for lp, n in zip(scores["rejected"], scores["rejected_tokens"])]
    accuracy = sum(c > r for c, r in zip(chosen_scores, rejected_scores)) / len(chosen_scores)
    return {
        "preference/accuracy": accuracy,
        "preference/ece": M.preference_ece(chosen_scores, rejected_scores, n_bins=ece_bins),
        "preference/num_pairs": len(chosen_scores),
    }


def margin_shifts(models: Mapping[str, str | Path], sft: str | Path, data_path: str, *,
                  use_chat_template: bool = True, dtype: str = "float32") -> dict[str, dict[str, float]]:
    """How far each model moved its preference on held-out pairs, from the SFT model's: per model (``"SFT"``
    included), the mean summed log-likelihood margin ``logp(chosen) − logp(rejected)`` (nats), its shift from the
    SFT model's (paired over the same pairs, with the standard error of the per-pair shift) and the share of pairs
    whose margin rose. On pairs built to differ only in a bias (a long vs a short answer), the shift is how much of
    the bias a model learned, free of the noise of greedy decoding. Model paths as in :func:`evaluate_length_bias`."""
    from mmalign.text.data import load_preference_dataset

    def margins(path):
        model, tokenizer = load_model_for_eval(str(path), dtype=dtype)
        dataset = load_preference_dataset(data_path, tokenizer, use_chat_template=use_chat_template)
        scores = pair_logprobs(model, tokenizer, dataset)
        return [c - r for c, r in zip(scores["chosen"], scores["rejected"])]

    sft_margins = margins(sft)
    table: dict[str, dict[str, float]] = {}
    for name, path in {"SFT": sft, **dict(models)}.items():
        values = sft_margins if name == "SFT" else margins(path)
        shifts = [v - s for v, s in zip(values, sft_margins)]
        n = len(shifts)
        mean_shift = sum(shifts) / n
        spread = (sum((x - mean_shift) ** 2 for x in shifts) / max(n - 1, 1)) ** 0.5
        table[name] = {"mean_margin": sum(values) / n, "shift_from_sft": mean_shift,
                       "shift_stderr": spread / n ** 0.5, "share_rose": sum(x > 0 for x in shifts) / n, "pairs": n}
    return table


def judge_metrics(judge: Judge, prompts: Sequence[str], texts: list[list[str]], baseline_texts: list[list[str]]) -> dict[str, float]:
    """Judge scores of the model's and the baseline's i-th answers to each prompt: win rate (ties half) and the
    judge score ``50 + (n_win − n_lose)/N · 100`` (SPEC §5), plus the mean scores."""
    flat_prompts = [p for p, answers in zip(prompts, texts, strict=True) for _ in answers]
    ours = [a for answers in texts for a in answers]
    theirs = [a for answers in baseline_texts for a in answers]
    if len(ours) != len(theirs):
        raise ValueError("judge_metrics: the model and the baseline must have the same number of answers per prompt")
    a = [float(s) for s in judge(flat_prompts, ours)]
    b = [float(s) for s in judge(flat_prompts, theirs)]
    if len(a) != len(ours) or len(b) != len(theirs):
        raise ValueError("judge: returned a different number of scores than responses")
    n_win = sum(x > y for x, y in zip(a, b))
    n_lose = sum(x < y for x, y in zip(a, b))
    return {
        "judge/win_rate": M.win_rate(a, b),
        "judge/score": M.judge_score(n_win, n_lose, len(a)),
        "judge/mean": sum(a) / len(a),
        "judge/baseline_mean": sum(b) / len(b),
    }
