"""f-DPO's reward / diversity / calibration frontier on HH-RLHF (thesis ch. 2, Tables 2.2–2.3, §2.6.4; SPEC §2).

Claim checked: divergences other than reverse KL trade a little reward for more diversity and give a lower
expected calibration error. SmolLM2-135M-Instruct (the project's instruction-tuned start, standing in for the SFT
model) is fine-tuned offline with LoRA on HH-RLHF harmless-base pairs under f-DPO with reverse KL (= DPO), JS,
forward KL and α-divergences, everything else equal. Per run:

- **preference accuracy** and **ECE** on held-out pairs from length-normalised policy log-likelihoods (thesis
  §2.6.4; the same score as the trainer's ``eval_ece``, :func:`mmalign.text.evaluation.metrics.preference_metrics`);
- the **reward** of a reward model trained here on other clean pairs of the same split
  (:func:`mmalign.text.recipes.reward.train_reward_model`; its held-out accuracy is reported, so one can see
  whether its scores mean anything), averaged over sampled answers to held-out prompts;
- **diversity** of those samples: predictive entropy (mean per-token entropy of the sampling distribution),
  distinct-1/2 and self-BLEU per prompt (:func:`mmalign.text.evaluation.metrics.answer_metrics`).

Seeds (LoRA initialisation, data order and the sampling seed) are the unit; the data split and the reward model
are fixed. Outputs in ``output_dir``: ``results.json``, ``results.md``, ``frontier.png``.

    python -m mmalign_experiments.fdpo_frontier                  # docs/fdpo-frontier.md (budget on 2 CPUs there)
"""
from __future__ import annotations

import json
import logging
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mmalign.cli import run_command
from mmalign.config import to_dict
from mmalign.io import atomic_write_text, read_jsonl, write_jsonl
from mmalign_experiments.bias_data import hh_pairs
from mmalign_experiments.fdpo_report import paired_rule, per_seed_table, plot_ece_curves, rule_table
from mmalign_experiments.sweep import finish_figure, open_sweep

logger = logging.getLogger("mmalign_experiments.fdpo_frontier")

METRICS = ("reward", "probe_reward", "accuracy", "ece", "predictive_entropy", "distinct_1", "distinct_2", "self_bleu", "length")


