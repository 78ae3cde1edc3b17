"""Label noise on the RNG task (thesis §3.6.4, Remark 1; SPEC §3): is mDPO more robust to noisy labels as k grows?

The thesis' argument (Remark 1): when single comparisons are noisy but one side is better *on average*, a
comparison of two groups of ``k`` is right more often than a comparison of two single answers. The experiment
simulates a noisy judge on the RNG task of :mod:`mmalign_experiments.rng` (chosen = integers drawn uniformly
from the interval, rejected = the model's own skewed answers):

- ``noise: member_votes`` (the default): the judge looks at each member pair ``(chosen_i, rejected_i)`` of a
  group and gets it wrong with probability ``p`` (independently). DPO on ``k`` pairs per prompt trains on those
  ``k`` votes (each wrong vote swaps its pair); mDPO with group size ``k`` trains on the groups labelled by the
  majority of the *same* ``k`` votes (a wrong majority swaps the two groups). ``k = 1`` is DPO on one pair.
- ``noise: group``: each group's label is flipped with probability ``p`` (chosen and rejected groups swapped);
  DPO's ``k`` pairs cut from a flipped group are all flipped with it.

Votes use common random numbers: one uniform number per member, a vote is wrong iff it is ``< p``, so the flips at
a higher rate include those at a lower one. Everything else (intervals, the model's answers, chosen draws,
LoRA initialisation, evaluation samples) depends only on the seed; seeds are the unit. Held-out metric: the RNG
experiment's, mean entropy (nats) of the in-range answers per held-out interval, with the out-of-range rate.

    python -m mmalign_experiments.label_noise                      # SmolLM2-135M-Instruct + LoRA; docs/label-noise.md
"""
from __future__ import annotations

import json
import logging
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from mmalign.cli import run_command
from mmalign.config import load_config, to_dict
from mmalign.io import atomic_write_text, write_jsonl
from mmalign.text.config import LoraConfig, TextTrainingConfig
from mmalign.text.evaluation.uniformity import summarize, uniformity_metrics
from mmalign_experiments.rng.config import SMOLLM2, RngDataConfig, RngSamplingConfig
from mmalign_experiments.rng.data import build_preference_rows, format_prompt, make_intervals
from mmalign_experiments.label_noise_trend import trend_report
from mmalign_experiments.sweep import finish_figure, mark_reused, open_sweep, stored_rows

logger = logging.getLogger("mmalign_experiments.label_noise")

METRICS = ("entropy", "normalized_entropy", "out_of_range_rate")


@dataclass
class LabelNoiseConfig:
    """Label noise vs group size on the RNG task (thesis §3.6.4)."""

    model: str = field(default=SMOLLM2, metadata={"help": "causal LM folder, or 'smollm2' (converted offline)"})
    data: RngDataConfig = field(
        default_factory=lambda: RngDataConfig(num_train_intervals=12, num_test_intervals=8, train_gap_max=8,
                                              test_gap_max=8, group_size=3, rejected_pool_size=8),
        metadata={"help": "intervals and groups; group_size = the largest k; data.seed is replaced by each seed"})
    sampling: RngSamplingConfig = field(default_factory=lambda: RngSamplingConfig(num_samples=16),
                                        metadata={"help": "rejected pool and held-out evaluation sampling"})
    noise: Literal["member_votes", "group"] = field(
        default="member_votes", metadata={"help": "member_votes: each member pair's vote wrong w.p. p, groups take "
                                          "the majority; group: each group's label flipped w.p. p"})
    noise_rates: list[float] = field(default_factory=lambda: [0.0, 0.3], metadata={"help": "p, each in [0, 0.5)"})
    group_sizes: list[int] = field(default_factory=lambda: [1, 3],
                                   metadata={"help": "k for mDPO (k = 1: DPO on one pair per prompt)"})
    pairwise_group_sizes: list[int] = field(default_factory=lambda: [3],
                                            metadata={"help": "k for DPO on k pairs per prompt (same votes, k x batch)"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "the unit of replication"})
    beta: float = field(default=0.1, metadata={"help": "DPO / mDPO beta"})
    nll: float = field(default=1.0, metadata={"help": "NLL weight on the chosen side (SPEC §1), as in the RNG job"})
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(enabled=True, r=8, alpha=16.0, dropout=0.0),
                             metadata={"help": "LoRA adapters"})
    training: TextTrainingConfig = field(
        default_factory=lambda: TextTrainingConfig(batch_size=2, learning_rate=1e-3, num_epochs=1, lr_scheduler="constant",
                                                   logging_steps=1, max_prompt_length=64, max_response_length=8,
                                                   num_threads=1, progress_bar=False),
        metadata={"help": "optimisation; batch_size counts prompts (DPO on k pairs: k x as many pairs)"})
    output_dir: str = field(default="outputs/label-noise", metadata={"help": "run folder (finished runs are reused)"})
    only_finished: bool = field(default=False, metadata={"help": "only tabulate the runs already finished in "
                                                                 "output_dir (train nothing)"})
    reuse_results: Optional[str] = field(default=None, metadata={
        "help": "an earlier results.json with the same settings (e.g. docs/label-noise-b-results.json): its runs of "
                "the configured seeds, rates and methods count as finished (written as eval.json where none exists)"})

    def __post_init__(self) -> None:
        if not self.noise_rates or any(not 0.0 <= p < 0.5 for p in self.noise_rates):
            raise ValueError(f"noise_rates: each rate must be in [0, 0.5), got {self.noise_rates}")
        sizes = list(self.group_sizes) + list(self.pairwise_group_sizes)
        if not self.group_sizes or any(k < 1 or k > self.data.group_size for k in sizes):
            raise ValueError(f"group_sizes / pairwise_group_sizes: each k must be in [1, data.group_size = "
                             f"{self.data.group_size}], got {sizes}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: need distinct seeds, got {self.seeds}")


