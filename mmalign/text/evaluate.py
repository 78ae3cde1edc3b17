"""Evaluating a text policy: sampled-answer metrics, preference accuracy/calibration, judges (SPEC §2, §5, §6).

    python -m mmalign.text.evaluate --config eval.yaml [--set sampling.num_samples=8]

Metrics (all computed with :mod:`mmalign.shared.metrics`):

- on sampled answers (``sampling``: temperature, top-p, n per prompt, seed, batch): average answer length in
  tokens; longer-length ratio against a baseline model's answers (fraction of (prompt, i) where the model's i-th
  answer is longer than the baseline's i-th, SPEC §4 evaluation); distinct-1/2 and self-BLEU over each prompt's
  answers (averaged over prompts); predictive entropy = mean entropy of the sampling distribution over the
  sampled tokens (SPEC §6);
- RNG uniformity (SPEC §6) when the prompt rows carry integer ``low`` and ``high`` columns (see
  :mod:`mmalign.text.rng`): entropy, KL to uniform and out-of-range rate of the answers;
- on a preference test set (pairs): preference accuracy and the ECE of the chosen-vs-rejected prediction, whose
  probability is ``σ(s_w − s_l)`` from the length-normalised log-likelihoods ``s = logp_θ(x, y)/|y|`` (SPEC §2);
- with a judge (any callable ``(prompts, responses) -> scores`` or a local reward-model folder): win rate
  against the baseline's answers and the judge score ``50 + (n_win − n_lose)/N · 100`` (SPEC §5).

A model path may be a LoRA adapter folder (e.g. a training run's ``final/``): its base model is loaded and the
adapter applied.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from mmalign.config import add_config_arguments, config_from_args, config_help, load_config, save_config
from mmalign.io import atomic_write_text
from mmalign.shared import metrics as M
from mmalign.text.sampling import Samples, sample_completions

__all__ = [
    "SamplingConfig",
    "EvaluateConfig",
    "Judge",
    "RewardModelJudge",
    "load_judge",
    "load_model_for_eval",
    "format_prompts",
    "answer_metrics",
    "longer_length_ratio",
    "length_bias_metrics",
    "evaluate_length_bias",
    "rng_metrics",
    "preference_metrics",
    "judge_metrics",
    "evaluate",
    "main",
]

logger = logging.getLogger("mmalign.text.evaluate")

Judge = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


@dataclass
class SamplingConfig:
    num_samples: int = field(default=4, metadata={"help": "answers sampled per prompt"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens per answer"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature; 0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    seed: int = field(default=0, metadata={"help": "sampling seed (the same for the model and the baseline)"})
    batch_size: int = field(default=32, metadata={"help": "sequences decoded together"})

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("sampling: num_samples, max_new_tokens and batch_size must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling: need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


@dataclass
class EvaluateConfig:
    """Evaluation of one model (optionally against a baseline)."""

    model: str = field(metadata={"help": "model folder or hub name, or a LoRA adapter folder (a run's final/)"})
    baseline: Optional[str] = field(
        default=None, metadata={"help": "baseline model (e.g. the SFT model) for the longer-length ratio and judge win rate"}
    )
    prompts: Optional[str] = field(
        default=None,
        metadata={"help": "JSON/JSONL file of rows with a 'prompt' string (optional integer 'low'/'high' for RNG metrics)"},
    )
    preference_data: Optional[str] = field(
        default=None, metadata={"help": "preference test set (pairs: prompt/chosen/rejected) for accuracy and ECE"}
    )
    max_prompts: Optional[int] = field(default=None, metadata={"help": "use only the first N prompts"})
    max_pairs: Optional[int] = field(default=None, metadata={"help": "use only the first N preference pairs"})
    use_chat_template: bool = field(default=False, metadata={"help": "render prompts with the tokenizer's chat template"})
    system_prompt: Optional[str] = field(default=None, metadata={"help": "system message for chat-templated prompts"})
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"help": "answer sampling"})
    judge: Optional[str] = field(
        default=None,
        metadata={"help": "reward-model folder (sequence classification) or 'package.module:function' returning "
                  "scores for (prompts, responses)"},
    )
    ece_bins: int = field(default=10, metadata={"help": "equal-width bins of the ECE"})
    batch_size: int = field(default=8, metadata={"help": "pairs per forward when scoring the preference set"})
    num_threads: Optional[int] = field(default=None, metadata={"help": "torch CPU threads"})
    output_dir: str = field(default="outputs/text-eval", metadata={"help": "writes results.json and samples.jsonl"})

    def __post_init__(self) -> None:
        if self.prompts is None and self.preference_data is None:
            raise ValueError("nothing to evaluate: set prompts and/or preference_data")
        if self.ece_bins < 1 or self.batch_size < 1:
            raise ValueError("ece_bins and batch_size must be >= 1")


# ------------------------------------------------------------------------------------------------ loading
def load_model_for_eval(path: str, *, dtype: str = "float32"):
    """(model, tokenizer) from a model folder/hub name, or from a LoRA adapter folder (base + adapter)."""
    from mmalign.text.models import load_causal_lm, load_tokenizer

    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        base_path = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base_path:
            raise ValueError(f"{adapter_config}: no base_model_name_or_path; cannot find the base model")
        model = PeftModel.from_pretrained(load_causal_lm(base_path, dtype=dtype), path)
        tokenizer_source = path if (Path(path) / "tokenizer_config.json").is_file() else base_path
        tokenizer = load_tokenizer(tokenizer_source)
    else:
        model, tokenizer = load_causal_lm(path, dtype=dtype), load_tokenizer(path)
    model.eval()
    return model, tokenizer


class RewardModelJudge:
    """A local reward model (``AutoModelForSequenceClassification``, one logit) scoring ``prompt + response``."""

    def __init__(self, path: str, *, batch_size: int = 8, max_length: int = 1024):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.model.config.num_labels != 1:
            raise ValueError(f"{path}: a reward model needs num_labels=1, got {self.model.config.num_labels}")
        self.batch_size = batch_size
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        scores: list[float] = []
        texts = [p + r for p, r in zip(prompts, responses, strict=True)]
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length)
            scores.extend(self.model(**enc).logits[:, 0].float().tolist())
        return scores


def load_judge(spec: Union[str, Judge]) -> Judge:
    """A judge from a callable, a reward-model folder, or ``'package.module:function'``."""
    if callable(spec):
        return spec
    if Path(spec).is_dir():
        return RewardModelJudge(spec)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            target = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"judge {spec!r}: cannot import ({err})") from None
        if not callable(target):
            raise ValueError(f"judge {spec!r} is not callable")
        return target
    raise ValueError(f"judge {spec!r}: expected a reward-model folder or 'package.module:function'")


# ------------------------------------------------------------------------------------------------ metrics
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
    integer ``answer``, e.g. from :func:`mmalign.text.bias_data.length_bias_pairs`), prompts rendered as in
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
    from mmalign.text.rng import Interval, summarize, uniformity_metrics

    per_prompt = [uniformity_metrics(a, Interval(lo, hi)) for a, (lo, hi) in zip(texts, intervals, strict=True)]
    return {**{f"rng/{k}": v for k, v in summarize(per_prompt).items()},
            "rng/per_prompt_entropy": [r["entropy"] for r in per_prompt]}


@torch.no_grad()
def pair_logprobs(model, tokenizer, dataset, *, batch_size: int = 8) -> dict[str, list[float]]:
    """Summed response log-likelihoods of every pair's chosen and rejected response (``chosen``, ``rejected``)
    and their token counts (``chosen_tokens``, ``rejected_tokens``), for a tokenised pair dataset
    (:func:`mmalign.text.data.load_preference_dataset`); the model is scored in eval mode."""
    from mmalign.text.data import PreferenceCollator
    from mmalign.text.logprobs import gather_groups, sequence_logprobs

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


def preference_metrics(model, tokenizer, data_path: str, *, use_chat_template: bool = False,
                       system_prompt: Optional[str] = None, max_pairs: Optional[int] = None, batch_size: int = 8,
                       ece_bins: int = 10) -> dict[str, float]:
    """Preference accuracy and ECE on pairs, from length-normalised log-likelihoods (SPEC §2)."""
    from mmalign.text.data import load_preference_dataset

    dataset = load_preference_dataset(data_path, tokenizer, max_samples=max_pairs, use_chat_template=use_chat_template,
                                      system_prompt=system_prompt)
    if dataset.max_group_sizes != (1, 1):
        raise ValueError(f"{data_path}: preference metrics need pairs (one chosen and one rejected per row)")
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


# ------------------------------------------------------------------------------------------------ running
def _read_prompt_rows(path: str, limit: Optional[int]) -> list[dict[str, Any]]:
    from mmalign.text.data import load_rows

    rows = list(load_rows(path, max_samples=limit))
    for i, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}: row {i + 1}: field 'prompt': expected a string, got {row.get('prompt')!r}")
        for name in ("low", "high"):
            if name in row and row[name] is not None and not isinstance(row[name], int):
                raise ValueError(f"{path}: row {i + 1}: field {name!r}: expected an integer, got {row[name]!r}")
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def _sample(model, tokenizer, prompts: list[str], s: SamplingConfig, *, add_special_tokens: bool) -> Samples:
    return sample_completions(model, tokenizer, prompts, n=s.num_samples, max_new_tokens=s.max_new_tokens,
                              temperature=s.temperature, top_p=s.top_p, seed=s.seed, batch_size=s.batch_size,
                              add_special_tokens=add_special_tokens)


def evaluate(config: EvaluateConfig | dict | str | Path, overrides: Optional[list[str]] = None, *,
             judge: Optional[Judge] = None) -> dict[str, Any]:
    """Runs every metric the config asks for; writes ``results.json`` (+ ``samples.jsonl``); returns the results.

    ``judge`` (a callable) overrides ``config.judge``.
    """
    from mmalign.engine.trainer import torch_threads

    cfg = load_config(EvaluateConfig, config, overrides or [])
    with torch_threads(cfg.num_threads):  # restored afterwards
        return _evaluate(cfg, judge)


def _evaluate(cfg: EvaluateConfig, judge: Optional[Judge]) -> dict[str, Any]:
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    model, tokenizer = load_model_for_eval(cfg.model)
    results: dict[str, Any] = {"model": cfg.model, "baseline": cfg.baseline}

    if cfg.preference_data:
        results.update(preference_metrics(model, tokenizer, cfg.preference_data, use_chat_template=cfg.use_chat_template,
                                          system_prompt=cfg.system_prompt, max_pairs=cfg.max_pairs,
                                          batch_size=cfg.batch_size, ece_bins=cfg.ece_bins))
    if cfg.prompts:
        rows = _read_prompt_rows(cfg.prompts, cfg.max_prompts)
        raw_prompts = [r["prompt"] for r in rows]
        prompts = format_prompts(tokenizer, raw_prompts, use_chat_template=cfg.use_chat_template,
                                 system_prompt=cfg.system_prompt)
        samples = _sample(model, tokenizer, prompts, cfg.sampling, add_special_tokens=not cfg.use_chat_template)
        baseline_samples = None
        if cfg.baseline:
            del model
            base_model, base_tokenizer = load_model_for_eval(cfg.baseline)
            base_prompts = format_prompts(base_tokenizer, raw_prompts, use_chat_template=cfg.use_chat_template,
                                          system_prompt=cfg.system_prompt)
            baseline_samples = _sample(base_model, base_tokenizer, base_prompts, cfg.sampling,
                                       add_special_tokens=not cfg.use_chat_template)
            del base_model
        results.update(answer_metrics(samples, tokenizer, baseline_samples))
        if all(isinstance(r.get("low"), int) and isinstance(r.get("high"), int) for r in rows):
            intervals = [(r["low"], r["high"]) for r in rows]
            rng = rng_metrics(samples.texts, intervals)
            results.update({k: v for k, v in rng.items() if k != "rng/per_prompt_entropy"})
            if baseline_samples is not None:
                base_rng = rng_metrics(baseline_samples.texts, intervals)
                results["rng/win_rate_vs_baseline"] = M.win_rate(rng["rng/per_prompt_entropy"],
                                                                 base_rng["rng/per_prompt_entropy"])
        judge_fn = judge if judge is not None else (load_judge(cfg.judge) if cfg.judge else None)
        if judge_fn is not None:
            if baseline_samples is None:
                raise ValueError("judge: win rates need a baseline model (set baseline)")
            results.update(judge_metrics(judge_fn, prompts, samples.texts, baseline_samples.texts))
        sample_rows = [{"prompt": p, "answers": a, **({"baseline_answers": baseline_samples.texts[i]} if baseline_samples else {})}
                       for i, (p, a) in enumerate(zip(raw_prompts, samples.texts))]
        atomic_write_text(out_dir / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in sample_rows))

    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2))
    return results


def format_results(results: dict[str, Any]) -> str:
    lines = []
    for key, value in results.items():
        if isinstance(value, float):
            lines.append(f"{key:32s} {value:.4f}" if math.isfinite(value) else f"{key:32s} {value}")
        elif isinstance(value, (int, str)) or value is None:
            lines.append(f"{key:32s} {value}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmalign.text.evaluate",
        description="Evaluate a causal LM (or a LoRA run's final/ folder): sampled-answer length, diversity "
        "(distinct-1/2, self-BLEU), predictive entropy, longer-length ratio and judge win rate vs a baseline, RNG "
        "uniformity, and preference accuracy + ECE on a pairs test set. Writes results.json and samples.jsonl.",
        epilog=config_help(EvaluateConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, config_required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = config_from_args(EvaluateConfig, args)
    results = evaluate(cfg)
    print(format_results(results))
    print(f"results: {Path(cfg.output_dir) / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
