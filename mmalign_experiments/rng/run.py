"""Running the RNG experiment: data, one LoRA run per method, sampling on held-out intervals, the report."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

from mmalign.cli import run_command
from mmalign.config import load_config, save_config, to_dict
from mmalign.io import atomic_write_text, write_jsonl
from mmalign.text.evaluation.uniformity import summarize, uniformity_metrics
from mmalign.resources import shipped_config
from mmalign_experiments.rng.config import SMOLLM2, RngConfig, RngMethodConfig, RngSamplingConfig, resolve_device
from mmalign_experiments.rng.data import build_pool_preference_rows, build_preference_rows, format_prompt, make_intervals
from mmalign_experiments.rng.report import plot_histograms, results_table, win_rates

logger = logging.getLogger("mmalign_experiments.rng")


QUICKSTART_CONFIG = shipped_config("text/rng-quickstart.yaml")



# ------------------------------------------------------------------------------------------------ running
def resolve_model_path(name: str) -> str:
    if name == SMOLLM2:
        from mmalign.text.modeling.smollm import smollm2_path

        return smollm2_path()
    return name


def _sample_answers(model, tokenizer, prompts: list[str], sampling: RngSamplingConfig, n: int) -> list[list[str]]:
    from mmalign.text.modeling.sampling import sample_completions

    # Prompts are plain text for the trainer, which tokenises them with the tokenizer's special tokens.
    samples = sample_completions(
        model, tokenizer, prompts, n=n, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
        top_p=sampling.top_p, seed=sampling.seed, batch_size=sampling.batch_size, add_special_tokens=True,
    )
    return samples.texts


def _training_config(cfg: RngConfig, method: RngMethodConfig, model_path: str, data_dir: Path, accepts_groups: bool) -> dict:
    """One method's ``mmalign.text.train`` config. Group objectives train on the groups file; pairwise ones on the
    same groups with ``objective.pairs: members`` (``cfg.member_pairs``: the k pairs ``(chosen_i, rejected_i)`` of
    each group, SPEC §1 on §3's groups, the prompt encoded once per group), or else on the pairs file with k times
    the batch size. Either way a step sees the same sequences: ``batch_size`` groups, or their k pairs each."""
    training = to_dict(cfg.training)
    hyperparameters = dict(method.hyperparameters)
    if not accepts_groups and cfg.member_pairs:
        hyperparameters["pairs"] = "members"
        accepts_groups = True
    if not accepts_groups:  # the same sequences per step: k pairs per group
        training["batch_size"] = cfg.training.batch_size * cfg.data.group_size
    pools = cfg.data.redraw_pool_size is not None  # pools re-drawn every epoch (mmalign_experiments.rng.groups)
    return {
        "model": {"name_or_path": model_path},
        "data": {
            "train": str(data_dir / ("train_groups.jsonl" if accepts_groups else "train_pairs.jsonl")),
            "format": "groups" if accepts_groups or pools else "pairs",
            "redraw_members": (cfg.data.group_size if accepts_groups else 1) if pools else None,
        },
        "objective": {"name": method.objective, **hyperparameters},
        "lora": to_dict(cfg.lora),
        # Reference log-probs computed once per dataset and shared by the methods through the cache.
        "reference": {"mode": "precomputed", "cache_dir": str(Path(cfg.output_dir) / "reference_cache")},
        "training": training,
        "output_dir": str(Path(cfg.output_dir) / "runs" / method.label),
    }


def run_rng(config: RngConfig | dict | str | Path, overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """Runs the whole experiment; returns the results dict also written to ``output_dir/results.json``."""
    from mmalign.engine.threads import torch_threads

    cfg = load_config(RngConfig, config, overrides or [])
    with torch_threads(cfg.training.num_threads):  # restored afterwards
        return _run_rng(cfg)


def _run_rng(cfg: RngConfig) -> dict[str, Any]:
    import mmalign
    from mmalign.text.modeling.loading import load_causal_lm, load_tokenizer
    from mmalign.text.recipes.preference import train

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    timings: dict[str, float] = {}
    started = time.perf_counter()

    tick = time.perf_counter()
    model_path = resolve_model_path(cfg.model)
    timings["model_conversion_s"] = time.perf_counter() - tick
    tokenizer = load_tokenizer(model_path)
    device = resolve_device(cfg.sampling.device)  # the trainer picks its own (accelerate): the same on one GPU
    base = load_causal_lm(model_path).to(device)

    train_intervals, test_intervals = make_intervals(cfg.data)
    train_prompts = [format_prompt(tokenizer, iv, cfg.data) for iv in train_intervals]
    test_prompts = [format_prompt(tokenizer, iv, cfg.data) for iv in test_intervals]

    tick = time.perf_counter()
    pool = _sample_answers(base, tokenizer, train_prompts, cfg.sampling, cfg.data.rejected_pool_size)
    build = build_pool_preference_rows if cfg.data.redraw_pool_size else build_preference_rows
    groups, pairs, data_stats = build(train_prompts, train_intervals, pool, cfg.data)
    data_dir = out / "data"
    write_jsonl(data_dir / "train_groups.jsonl", groups)
    write_jsonl(data_dir / "train_pairs.jsonl", pairs)
    write_jsonl(data_dir / "test_intervals.jsonl",
                 [{"prompt": p, "low": iv.low, "high": iv.high} for p, iv in zip(test_prompts, test_intervals)])
    timings["data_s"] = time.perf_counter() - tick
    logger.info("rng data: %s", data_stats)

    answers: dict[str, list[list[str]]] = {}
    tick = time.perf_counter()
    answers["base"] = _sample_answers(base, tokenizer, test_prompts, cfg.sampling, cfg.sampling.num_samples)
    timings["eval_base_s"] = time.perf_counter() - tick
    del base

    from peft import PeftModel

    train_summaries = {}
    for method in cfg.methods:
        objective = mmalign.objective(method.objective, **method.hyperparameters)
        tick = time.perf_counter()
        summary = train(_training_config(cfg, method, model_path, data_dir, objective.accepts_groups))
        timings[f"train_{method.label}_s"] = time.perf_counter() - tick
        train_summaries[method.label] = {k: v for k, v in summary.summary().items()
                                         if isinstance(v, (int, float, str)) and k != "share_prompt"}
        tick = time.perf_counter()
        tuned = PeftModel.from_pretrained(load_causal_lm(model_path), summary["final_dir"]).to(device)
        answers[method.label] = _sample_answers(tuned, tokenizer, test_prompts, cfg.sampling, cfg.sampling.num_samples)
        timings[f"eval_{method.label}_s"] = time.perf_counter() - tick
        del tuned

    per_interval = {
        label: [dict(uniformity_metrics(a, iv), num_samples=len(a)) for a, iv in zip(texts, test_intervals)]
        for label, texts in answers.items()
    }
    summaries = {label: summarize(rows) for label, rows in per_interval.items()}
    comparisons = [(m.label, "base") for m in cfg.methods] + [tuple(p) for p in cfg.comparisons]
    wins = win_rates(per_interval, comparisons)
    timings["total_s"] = time.perf_counter() - started

    results = {
        "model": model_path,
        "sampling_device": str(device),
        "train_intervals": [[iv.low, iv.high] for iv in train_intervals],
        "test_intervals": [[iv.low, iv.high] for iv in test_intervals],
        "data": data_stats,
        "summary": summaries,
        "win_rates": wins,
        "per_interval": per_interval,
        "training": train_summaries,
        "timings_s": timings,
        "config": to_dict(cfg),
    }
    table = results_table(summaries, wins)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out / "results.md", f"# RNG uniformity (thesis §3.6.1)\n\nModel: `{model_path}`; "
                  f"{len(test_intervals)} held-out intervals x {cfg.sampling.num_samples} samples.\n\n{table}")
    write_jsonl(out / "samples.jsonl", [
        {"model": label, "low": iv.low, "high": iv.high, "answers": texts_i}
        for label, texts in answers.items() for iv, texts_i in zip(test_intervals, texts)
    ])
    plot_histograms(out / "histograms.png", per_interval, cfg.num_plot_intervals)
    print(table, end="")
    print(f"total {timings['total_s']:.0f}s; results in {out}/results.json, results.md, histograms.png")
    return results


def _run(cfg: RngConfig, args) -> int:
    run_rng(cfg)
    return 0


def main(argv: Optional[list[str]] = None, *, prog: str = "python -m mmalign_experiments.rng") -> int:
    return run_command(
        prog=prog, config_cls=RngConfig, run=_run, argv=argv,
        default_config=QUICKSTART_CONFIG,
        description="Thesis §3.6.1: make an LLM's random integers uniform with DPO, IPO, mDPO and mIPO (LoRA), then "
        "compare answer entropy on held-out intervals. With no --config it runs the quickstart "
        f"({QUICKSTART_CONFIG.name}: SmolLM2-135M-Instruct on CPU).")