@dataclass(frozen=True)
class Method:
    label: str
    k: int
    grouped: bool  # mDPO on groups of k, else DPO on k pairs per prompt


def methods(cfg: LabelNoiseConfig) -> list[Method]:
    """mDPO per group size, then DPO on k pairs per pairwise size, in the configured order (k = 1 in either list is
    DPO on one pair per prompt, listed once)."""
    out = [Method("DPO k=1" if k == 1 else f"mDPO k={k}", k, k > 1) for k in cfg.group_sizes]
    out += [Method("DPO k=1" if k == 1 else f"DPO {k} pairs", k, False) for k in cfg.pairwise_group_sizes]
    return list({m.label: m for m in out}.values())


# ------------------------------------------------------------------------------------------------ noise
def vote_draws(num_groups: int, k: int, seed: int) -> list[list[float]]:
    """One uniform number per member pair (common random numbers across noise rates)."""
    rng = random.Random(f"label-noise-votes-{seed}")
    return [[rng.random() for _ in range(k)] for _ in range(num_groups)]


def _swap(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "chosen": row["rejected"], "rejected": row["chosen"], "flipped": True}


def noisy_rows(groups: list[dict[str, Any]], method: Method, rate: float, votes: list[list[float]],
               noise: str) -> tuple[list[dict[str, Any]], float]:
    """(training rows for ``method`` at noise ``rate``, realised fraction of rows whose label is wrong)."""
    rows: list[dict[str, Any]] = []
    for group, draws in zip(groups, votes, strict=True):
        k = method.k
        members = {**group, "chosen": group["chosen"][:k], "rejected": group["rejected"][:k], "flipped": False}
        wrong = [u < rate for u in draws[:k]] if noise == "member_votes" else [draws[0] < rate] * k
        if method.grouped:
            # Majority of the k votes; an even k's tie is broken by the next member's vote draw.
            flips = sum(wrong)
            wrong_group = flips * 2 > k or (flips * 2 == k and draws[k % len(draws)] < 0.5)
            rows.append(_swap(members) if wrong_group else members)
        else:
            for i in range(k):
                pair = {**members, "chosen": members["chosen"][i], "rejected": members["rejected"][i]}
                rows.append(_swap(pair) if wrong[i] else pair)
    return rows, sum(r["flipped"] for r in rows) / len(rows)


# ------------------------------------------------------------------------------------------------ running
def _train_config(cfg: LabelNoiseConfig, method: Method, model_path: str, data_file: Path, seed: int,
                  run_dir: Path) -> dict[str, Any]:
    training = to_dict(cfg.training)
    training["seed"] = seed
    training["overwrite_output_dir"] = True  # a run without eval.json was interrupted: start it again
    if not method.grouped:  # the same number of optimizer steps: k pairs per prompt
        training["batch_size"] = cfg.training.batch_size * method.k
    return {
        "model": {"name_or_path": model_path},
        "data": {"train": str(data_file), "format": "groups" if method.grouped else "pairs"},
        "objective": {"name": "mdpo" if method.grouped else "dpo", "beta": cfg.beta, "nll": cfg.nll},
        "lora": to_dict(cfg.lora),
        "reference": {"mode": "precomputed", "cache_dir": str(Path(cfg.output_dir) / "reference_cache")},
        "training": training,
        "output_dir": str(run_dir),
    }