@dataclass
class FrontierConfig:
    """Offline f-DPO on HH-RLHF: reward and accuracy against diversity and ECE."""

    model: str = field(default="smollm2", metadata={"help": "causal LM folder, or 'smollm2' (converted offline)"})
    hh: str = field(default="../shared/data/hh-rlhf/harmless-base-test.jsonl.gz", metadata={"help": "HH-RLHF pairs"})
    max_prompt_chars: int = field(default=200, metadata={"help": "single-turn pairs with a prompt this short are kept"})
    max_response_chars: int = field(default=200, metadata={"help": "... and both responses this short"})
    data_seed: int = field(default=0, metadata={"help": "shuffle of the kept pairs before slicing (fixed across seeds)"})
    rm_train: int = field(default=64, metadata={"help": "clean pairs for the reward model"})
    rm_eval: int = field(default=64, metadata={"help": "clean held-out pairs for the reward model's accuracy"})
    train: int = field(default=64, metadata={"help": "f-DPO training pairs"})
    eval: int = field(default=48, metadata={"help": "held-out pairs: preference accuracy and ECE"})
    prompts: int = field(default=8, metadata={"help": "held-out prompts answered by sampling"})
    divergences: list[str] = field(
        default_factory=lambda: ["reverse_kl", "forward_kl", "js", "alpha:0.5", "alpha:0.3", "alpha:0.7"],
        metadata={"help": "f-DPO divergences; alpha:A is the α-divergence with α = A"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "training and sampling seeds (the unit)"})
    sft: bool = field(default=True, metadata={"help": "also evaluate the untrained model (the SFT row); false lets a "
                                                     "second process share the divergences without repeating it"})
    beta: float = field(default=0.1, metadata={"help": "f-DPO beta"})
    learning_rate: float = field(default=5e-4, metadata={"help": "LoRA learning rate (constant)"})
    batch_size: int = field(default=8, metadata={"help": "pairs per step"})
    num_epochs: float = field(default=1.0, metadata={"help": "epochs over the training pairs"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (alpha = 2r, all linear layers)"})
    max_length: int = field(default=96, metadata={"help": "prompt and response token caps (each)"})
    ece_eval_steps: int = field(default=0, metadata={"help": "log eval_ece every N steps on the eval pairs (0: off; "
                                                            "the final accuracy/ECE are computed after training)"})
    num_samples: int = field(default=4, metadata={"help": "sampled answers per held-out prompt"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens per sampled answer"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    rm_top_layers: int = field(default=4, metadata={"help": "reward model: trainable top blocks"})
    rm_learning_rate: float = field(default=5e-5, metadata={"help": "reward model learning rate"})
    only_finished: bool = field(default=False, metadata={"help": "tabulate the finished cells only (train nothing)"})
    probe_reward: bool = field(default=False, metadata={"help": "also score samples with a MiniLM-embedding probe "
                                                                "(mmalign_experiments.embedding_reward)"})
    probe_train: int = field(default=1000, metadata={"help": "probe: at most this many training pairs (outside every slice)"})
    num_threads: int = field(default=1, metadata={"help": "torch threads"})
    output_dir: str = field(default="outputs/fdpo-frontier", metadata={"help": "run folder (finished parts are reused)"})

    def __post_init__(self) -> None:
        for spec in self.divergences:
            divergence_kwargs(spec)  # raises on a bad spec
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: need distinct seeds, got {self.seeds}")
        if min(self.rm_train, self.rm_eval, self.train, self.eval, self.prompts, self.num_samples) < 1:
            raise ValueError("rm_train, rm_eval, train, eval, prompts and num_samples must be >= 1")
        if self.num_samples < 2:
            raise ValueError("num_samples: self-BLEU and distinct-n compare answers to one prompt; need >= 2")


def divergence_kwargs(spec: str) -> dict[str, Any]:
    """``"js"`` -> ``{"divergence": "js"}``; ``"alpha:0.3"`` -> ``{"divergence": "alpha", "alpha": 0.3}``."""
    name, _, value = spec.partition(":")
    if name == "alpha":
        try:
            alpha = float(value)
        except ValueError:
            raise ValueError(f"divergences: {spec!r}: write the α-divergence as alpha:A with A in (0, 1)") from None
        if not 0 < alpha < 1:
            raise ValueError(f"divergences: {spec!r}: α must be in (0, 1)")
        return {"divergence": "alpha", "alpha": alpha}
    if value or name not in ("reverse_kl", "forward_kl", "js"):
        raise ValueError(f"divergences: unknown {spec!r}; allowed: reverse_kl, forward_kl, js, alpha:A")
    return {"divergence": name}


def label(spec: str) -> str:
    kw = divergence_kwargs(spec)
    return {"reverse_kl": "RKL (DPO)", "forward_kl": "FKL", "js": "JS"}.get(kw["divergence"], f"α={kw.get('alpha')}")


# ------------------------------------------------------------------------------------------------ data
def _short_rows(cfg: FrontierConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """(every HH pair, the short single-turn ones shuffled by the data seed, the slice sizes in order)."""
    every = hh_pairs(cfg.hh)
    rows = [r for r in every if r["prompt"].count("Human:") == 1 and len(r["prompt"]) <= cfg.max_prompt_chars
            and max(len(r["chosen"]), len(r["rejected"])) <= cfg.max_response_chars]
    random.Random(cfg.data_seed).shuffle(rows)
    sizes = {"rm_train": cfg.rm_train, "rm_eval": cfg.rm_eval, "train": cfg.train, "eval": cfg.eval,
             "prompts": cfg.prompts}
    return every, rows, sizes


def probe_split(cfg: FrontierConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The probe's (training, held-out) pairs: held out are the reward model's eval slice and the short pairs no
    slice uses; it trains on up to ``probe_train`` pairs whose prompt is not among the short ones (no overlap)."""
    every, rows, sizes = _short_rows(cfg)
    heldout = rows[cfg.rm_train:cfg.rm_train + cfg.rm_eval] + rows[sum(sizes.values()):]
    short_prompts = {r["prompt"] for r in rows}
    return [r for r in every if r["prompt"] not in short_prompts][:cfg.probe_train], heldout


def make_splits(cfg: FrontierConfig, out: Path) -> dict[str, Path]:
    _, rows, sizes = _short_rows(cfg)
    if sum(sizes.values()) > len(rows):
        raise ValueError(f"{cfg.hh}: {len(rows)} pairs pass the length filters; the slices need {sum(sizes.values())}")
    files, start = {}, 0
    for name, n in sizes.items():
        files[name] = write_jsonl(out / "data" / f"{name}.jsonl", rows[start:start + n])
        start += n
    return files


# ------------------------------------------------------------------------------------------------ runs
def _reward_model(cfg: FrontierConfig, files: dict[str, Path], model_path: str, out: Path) -> dict[str, Any]:
    from mmalign.text.recipes.reward import train_reward_model

    rm_dir = out / "reward-model"
    report_file = rm_dir / "reward_report.json"
    if not (report_file.is_file() and (rm_dir / "final").is_dir()):
        train_reward_model({
            "model": {"name_or_path": model_path},
            "data": {"train": str(files["rm_train"]), "eval": str(files["rm_eval"]), "use_chat_template": True},
            "trainable_top_layers": cfg.rm_top_layers,
            "training": {"batch_size": 8, "learning_rate": cfg.rm_learning_rate, "lr_scheduler": "constant",
                         "num_epochs": 1, "max_length": 2 * cfg.max_length, "logging_steps": 4,
                         "num_threads": cfg.num_threads, "seed": cfg.data_seed, "progress_bar": False},
            "output_dir": str(rm_dir),
        })
    report = json.loads(report_file.read_text())
    return {"pairwise_accuracy": report["eval"]["pairwise_accuracy"], "mean_margin": report["eval"]["mean_margin"],
            "eval_pairs": report["eval"]["pairs"], "train_steps": report["train"]["global_step"]}


def _probe(cfg: FrontierConfig, out: Path):
    """The MiniLM probe reward, fitted once and kept as JSON (weights as numbers: nothing executable is loaded)."""
    import torch

    from mmalign_experiments.embedding_reward import MiniLMEmbedder, ProbeReward, train_probe

    path = out / "probe-reward.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        return ProbeReward(MiniLMEmbedder(), torch.tensor(saved["weight"]), saved["report"])
    probe = train_probe(*probe_split(cfg))
    atomic_write_text(path, json.dumps({"report": probe.report, "weight": probe.weight.tolist()}))
    return probe


def _train(cfg: FrontierConfig, spec: str, seed: int, model_path: str, files: dict[str, Path], run_dir: Path) -> Path:
    from mmalign.text.recipes.preference import train

    evaluation = ({"eval": str(files["eval"])} if cfg.ece_eval_steps else {})
    result = train({
        "model": {"name_or_path": model_path},
        "data": {"train": str(files["train"]), "use_chat_template": True, **evaluation},
        "objective": {"name": "fdpo", "beta": cfg.beta, **divergence_kwargs(spec)},
        "lora": {"enabled": True, "r": cfg.lora_r, "alpha": 2 * cfg.lora_r, "dropout": 0.0, "target_modules": "all-linear"},
        "reference": {"mode": "precomputed", "cache_dir": str(Path(cfg.output_dir) / "reference_cache")},
        "training": {"batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate, "lr_scheduler": "constant",
                     "num_epochs": cfg.num_epochs, "logging_steps": 1, "eval_steps": cfg.ece_eval_steps,
                     "num_threads": cfg.num_threads, "seed": seed, "max_prompt_length": cfg.max_length,
                     "max_response_length": cfg.max_length, "progress_bar": False},
        "output_dir": str(run_dir),
    })
    return Path(result["final_dir"])


def ece_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, eval_ece) pairs logged by the trainer in ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [(int(r["step"]), float(r["eval_ece"])) for r in read_jsonl(path) if "eval_ece" in r]


def _evaluate(cfg: FrontierConfig, model_dir: str, files: dict[str, Path], scorer, seed: int) -> dict[str, Any]:
    from mmalign.text.data import render_prompt
    from mmalign.text.evaluation.metrics import answer_metrics, preference_metrics
    from mmalign.text.modeling.loading import load_model_for_eval
    from mmalign.text.modeling.sampling import sample_completions

    model, tokenizer = load_model_for_eval(model_dir)
    if hasattr(model, "merge_and_unload"):  # a LoRA adapter: merged weights decode faster
        model = model.merge_and_unload().eval()
    pref = preference_metrics(model, tokenizer, str(files["eval"]), use_chat_template=True)
    prompts = [r["prompt"] for r in read_jsonl(files["prompts"])]
    rendered = [render_prompt(tokenizer, p, use_chat_template=True) for p in prompts]
    samples = sample_completions(model, tokenizer, [t for t, _ in rendered], n=cfg.num_samples,
                                 max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed,
                                 add_special_tokens=rendered[0][1])
    answers = answer_metrics(samples, tokenizer)
    flat_prompts = [p for p, texts in zip(prompts, samples.texts) for _ in texts]
    rewards = scorer.score(flat_prompts, [t for texts in samples.texts for t in texts]).tolist()
    return {"reward": statistics.mean(rewards), "accuracy": pref["preference/accuracy"], "ece": pref["preference/ece"],
            "predictive_entropy": answers["predictive_entropy"], "distinct_1": answers["distinct_1"],
            "distinct_2": answers["distinct_2"], "self_bleu": answers["self_bleu"],
            "length": answers["avg_length_tokens"], "samples": samples.texts}


def summary_table(rows: list[dict[str, Any]], labels: list[str]) -> str:
    def cell(lab: str, metric: str) -> str:
        values = [r[metric] for r in rows if r["method"] == lab and r.get(metric) is not None]
        if not values:
            return "–"
        return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")

    head = ["reward ↑", "probe reward ↑", "pref. accuracy ↑", "ECE ↓", "pred. entropy ↑", "distinct-1 ↑", "distinct-2 ↑",
            "self-BLEU ↓", "length (tokens)"]
    lines = ["| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    lines += [f"| {lab} | " + " | ".join(cell(lab, m) for m in METRICS) + " |" for lab in labels]
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[dict[str, Any]], labels: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = "probe_reward" if any(r.get("probe_reward") is not None for r in rows) else "reward"
    panels = [("predictive_entropy", y), ("distinct_2", y), ("ece", "accuracy")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (x, y) in zip(axes, panels):
        for i, lab in enumerate(labels):
            pts = [(r[x], r[y]) for r in rows if r["method"] == lab and r[x] is not None]
            if pts:
                ax.scatter(*zip(*pts), color=f"C{i}", label=lab, s=28, marker="s" if lab == "SFT" else "o")
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(y)
    axes[0].legend(fontsize=7)
    finish_figure(fig, path, "f-DPO on HH-RLHF (SmolLM2-135M + LoRA): reward vs diversity, accuracy vs ECE (dots: seeds)")


def run_frontier(config: FrontierConfig | dict | str | Path, overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """Every divergence x seed; writes ``results.json``, ``results.md`` and ``frontier.png`` to ``output_dir``."""
    from mmalign.engine.threads import torch_threads
    from mmalign.text.evaluation.reward_probes import RewardScorer

    started = time.perf_counter()
    cfg, out, model_path = open_sweep(FrontierConfig, config, overrides)
    rows: list[dict[str, Any]] = []
    with torch_threads(cfg.num_threads):
        files = make_splits(cfg, out)
        rm_report = _reward_model(cfg, files, model_path, out)
        scorer = RewardScorer.from_pretrained(out / "reward-model" / "final")
        probe = _probe(cfg, out) if cfg.probe_reward else None
        for seed in cfg.seeds:
            for spec in ["SFT"] * cfg.sft + list(cfg.divergences):
                run_dir = out / f"seed{seed}" / spec.replace(":", "")
                done = run_dir / "eval.json"
                if done.is_file():  # finished earlier: reused, so an interrupted sweep resumes
                    rows.append(json.loads(done.read_text()))
                    continue
                if cfg.only_finished:
                    continue
                tick, cpu_tick = time.perf_counter(), time.process_time()
                model_dir = model_path if spec == "SFT" else str(_train(cfg, spec, seed, model_path, files, run_dir))
                row = {"seed": seed, "method": "SFT" if spec == "SFT" else label(spec), "spec": spec,
                       **_evaluate(cfg, model_dir, files, scorer, seed), "ece_curve": ece_curve(run_dir),
                       "wall_s": time.perf_counter() - tick, "cpu_s": time.process_time() - cpu_tick}
                atomic_write_text(done, json.dumps(row, indent=1))
                rows.append(row)
                logger.info("seed %d %s: reward %.3f acc %.3f ece %.3f entropy %.3f (%.0fs)", seed, row["method"],
                            row["reward"], row["accuracy"], row["ece"], row["predictive_entropy"] or 0, row["wall_s"])
        if probe is not None:  # cheap (a few hundred MiniLM forwards): scored on the stored samples, not cached
            prompts = [r["prompt"] for r in read_jsonl(files["prompts"])]
            for row in rows:
                row["probe_reward"] = statistics.mean(probe.score(
                    [p for p, texts in zip(prompts, row["samples"]) for _ in texts],
                    [t for texts in row["samples"] for t in texts]))
    labels = ["SFT"] * cfg.sft + [label(s) for s in cfg.divergences]
    table = summary_table(rows, labels)
    results = {"rows": rows, "reward_model": rm_report, "probe": probe.report if probe else None, "config": to_dict(cfg), "model": model_path,
               "total_s": time.perf_counter() - started}
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    rm_acc = f"{rm_report['pairwise_accuracy']:.3f} on {rm_report['eval_pairs']} pairs"
    if probe is not None:
        rm_acc += (f"; MiniLM probe {probe.report['pairwise_accuracy']:.3f} on {probe.report['heldout_pairs']} pairs "
                   f"(p = {probe.report['p_vs_chance']:.3g} against chance)")
    reward = "probe_reward" if probe is not None else "reward"
    per_seed = "\n".join(per_seed_table(rows, labels, m) for m in ("accuracy", "ece", "predictive_entropy",
                                                                       "distinct_2", "self_bleu", reward))
    rule = rule_table(paired_rule(rows, labels, reward=reward), reward=reward)
    atomic_write_text(out / "results.md", f"# f-DPO frontier on HH-RLHF (thesis ch. 2)\n\nSeeds {cfg.seeds}; "
                      f"{cfg.train} training pairs, {cfg.eval} held-out pairs, {cfg.prompts} prompts x "
                      f"{cfg.num_samples} samples; reward model held-out accuracy {rm_acc}.\n\n{table}\n"
                      f"## Per seed\n\n{per_seed}\n## Paired by seed against reverse KL\n\n{rule}")
    plot(out / "frontier.png", rows, labels)
    plot_ece_curves(out / "ece_curves.png", rows, labels)
    print(table + "\n" + rule, end="")
    print(f"reward model: {rm_report}\ntotal {results['total_s']:.0f}s; results in {out}")
    return results


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(prog="python -m mmalign_experiments.fdpo_frontier", config_cls=FrontierConfig,
                       run=lambda cfg, args: run_frontier(cfg) and 0, argv=argv,
                       description="Thesis ch. 2: offline f-DPO (RKL, JS, FKL, alpha) on HH-RLHF with SmolLM2 + LoRA; "
                       "reward and preference accuracy against diversity and ECE.")


if __name__ == "__main__":
    raise SystemExit(main())
