"""Demonstration (thesis ch. 2, §2.8.1): the same online RLOO run under reverse KL, JS, forward KL and α = 0.5, with
the divergence in the loss (§2.8.2) and in the reward (§2.8.1), on the tiny model (a 0.6M-parameter random Llama,
not the thesis' Pythia-2.8B: the machinery and the direction of the penalties, not the thesis' numbers).

Rule fixed before running: for each (divergence, placement, seed) run, report the final policy's reward, diversity
(distinct-1/2 over each prompt's samples, self-BLEU, mean token entropy) and reverse KL to the reference on
held-out samples drawn with one fixed seed; for the in-reward runs also the largest per-sample penalty β·g(t)
seen in training. Seeds are the unit: mean ± sd over seeds per (divergence, placement), and a frontier plot of
reward against reverse KL and against distinct-2. The §2.8.1 instability, measured on the in-reward runs: the
largest β·g(t) of a step (``divergence/penalty_max``) averaged over the first and over the last fifth of the steps
(its growth), and the largest gradient norm of the run. Every number is reported whatever its direction.

    python -m mmalign_experiments.online_divergence --seeds 0 1 2 --steps 30 --out bench/results/online_divergence_results.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

DIVERGENCES = [("reverse_kl", None), ("js", None), ("forward_kl", None), ("alpha", 0.5)]
PROMPTS = ["Say hello.", "How do I bake bread?", "Pick a random number.", "Can you help me?",
           "What is the capital of France?", "Who walked into the room?", "Tell me a story.", "Thanks!"]


def evaluate(final_dir: str, reference_dir: str, samples_per_prompt: int) -> dict:
    import torch

    from mmalign.rewards import RegexReward, score
    from mmalign.shared.metrics import distinct_n, self_bleu
    from mmalign.text.data import PreferenceCollator
    from mmalign.text.modeling.logprobs import batch_logprobs
    from mmalign.text.modeling.loading import load_causal_lm, load_tokenizer
    from mmalign.text.modeling.sampling import sample_completions

    tokenizer = load_tokenizer(final_dir)
    policy, reference = load_causal_lm(final_dir).eval(), load_causal_lm(reference_dir).eval()
    samples = sample_completions(policy, tokenizer, PROMPTS, n=samples_per_prompt, max_new_tokens=12, seed=1234)
    outputs = [t for row in samples.texts for t in row]
    rewards = score(RegexReward("e", count=True), [p for p in PROMPTS for _ in range(samples_per_prompt)], outputs)
    items = [{"prompt_ids": tokenizer(p)["input_ids"], "chosen_ids": ids, "rejected_ids": []}
             for p, ids in zip(PROMPTS, samples.token_ids)]
    batch = PreferenceCollator(tokenizer.pad_token_id, share_prompt=True)(items)
    with torch.no_grad():
        rho = batch_logprobs(policy, batch)[0] - batch_logprobs(reference, batch)[0]
    words = lambda text: list(text)  # noqa: E731 - characters: the tiny model's words are rarely repeated
    per_prompt = lambda fn: statistics.mean(fn(row) for row in samples.texts)  # noqa: E731
    return {
        "reward": float(rewards.mean()),
        "distinct_1": per_prompt(lambda row: distinct_n(row, 1, words)),
        "distinct_2": per_prompt(lambda row: distinct_n(row, 2, words)),
        "self_bleu": per_prompt(lambda row: self_bleu(row, 4, words)),
        "entropy": statistics.mean(e for row in samples.token_entropy for e in row),
        "reverse_kl": float(rho.mean()),  # E_π[log π/π_ref], sequence level
    }


def run(model_dir: str, out: Path, divergence: str, alpha, placement: str, seed: int, steps: int, beta: float) -> dict:
    import mmalign.text
    from mmalign.io import read_jsonl
    from mmalign.testing import write_jsonl

    prompts = out / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": p} for p in PROMPTS])
    algorithm = {"name": "rloo", "beta": beta, "divergence": divergence, "divergence_in": placement}
    if alpha is not None:
        algorithm["alpha"] = alpha
    cfg = {"model": {"name_or_path": model_dir}, "prompts": {"train": str(prompts)},
           "reward": [{"kind": "regex", "pattern": "e", "count": True}], "algorithm": algorithm,
           "sampling": {"k": 4, "max_new_tokens": 12},
           "training": {"batch_size": 4, "max_steps": steps, "learning_rate": 1e-2, "lr_scheduler": "constant",
                        "logging_steps": 1, "progress_bar": False, "plot": False, "num_threads": 1, "seed": seed},
           "output_dir": str(out / "run")}
    summary = mmalign.text.online(cfg)
    result = evaluate(summary["final_dir"], model_dir, 8)
    result.update(training_log_metrics(list(read_jsonl(out / "run" / "metrics.jsonl")), beta, placement))
    return result


def training_log_metrics(rows: list[dict], beta: float, placement: str) -> dict:
    """From a run's metrics.jsonl rows: the last step's divergence, the largest gradient norm and, for an in-reward
    run, the §2.8.1 penalty: the largest β·g(t) of the run and its mean over the first and last fifth of the steps."""
    result = {"train_divergence_last": rows[-1].get("divergence"),
              "grad_norm_max": max(r.get("grad_norm", 0.0) for r in rows)}
    if placement == "reward":
        penalties = [beta * r["divergence/penalty_max"] for r in rows if "divergence/penalty_max" in r]
        fifth = max(1, len(penalties) // 5)
        result["max_penalty"] = max(penalties)
        result["penalty_first"] = statistics.mean(penalties[:fifth])
        result["penalty_last"] = statistics.mean(penalties[-fifth:])
    return result


METRICS = ("reward", "distinct_1", "distinct_2", "self_bleu", "entropy", "reverse_kl", "max_penalty", "penalty_first",
           "penalty_last", "grad_norm_max")


def summarise(runs: list[dict], metrics: tuple = METRICS) -> list[dict]:
    """Mean and sd over seeds for each (divergence, placement) of ``metrics``."""
    cells: dict[tuple, list[dict]] = {}
    for run in runs:
        cells.setdefault((run["divergence"], run["placement"]), []).append(run)
    table = []
    for (divergence, placement), rows in cells.items():
        row = {"divergence": divergence, "placement": placement, "seeds": len(rows)}
        for key in metrics:
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                row[key] = statistics.mean(values)
                row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        table.append(row)
    return table


def plot_frontier(table: list[dict], path: Path, title: str = "online RLOO, tiny model") -> Path:
    """Reward against reverse KL and against distinct-2, one point per (divergence, placement), ± sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmalign.engine.plots import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = dict(zip([d if a is None else f"alpha={a}" for d, a in DIVERGENCES], ["C0", "C1", "C2", "C3"]))
    for ax, key, label in ((axes[0], "reverse_kl", "reverse KL to the reference (nats)"),
                           (axes[1], "distinct_2", "distinct-2 (diversity)")):
        for row in table:
            ax.errorbar(row[key], row["reward"], xerr=row.get(f"{key}_sd") or 0, yerr=row.get("reward_sd") or 0,
                        fmt="o" if row["placement"] == "reward" else "s", color=colors[row["divergence"]],
                        mfc=colors[row["divergence"]] if row["placement"] == "reward" else "none",
                        label=f"{row['divergence']} in {row['placement']}")
        ax.set_xlabel(label)
        ax.set_ylabel("reward (held-out samples)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{title}: reward vs divergence / diversity (mean ± sd over seeds)")
    return save_figure(fig, path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--beta", type=float, default=0.05)
    parser.add_argument("--divergences", nargs="+", default=None, help="a subset, e.g. reverse_kl js")
    parser.add_argument("--out", default="bench/results/online_divergence_results.json")
    parser.add_argument("--plot", default="bench/results/online_divergence_frontier.png", help="frontier plot ('' = none)")
    args = parser.parse_args(argv)
    import torch

    from mmalign.testing import save_tiny_model_and_tokenizer

    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(save_tiny_model_and_tokenizer(Path(tmp) / "tiny"))
        for seed in args.seeds:
            for placement in ("loss", "reward"):
                for divergence, alpha in [d for d in DIVERGENCES if not args.divergences or d[0] in args.divergences]:
                    with tempfile.TemporaryDirectory() as out:
                        row = {"divergence": divergence if alpha is None else f"alpha={alpha}", "placement": placement,
                               "seed": seed, **run(model_dir, Path(out), divergence, alpha, placement, seed,
                                                   args.steps, args.beta)}
                    results.append(row)
                    print(json.dumps(row), flush=True)
    table = summarise(results)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "beta": args.beta, "seeds": args.seeds,
                                          "summary": table, "runs": results}, indent=1))
    print(json.dumps(table, indent=1))
    if args.plot:
        print("frontier plot:", plot_frontier(table, Path(args.plot)))


if __name__ == "__main__":
    main()