def _evaluate(answers: list[list[str]], intervals) -> dict[str, Any]:
    per_interval = [uniformity_metrics(a, iv) for a, iv in zip(answers, intervals)]
    return {**summarize(per_interval), "entropy_per_interval": [r["entropy"] for r in per_interval]}


def run_folder(rate: float, label: str) -> str:
    """A run's folder under its seed's folder: ``p0.3/mDPO_k5``."""
    return f"p{rate:g}/" + label.replace(" ", "_").replace("=", "")


# what may differ between a stored sweep and this one: the grid (seeds, rates, methods) and the bookkeeping
REUSE_IGNORE = ("noise_rates", "group_sizes", "pairwise_group_sizes", "seeds", "output_dir", "only_finished",
                "reuse_results")


def reuse_stored_runs(cfg: LabelNoiseConfig, out: Path) -> int:
    """Writes the rows of ``cfg.reuse_results`` that this sweep would run (its seeds, rates and methods, and each
    seed's base row) as finished runs where none exists; returns how many were written."""
    labels = {m.label for m in methods(cfg)}
    written = 0
    for row in stored_rows(cfg.reuse_results, cfg, REUSE_IGNORE):
        if row["seed"] not in cfg.seeds:
            continue
        if row["method"] == "base":
            target = out / f"seed{row['seed']}" / "base.json"
        elif row["method"] in labels and row["rate"] in cfg.noise_rates:
            target = out / f"seed{row['seed']}" / run_folder(row["rate"], row["method"]) / "eval.json"
        else:
            continue
        if not target.is_file():
            mark_reused(target, row, cfg.reuse_results)
            written += 1
    logger.info("reused %d runs from %s", written, cfg.reuse_results)
    return written


def _run_seed(cfg: LabelNoiseConfig, seed: int, model_path: str) -> list[dict[str, Any]]:
    from peft import PeftModel

    from mmalign.text.modeling.loading import load_causal_lm, load_tokenizer
    from mmalign.text.recipes.preference import train
    from mmalign_experiments.rng.run import _sample_answers

    out = Path(cfg.output_dir) / f"seed{seed}"
    data_cfg = load_config(RngDataConfig, {**to_dict(cfg.data), "seed": seed})
    pool_sampling = load_config(RngSamplingConfig, {**to_dict(cfg.sampling), "seed": cfg.sampling.seed + seed})
    tokenizer = load_tokenizer(model_path)
    train_iv, test_iv = make_intervals(data_cfg)
    train_prompts = [format_prompt(tokenizer, iv, data_cfg) for iv in train_iv]
    test_prompts = [format_prompt(tokenizer, iv, data_cfg) for iv in test_iv]
    base = load_causal_lm(model_path)
    pool = _sample_answers(base, tokenizer, train_prompts, pool_sampling, data_cfg.rejected_pool_size)
    groups, _, stats = build_preference_rows(train_prompts, train_iv, pool, data_cfg)
    logger.info("seed %d data: %s", seed, stats)
    base_file = out / "base.json"
    if not base_file.is_file():
        answers = _sample_answers(base, tokenizer, test_prompts, pool_sampling, cfg.sampling.num_samples)
        atomic_write_text(base_file, json.dumps({"seed": seed, "rate": None, "method": "base", "k": 0,
                                                 "wrong_label_rate": None, **_evaluate(answers, test_iv)}, indent=2))
    rows = [json.loads(base_file.read_text())]
    del base
    votes = vote_draws(len(groups), data_cfg.group_size, seed)
    for rate in cfg.noise_rates:
        for method in methods(cfg):
            run_dir = out / run_folder(rate, method.label)
            done = run_dir / "eval.json"
            if done.is_file():  # finished earlier: reused, so an interrupted sweep resumes
                rows.append(json.loads(done.read_text()))
                continue
            train_rows, wrong_rate = noisy_rows(groups, method, rate, votes, cfg.noise)
            data_file = run_dir / "train.jsonl"
            write_jsonl(data_file, train_rows)
            tick = time.perf_counter()
            result = train(_train_config(cfg, method, model_path, data_file, seed, run_dir))
            tuned = PeftModel.from_pretrained(load_causal_lm(model_path), result["final_dir"])
            answers = _sample_answers(tuned, tokenizer, test_prompts, pool_sampling, cfg.sampling.num_samples)
            row = {"seed": seed, "rate": rate, "method": method.label, "k": method.k, "wrong_label_rate": wrong_rate,
                   **_evaluate(answers, test_iv), "wall_s": time.perf_counter() - tick}
            atomic_write_text(done, json.dumps(row, indent=2))
            rows.append(row)
            logger.info("seed %d p %.2f %s: entropy %.3f, out of range %.3f (%.0fs)", seed, rate, method.label,
                        row["entropy"], row["out_of_range_rate"], row["wall_s"])
    return rows


