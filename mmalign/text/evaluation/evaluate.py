"""Evaluating a text policy: sampled-answer metrics, preference accuracy/calibration, judges (SPEC §2, §5, §6).

    python -m mmalign.text.evaluate --config eval.yaml [--set sampling.num_samples=8]

Metrics (all computed with :mod:`mmalign.shared.metrics`):

- on sampled answers (``sampling``: temperature, top-p, n per prompt, seed, batch): average answer length in
  tokens; longer-length ratio against a baseline model's answers (fraction of (prompt, i) where the model's i-th
  answer is longer than the baseline's i-th, SPEC §4 evaluation); distinct-1/2 and self-BLEU over each prompt's
  answers (averaged over prompts); predictive entropy = mean entropy of the sampling distribution over the
  sampled tokens (SPEC §6);
- RNG uniformity (SPEC §6) when the prompt rows carry integer ``low`` and ``high`` columns (see
  :mod:`mmalign_experiments.rng`): entropy, KL to uniform and out-of-range rate of the answers;
- on a preference test set (pairs): preference accuracy and the ECE of the chosen-vs-rejected prediction, whose
  probability is ``σ(s_w − s_l)`` from the length-normalised log-likelihoods ``s = logp_θ(x, y)/|y|`` (SPEC §2);
- with a judge (any callable ``(prompts, responses) -> scores`` or a local reward-model folder): win rate
  against the baseline's answers and the judge score ``50 + (n_win − n_lose)/N · 100`` (SPEC §5).

A model path may be a LoRA adapter folder (e.g. a training run's ``final/``): its base model is loaded and the
adapter applied. Objects work as in :func:`mmalign.text.train`: ``evaluate(config, model=..., tokenizer=...,
prompts=..., preference_data=...)`` takes a ``PreTrainedModel`` / ``PeftModel``, a tokenizer, and the data as a
``datasets.Dataset``, a list of dicts or (prompts) a plain list of prompt strings; every row is checked, and an
error names the row and the field.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional


from mmalign.cli import run_command
from mmalign.config import load_config, save_config
from mmalign.io import atomic_write_text
from mmalign.shared import metrics as M
from mmalign.text.evaluation.judges import Judge, RewardModelJudge, load_judge
from mmalign.text.evaluation.metrics import (
    answer_metrics,
    evaluate_length_bias,
    format_prompts,
    judge_metrics,
    length_bias_metrics,
    longer_length_ratio,
    margin_shifts,
    pair_logprobs,
    preference_metrics,
    rng_metrics,
)
from mmalign.text.modeling.loading import ensure_pad_token, load_model_for_eval
from mmalign.text.modeling.sampling import Samples, sample_completions
from mmalign.text.recipes.inputs import is_path, require

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
    "pair_logprobs",
    "margin_shifts",
    "evaluate",
    "main",
]

logger = logging.getLogger("mmalign.text.evaluation.evaluate")



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

    model: Optional[str] = field(default=None, metadata={"help": "model folder or hub name, or a LoRA adapter folder "
                                                                  "(a run's final/); may be omitted when the call "
                                                                  "passes model=..."})
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
        metadata={"code_hook": True, "help": "reward-model folder (sequence classification) or 'package.module:function' returning "
                  "scores for (prompts, responses)"},
    )
    allow_code_hooks: bool = field(default=False, metadata={"help": "allow judge to import a module outside "
                                                                    "mmalign (runs that code)"})
    ece_bins: int = field(default=10, metadata={"help": "equal-width bins of the ECE"})
    batch_size: int = field(default=8, metadata={"help": "pairs per forward when scoring the preference set"})
    num_threads: Optional[int] = field(default=None, metadata={"help": "torch CPU threads"})
    output_dir: str = field(default="outputs/text-eval", metadata={"help": "writes results.json and samples.jsonl"})

    def __post_init__(self) -> None:
        if self.judge and ":" in self.judge and not Path(self.judge).is_dir():
            from mmalign.code_hooks import check_code_hook

            check_code_hook(self.judge, key="judge", allow=self.allow_code_hooks)
        if self.ece_bins < 1 or self.batch_size < 1:
            raise ValueError("ece_bins and batch_size must be >= 1")


# ------------------------------------------------------------------------------------------------ running
def _read_prompt_rows(source: Any, limit: Optional[int], name: str = "prompts") -> list[dict[str, Any]]:
    """The prompt rows of a file path, a ``datasets.Dataset``, a list of dicts or a plain list of prompt strings,
    each checked: a ``prompt`` string, optional integer ``low`` / ``high`` (RNG metrics)."""
    from mmalign.text.data import load_rows

    if isinstance(source, (list, tuple)):  # plain prompt strings stand for {"prompt": ...} rows
        rows = []
        for number, row in enumerate(source, start=1):
            if not isinstance(row, (str, Mapping)):
                raise ValueError(f"{name} (list): row {number}: expected a prompt string or a mapping with a 'prompt' "
                                 f"string, got {type(row).__name__}")
            rows.append({"prompt": row} if isinstance(row, str) else row)
        source = rows
    loaded = load_rows(source, max_samples=limit, name=name)
    label = str(source) if isinstance(source, (str, Path)) else loaded.source
    rows = list(loaded)
    for i, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str):
            raise ValueError(f"{label}: row {i + 1}: field 'prompt': expected a string, got {row.get('prompt')!r}")
        for key in ("low", "high"):
            if key in row and row[key] is not None and (isinstance(row[key], bool) or not isinstance(row[key], int)):
                raise ValueError(f"{label}: row {i + 1}: field {key!r}: expected an integer, got {row[key]!r}")
    if not rows:
        raise ValueError(f"{label}: no prompts")
    return rows


def _sample(model, tokenizer, prompts: list[str], s: SamplingConfig, *, add_special_tokens: bool) -> Samples:
    return sample_completions(model, tokenizer, prompts, n=s.num_samples, max_new_tokens=s.max_new_tokens,
                              temperature=s.temperature, top_p=s.top_p, seed=s.seed, batch_size=s.batch_size,
                              add_special_tokens=add_special_tokens)


_OBJECT_KEYS = ("model", "prompts", "preference_data")


def evaluate(config: EvaluateConfig | dict | str | Path | None = None, overrides: Optional[list[str]] = None, *,
             judge: Optional[Judge] = None, model: Any = None, tokenizer: Any = None, prompts: Any = None,
             preference_data: Any = None) -> dict[str, Any]:
    """Runs every metric the config asks for; writes ``results.json`` (+ ``samples.jsonl``); returns the results.

    ``judge`` (a callable) overrides ``config.judge``. ``model`` (a ``PreTrainedModel`` or ``PeftModel``) and
    ``tokenizer`` stand for ``config.model``; ``prompts`` (a ``datasets.Dataset``, a list of dicts or a list of
    prompt strings) and ``preference_data`` (a ``Dataset`` or a list of pair dicts) for the config's paths; objects
    may also stand in the config dict where a path would go. The config may then omit what the objects supply.
    A model object is evaluated in eval mode, and its train/eval mode is restored afterwards.
    """
    from mmalign.config import ConfigError
    from mmalign.engine.threads import torch_threads

    objects = {"model": model, "prompts": prompts, "preference_data": preference_data}
    if isinstance(config, Mapping):
        config = dict(config)
        for key in _OBJECT_KEYS:
            if not is_path(config.get(key)):
                value = config.pop(key)
                objects[key] = objects[key] if objects[key] is not None else value
    cfg = load_config(EvaluateConfig, config, overrides or [])
    require(objects["model"] if objects["model"] is not None else cfg.model, "model", "model")
    if tokenizer is not None and objects["model"] is None:
        raise ConfigError("tokenizer: a tokenizer object goes with a model object (model=...); a model path brings "
                          "its own tokenizer")
    if all(objects[key] is None and getattr(cfg, key) is None for key in ("prompts", "preference_data")):
        raise ConfigError("nothing to evaluate: set prompts and/or preference_data (or pass prompts=... / "
                          "preference_data=...)")
    with torch_threads(cfg.num_threads):  # restored afterwards
        return _evaluate(cfg, judge, objects, tokenizer)


def _model_object(model: Any, tokenizer: Any):
    """(model, tokenizer, name) for a model object: its tokenizer given, or loaded from the folder it came from."""
    from mmalign.config import ConfigError
    from mmalign.text.modeling.loading import load_tokenizer

    if not hasattr(model, "generate") or not hasattr(model, "config"):
        raise ConfigError(f"model: expected a causal LM object (PreTrainedModel or PeftModel) or a path; got "
                          f"{type(model).__name__}")
    source = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if tokenizer is None:
        if not source or not Path(source).is_dir():
            raise ConfigError("tokenizer: required with a model object that was not loaded from a local folder; "
                              "pass tokenizer=...")
        tokenizer = load_tokenizer(source)
    ensure_pad_token(tokenizer, "tokenizer", ConfigError)
    return model, tokenizer, str(source) if source else f"<{type(model).__name__}>"


def _evaluate(cfg: EvaluateConfig, judge: Optional[Judge], objects: Optional[dict[str, Any]] = None,
              tokenizer: Any = None) -> dict[str, Any]:
    objects = objects or {}
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    from mmalign.hub import check_sources

    given = objects.get("model")
    check_sources([("model", cfg.model if given is None else None, "model"), ("baseline", cfg.baseline, "model")])
    prompt_source = objects.get("prompts") if objects.get("prompts") is not None else cfg.prompts
    pair_source = objects.get("preference_data") if objects.get("preference_data") is not None else cfg.preference_data
    rows = _read_prompt_rows(prompt_source, cfg.max_prompts) if prompt_source is not None else None  # before loading
    if given is not None:
        model, tokenizer, model_name = _model_object(given, tokenizer)
        was_training = model.training
        model.eval()
    else:
        model, tokenizer = load_model_for_eval(cfg.model)
        model_name, was_training = cfg.model, False
    try:
        return _run_metrics(cfg, judge, model, tokenizer, model_name, rows, pair_source, out_dir)
    finally:
        if was_training:
            given.train()


def _run_metrics(cfg: EvaluateConfig, judge: Optional[Judge], model, tokenizer, model_name: str,
                 rows: Optional[list[dict[str, Any]]], pair_source: Any, out_dir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"model": model_name, "baseline": cfg.baseline}

    if pair_source is not None:
        results.update(preference_metrics(model, tokenizer, pair_source, use_chat_template=cfg.use_chat_template,
                                          system_prompt=cfg.system_prompt, max_pairs=cfg.max_pairs,
                                          batch_size=cfg.batch_size, ece_bins=cfg.ece_bins,
                                          name=None if is_path(pair_source) else "preference_data"))
    if rows is not None:
        raw_prompts = [r["prompt"] for r in rows]
        prompts = format_prompts(tokenizer, raw_prompts, use_chat_template=cfg.use_chat_template,
                                 system_prompt=cfg.system_prompt)
        samples = _sample(model, tokenizer, prompts, cfg.sampling, add_special_tokens=not cfg.use_chat_template)
        baseline_samples = None
        if cfg.baseline:
            del model  # (a model object stays with its caller)
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
        judge_fn = judge if judge is not None else (load_judge(cfg.judge, allow_code_hooks=cfg.allow_code_hooks)
                                                     if cfg.judge else None)
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


def _run(cfg: EvaluateConfig, args) -> int:
    results = evaluate(cfg)
    print(format_results(results))
    print(f"results: {Path(cfg.output_dir) / 'results.json'}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(
        prog="python -m mmalign.text.evaluate", config_cls=EvaluateConfig, run=_run, argv=argv, config_required=True,
        description="Evaluate a causal LM (or a LoRA run's final/ folder): sampled-answer length, diversity "
        "(distinct-1/2, self-BLEU), predictive entropy, longer-length ratio and judge win rate vs a baseline, RNG "
        "uniformity, and preference accuracy + ECE on a pairs test set. Writes results.json and samples.jsonl.")