def finished_rows(out: Path, seed: int) -> list[dict[str, Any]]:
    """The rows a sweep has finished for ``seed`` (``base.json`` and every run's ``eval.json``), nothing trained."""
    folder = out / f"seed{seed}"
    files = ([folder / "base.json"] if (folder / "base.json").is_file() else []) + sorted(folder.glob("p*/*/eval.json"))
    return [json.loads(f.read_text()) for f in files]


def summary_table(rows: list[dict[str, Any]], labels: list[str], rates: list[float]) -> str:
    """Mean ± s.d. over seeds of the held-out entropy (and out-of-range rate) per method and noise rate."""
    def cell(label: str, rate: Optional[float], metric: str) -> str:
        values = [r[metric] for r in rows if r["method"] == label and r["rate"] == rate]
        if not values:
            return "–"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    head = "| method | " + " | ".join(f"p = {p:g}" for p in rates) + " |"
    lines = ["Held-out entropy (nats), mean ± s.d. over seeds:", "", head, "|---|" + "---|" * len(rates)]
    lines.append("| base | " + " | ".join(cell("base", None, "entropy") for _ in rates) + " |")
    lines += [f"| {lab} | " + " | ".join(cell(lab, p, "entropy") for p in rates) + " |" for lab in labels]
    lines += ["", "Held-out out-of-range rate:", "", head, "|---|" + "---|" * len(rates)]
    lines.append("| base | " + " | ".join(cell("base", None, "out_of_range_rate") for _ in rates) + " |")
    lines += [f"| {lab} | " + " | ".join(cell(lab, p, "out_of_range_rate") for p in rates) + " |" for lab in labels]
    lines += ["", "Fraction of training rows with a wrong label (mean over seeds):", "", head,
              "|---|" + "---|" * len(rates)]
    lines += [f"| {lab} | " + " | ".join(cell(lab, p, "wrong_label_rate") for p in rates) + " |" for lab in labels]
    return "\n".join(lines) + "\n"


def seed_comparisons(rows: list[dict[str, Any]], methods_: list[Method], rates: list[float]) -> str:
    """The analysis rule's table: each mDPO (group) method against every DPO method, per noise rate: in how many
    seeds its held-out entropy is higher, and the mean paired difference (nats)."""
    def entropy(label: str, rate: float, seed: int) -> Optional[float]:
        return next((r["entropy"] for r in rows if (r["method"], r["rate"], r["seed"]) == (label, rate, seed)), None)

    seeds = sorted({r["seed"] for r in rows})
    lines = ["| comparison | p | seeds where the first is higher | mean difference (nats) |", "|---|---|---|---|"]
    for a in (m for m in methods_ if m.grouped):
        for b in (m for m in methods_ if not m.grouped):
            for p in rates:
                pairs = [(entropy(a.label, p, s), entropy(b.label, p, s)) for s in seeds]
                pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
                if pairs:
                    wins = sum(x > y for x, y in pairs)
                    diff = statistics.mean(x - y for x, y in pairs)
                    lines.append(f"| {a.label} vs {b.label} | {p:g} | {wins}/{len(pairs)} | {diff:+.3f} |")
    return "\n".join(lines) + "\n"


def drops_from_clean(rows: list[dict[str, Any]], labels: list[str], rates: list[float]) -> str:
    """Per method and noise rate p > 0: the held-out entropy at p minus at p = 0, paired by seed (mean ± s.d.,
    with the number of seeds); Remark 1's robustness is a smaller drop for a larger k."""
    def entropy(label: str, rate: float, seed: int) -> Optional[float]:
        return next((r["entropy"] for r in rows if (r["method"], r["rate"], r["seed"]) == (label, rate, seed)), None)

    noisy = [p for p in rates if p > 0]
    if 0.0 not in rates or not noisy:
        return ""
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| method | " + " | ".join(f"p = {p:g} minus p = 0" for p in noisy) + " |", "|---|" + "---|" * len(noisy)]
    for lab in labels:
        cells = []
        for p in noisy:
            diffs = [entropy(lab, p, s) - entropy(lab, 0.0, s) for s in seeds
                     if entropy(lab, p, s) is not None and entropy(lab, 0.0, s) is not None]
            sd = f" ± {statistics.stdev(diffs):.3f}" if len(diffs) > 1 else ""
            cells.append(f"{statistics.mean(diffs):+.3f}{sd} (n={len(diffs)})" if diffs else "–")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[dict[str, Any]], labels: list[str], rates: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for metric, ax in zip(("entropy", "out_of_range_rate"), axes):
        for i, label in enumerate(labels):
            color = f"C{i}"
            means = []
            for p in rates:
                values = [r[metric] for r in rows if r["method"] == label and r["rate"] == p]
                ax.scatter([p + 0.004 * (i - len(labels) / 2)] * len(values), values, color=color, s=8, alpha=0.4)
                means.append(statistics.mean(values) if values else float("nan"))
            ax.plot(rates, means, color=color, marker="o", label=label)
        base = [r[metric] for r in rows if r["method"] == "base"]
        if base:
            ax.axhline(statistics.mean(base), color="k", linestyle="--", linewidth=0.8, label="base")
        ax.set_xlabel("label noise rate p")
        ax.set_ylabel({"entropy": "held-out entropy (nats)", "out_of_range_rate": "out-of-range rate"}[metric])
    axes[0].legend(fontsize=7)
    finish_figure(fig, path, "RNG task under label noise: mean over seeds (dots: seeds)")


def run_label_noise(config: LabelNoiseConfig | dict | str | Path, overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """Runs every seed x noise rate x method; writes ``results.json``, ``results.md``, ``label_noise.png`` and
    ``label_noise_k.png`` (the metric against k)."""
    from mmalign.engine.threads import torch_threads

    started = time.perf_counter()
    cfg, out, model_path = open_sweep(LabelNoiseConfig, config, overrides)
    if cfg.reuse_results:
        reuse_stored_runs(cfg, out)
    rows: list[dict[str, Any]] = []
    with torch_threads(cfg.training.num_threads):
        for seed in cfg.seeds:
            rows += finished_rows(out, seed) if cfg.only_finished else _run_seed(cfg, seed, model_path)
    labels = [m.label for m in methods(cfg)]
    table = summary_table(rows, labels, list(cfg.noise_rates))
    table += "\nPaired by seed (the analysis rule, docs/label-noise.md):\n\n" + seed_comparisons(
        rows, methods(cfg), list(cfg.noise_rates))
    drops = drops_from_clean(rows, labels, list(cfg.noise_rates))
    table += f"\nChange of held-out entropy from p = 0, paired by seed (nats):\n\n{drops}" if drops else ""
    trend_md, trend, contrast = trend_report(rows, list(cfg.noise_rates), out / "label_noise_k.png")
    table += trend_md
    results = {"rows": rows, "config": to_dict(cfg), "model": model_path, "k_trend": trend,
               "noise_contrast": contrast, "total_s": time.perf_counter() - started}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out / "results.md", f"# RNG label noise (thesis §3.6.4), noise: {cfg.noise}\n\n"
                      f"Seeds {cfg.seeds}; {cfg.data.num_test_intervals} held-out intervals x "
                      f"{cfg.sampling.num_samples} samples.\n\n{table}")
    plot(out / "label_noise.png", rows, labels, list(cfg.noise_rates))
    print(table, end="")
    print(f"total {results['total_s']:.0f}s; results in {out}/results.json, results.md, label_noise.png")
    return results


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(prog="python -m mmalign_experiments.label_noise", config_cls=LabelNoiseConfig,
                       run=lambda cfg, args: run_label_noise(cfg) and 0, argv=argv,
                       description="Thesis §3.6.4: mDPO with group size k vs DPO on the RNG task with labels flipped "
                       "at rates p; held-out answer entropy against p.")


if __name__ == "__main__":
    raise SystemExit(main())
