"""Demonstration 2 (thesis ch. 2, §2.8.1–2.8.2) in demonstration 1's setting: SmolLM2-135M-Instruct trained online
against the vanilla sycophancy reward model under reverse KL, JS, forward KL and α = 0.5, each with the divergence
in the loss (§2.8.2 estimator) and in the reward (§2.8.1 penalty ``r − β·g(t)``, ``t = π_ref/π``).

Design (fixed and committed before any result was read):
- pieces of :mod:`mmalign_experiments.online_sycophancy`, reused as they are: its data, its vanilla Bradley–Terry
  reward model and its warm start (SFT on prefix-balanced correct answers), both built once in its work folder
  (``--pieces``, default ``outputs/online-sycophancy``) and reused from there;
- each cell = (divergence, placement, seed): its ``train_policy`` (RLOO, LoRA r = 16 on the top 4 blocks, reference =
  the adapter-disabled warm start, k = 4 samples of ≤ 16 new tokens for 2 questions a step, β = 0.05, lr 1e-3,
  10 steps, chat template) with only the ``algorithm:`` section changed; seeds 0, 1, 2 (seed s: the same training
  questions and first rollout in every cell, so seeds pair across cells);
- measurement: the first 16 of demonstration 1's held-out questions × 4 answers each, temperature 1, ≤ 16 new
  tokens, one fixed seed (1234), for every cell and for the warm start.

Analysis rule (fixed before running). Per cell, on the held-out answers: *reward* = the vanilla RM's mean score;
*sycophancy* and *accuracy* as demonstration 1; diversity = distinct-1/2 and self-BLEU-4 over each question's 4
answers (whitespace words; mean over the questions where defined, i.e. some answer has n words) and the mean token entropy of the sampling distribution;
*reverse KL* = mean over answers of log π(y|x) − log π_ref(y|x) (sequence level, π_ref = the warm start). From the
training log: reward at the first and last step, the largest gradient norm, and for in-reward cells the §2.8.1
penalty: the largest β·g(t) of each step, its run maximum and its mean over the first and the last fifth of the
steps. Mean ± sd over seeds per (divergence, placement). Named comparisons, a direction claimed only when it holds
in every seed (seeds paired), else "not resolved":
(a) thesis §2.5 (entropy: reverse KL lowest, forward KL highest, JS between; α = 0.5 between JS and forward KL),
    on the in-loss cells: entropy and distinct-2 (higher = more diverse), self-BLEU (lower = more diverse);
(b) thesis Fig. 2.2 (the penalty in the loss beats it in the reward for JS, forward KL and α): per divergence, one
    placement dominates iff in every seed its reward is higher and its reverse KL no larger;
(c) thesis §2.8.1 (forward KL's penalty grows fastest, reverse KL's slowest): on the in-reward cells, the ordering
    of the last-fifth mean and of the run maximum of β·g(t), per seed.
Every number is reported whatever its direction. Budget (docs/online-demos.md §2b): ≈ 80 CPU-s a 10-step cell; on
the shared box of the first run the grid was cut to 5 steps and α in the loss only, before it started. If time runs out, cells finish in the order of ``CELL_ORDER``
(every seed of a cell before the next cell) and ``--finished-only`` summarises what finished; ``--reuse <an earlier
results JSON>`` counts that file's cells as finished (same settings only), so a grid can be completed elsewhere.

    python -m mmalign.text.smollm   # converts the offline SmolLM2-135M-Instruct GGUF once
    python -m mmalign_experiments.online_divergence_smollm2 --seeds 0 1 2 --jobs 2 \\
        --out bench/results/online_divergence_smollm2_results.json \\
        --plot bench/results/online_divergence_smollm2_frontier.png
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional

from mmalign_experiments import online_divergence as tiny_demo
from mmalign_experiments import online_sycophancy as demo1
from mmalign_experiments.sweep import same_sign_verdict

# Demonstration 1's data sizes (its defaults: 10 steps × 2 questions; 32 held-out questions), so that its files and
# pieces are the ones demonstration 1 used.
DEMO1_PROMPTS, DEMO1_HELDOUT = 20, 32
# Priority when time is short: the reverse/forward KL pair in both placements first, α's in-reward cell last.
CELL_ORDER = [("reverse_kl", "loss"), ("reverse_kl", "reward"), ("forward_kl", "loss"), ("forward_kl", "reward"),
              ("js", "loss"), ("js", "reward"), ("alpha=0.5", "loss"), ("alpha=0.5", "reward")]
METRICS = tiny_demo.METRICS + ("sycophancy", "accuracy", "reward_first", "reward_last")


def algorithm_section(divergence: str, placement: str, beta: float) -> dict[str, Any]:
    """The online ``algorithm:`` section of a cell (``alpha=0.5`` → the α-divergence with α = 0.5)."""
    name, _, alpha = divergence.partition("=")
    section = {"name": "rloo", "beta": beta, "divergence": name, "divergence_in": placement}
    if alpha:
        section["alpha"] = float(alpha)
    return section


def evaluate(policy_dir: str, reference_dir: str, rm_dir: Path, heldout: list[dict], samples: int,
             max_new_tokens: int, chat: bool) -> dict[str, Any]:
    """The rule's held-out measurement of one policy (module docstring)."""
    import torch

    from mmalign.rewards.models import RewardModelReward
    from mmalign.rewards import score
    from mmalign.shared.metrics import distinct_n, self_bleu
    from mmalign.text.data import PreferenceCollator, render_prompt
    from mmalign.text.modeling.loading import load_model_for_eval
    from mmalign.text.modeling.logprobs import batch_logprobs
    from mmalign.text.modeling.sampling import sample_completions

    policy, tokenizer = load_model_for_eval(policy_dir)
    reference, _ = load_model_for_eval(reference_dir)
    rendered = [render_prompt(tokenizer, row["prompt"], use_chat_template=chat) for row in heldout]
    special = rendered[0][1]
    with torch.no_grad():
        out = sample_completions(policy, tokenizer, [text for text, _ in rendered], n=samples,
                                 max_new_tokens=max_new_tokens, temperature=1.0, seed=demo1.EVAL_SEED,
                                 add_special_tokens=special, fast_decode=True)
        items = [{"prompt_ids": tokenizer(text, add_special_tokens=special)["input_ids"], "chosen_ids": ids,
                  "rejected_ids": []} for (text, _), ids in zip(rendered, out.token_ids)]
        batch = PreferenceCollator(tokenizer.pad_token_id, share_prompt=True)(items)
        rho = batch_logprobs(policy, batch)[0] - batch_logprobs(reference, batch)[0]
    responses = [t for row in out.texts for t in row]
    rewards = score(RewardModelReward(rm_dir / "final"), [row["prompt"] for row in heldout for _ in range(samples)],
                    responses)
    return {"reward": float(rewards.mean()),
            **demo1.answer_metrics(responses, [row["answer"] for row in heldout for _ in range(samples)]),
            "distinct_1": mean_over_questions(lambda row: distinct_n(row, 1), out.texts),
            "distinct_2": mean_over_questions(lambda row: distinct_n(row, 2), out.texts),
            "self_bleu": mean_over_questions(lambda row: self_bleu(row, 4), out.texts),
            "entropy": statistics.mean(e for row in out.token_entropy for e in row),
            "reverse_kl": float(rho.mean()),
            "examples": responses[:4]}


def mean_over_questions(metric, answers: list[list[str]]) -> Optional[float]:
    """``metric`` of each question's answers, averaged over the questions where it is defined (a question whose
    answers hold no n-gram of the size asked is skipped); None when it is defined for none."""
    values = []
    for row in answers:
        try:
            values.append(metric(row))
        except (ValueError, ZeroDivisionError):
            continue
    return statistics.mean(values) if values else None


def run_cell(job: tuple) -> dict[str, Any]:
    """One (divergence, placement, seed) cell — or the warm start (divergence None) — reused when finished with the
    same settings (a process-pool job)."""
    import torch

    from mmalign.io import read_jsonl

    # one thread in every worker: the warm start's measurement calls no train_policy (which sets it) — in session
    # 10 it ran at torch's default and its entropy differed in the 8th digit from a 1-thread run
    torch.set_num_threads(1)
    divergence, placement, seed, work, pieces, policy, heldout, args = job
    name = "warm-start" if divergence is None else f"{divergence}-{placement}-seed{seed}"
    cell, settings = work / "cells" / name, demo1.run_settings(args)
    cached = cell / "result.json"
    if cached.is_file() and json.loads(cached.read_text())["settings"] == settings:
        return json.loads(cached.read_text())["result"]
    shutil.rmtree(cell, ignore_errors=True)  # an unfinished cell is started again from scratch
    cell.mkdir(parents=True)
    start = time.time()
    row: dict[str, Any] = {"divergence": divergence, "placement": placement, "seed": seed}
    final = policy
    if divergence is not None:
        run = demo1.train_policy(cell / "run", policy, pieces / "rm-vanilla", pieces / "data" / "prompts.jsonl", seed,
                                 args, algorithm=algorithm_section(divergence, placement, args.beta))
        final = run.pop("final_dir")
        row.update(run)
        row.update(tiny_demo.training_log_metrics(list(read_jsonl(cell / "run" / "metrics.jsonl")), args.beta,
                                                  placement))
    row.update(evaluate(final, policy, pieces / "rm-vanilla", heldout, args.eval_samples, args.max_new_tokens,
                        args.chat))
    row["cell_seconds"] = round(time.time() - start, 1)
    cached.write_text(json.dumps({"settings": settings, "result": row}, indent=1))
    print(json.dumps(row), flush=True)
    return row


def finished_cells(work: Path, args) -> list[dict]:
    """The cells already measured under the current settings (for ``--finished-only``; ``--cells`` selects)."""
    settings, rows = demo1.run_settings(args), []
    for path in sorted((work / "cells").glob("*/result.json")):
        stored = json.loads(path.read_text())
        result = stored["result"]
        chosen = not args.cells or result["divergence"] is None or \
            f"{result['divergence']}-{result['placement']}" in args.cells
        if stored["settings"] == settings and chosen:
            rows.append(result)
    return rows


def restore_cells(results: Path, work: Path, args) -> int:
    """``--reuse``: the cells of an earlier results file (its ``runs``) become finished cells of ``work``, so that a
    run on a new machine completes a grid instead of repeating it; returns how many were stored. Refused unless the
    file's settings are this run's. A cell ``work`` holds already is kept, and the warm start is never taken (it is
    measured again: equal figures show that the rebuilt pieces are the ones the file's cells used). Each stored
    cell says where it came from (``reused_from``)."""
    stored, settings = json.loads(results.read_text()), demo1.run_settings(args)
    if stored.get("settings") != settings:
        raise SystemExit(f"--reuse {results}: its settings {stored.get('settings')} are not this run's {settings}")
    restored = 0
    for row in stored["runs"]:
        cell = work / "cells" / f"{row['divergence']}-{row['placement']}-seed{row['seed']}"
        if (cell / "result.json").is_file():
            continue
        cell.mkdir(parents=True, exist_ok=True)
        row = {**row, "reused_from": row.get("reused_from", str(results))}
        (cell / "result.json").write_text(json.dumps({"settings": settings, "result": row}, indent=1))
        restored += 1
    return restored


def per_seed(runs: list[dict], keys: tuple = ("reward", "reverse_kl", "distinct_2", "entropy", "penalty_last")) -> dict:
    """Per (divergence, placement): each key's values in seed order (the bracketed columns of the table)."""
    cells: dict[str, dict[str, list]] = {}
    for run in sorted(runs, key=lambda r: r["seed"]):
        cell = cells.setdefault(f"{run['divergence']} in {run['placement']}", {})
        for key in keys:
            if run.get(key) is not None:
                cell.setdefault(key, []).append(round(run[key], 4))
    return cells


def paired_verdict(runs: list[dict], a: tuple, b: tuple, key: str) -> Optional[str]:
    """``a > b`` or ``a < b`` on ``key`` when it holds in every seed both cells finished (paired by seed), else
    ``not resolved``; None without a common seed. Cells are (divergence, placement)."""
    values = {cell: {r["seed"]: r[key] for r in runs if (r["divergence"], r["placement"]) == cell
                     and r.get(key) is not None} for cell in (a, b)}
    seeds = sorted(set(values[a]) & set(values[b]))
    if not seeds:
        return None
    diffs = [values[a][s] - values[b][s] for s in seeds]
    name = lambda cell: f"{cell[0]} in {cell[1]}"  # noqa: E731
    return same_sign_verdict(diffs, f"{name(a)} > {name(b)}", f"{name(a)} < {name(b)}")


def comparisons(runs: list[dict]) -> dict[str, Any]:
    """The rule's named comparisons (module docstring): (a) diversity order of the in-loss cells, (b) loss vs reward
    placement per divergence, (c) the order of the in-reward cells' §2.8.1 penalty, per seed."""
    divergences = list(dict.fromkeys(d for d, _ in CELL_ORDER))
    diversity = {key: {f"{a} vs {b}": paired_verdict(runs, (a, "loss"), (b, "loss"), key)
                       for i, a in enumerate(divergences) for b in divergences[i + 1:]}
                 for key in ("entropy", "distinct_2", "self_bleu")}
    placement = {}
    for divergence in divergences:
        reward = paired_verdict(runs, (divergence, "loss"), (divergence, "reward"), "reward")
        drift = paired_verdict(runs, (divergence, "loss"), (divergence, "reward"), "reverse_kl")
        if reward is None:
            continue
        # verdicts read "<divergence> in loss ? <divergence> in reward"
        if " > " in reward and drift is not None and " < " in drift:
            placement[divergence] = "loss dominates"
        elif " < " in reward and drift is not None and " > " in drift:
            placement[divergence] = "reward dominates"
        else:
            placement[divergence] = f"not resolved (reward: {reward}; reverse KL: {drift})"
    penalty = {}
    for key in ("penalty_last", "max_penalty"):
        for seed in sorted({r["seed"] for r in runs}):
            cells = [r for r in runs if r["seed"] == seed and r["placement"] == "reward" and r.get(key) is not None]
            penalty.setdefault(key, {})[seed] = [r["divergence"] for r in sorted(cells, key=lambda r: -r[key])]
    return {"diversity_in_loss": diversity, "placement": placement, "penalty_order_largest_first": penalty}


def summary(runs: list[dict], warm: Optional[dict], args) -> dict[str, Any]:
    rank = {cell: i for i, cell in enumerate(CELL_ORDER)}  # one order whatever the order the cells finished in
    trained = sorted((r for r in runs if r["divergence"] is not None),
                     key=lambda r: (rank.get((r["divergence"], r["placement"]), len(rank)), r["seed"]))
    return {"settings": demo1.run_settings(args), "seeds": args.seeds, "warm_start": warm,
            "summary": tiny_demo.summarise(trained, METRICS), "per_seed": per_seed(trained),
            "comparisons": comparisons(trained), "runs": trained}


TABLE_COLUMNS = (("reward", "reward"), ("sycophancy", "sycophancy"), ("accuracy", "accuracy"),
                 ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("self_bleu", "self-BLEU"),
                 ("entropy", "entropy"), ("reverse_kl", "reverse KL"), ("max_penalty", "max β·g(t)"),
                 ("penalty_first", "β·g(t) first fifth"), ("penalty_last", "last fifth"),
                 ("grad_norm_max", "max grad norm"))


def markdown_table(result: dict[str, Any]) -> str:
    """The summary as a markdown table: mean ± sd over seeds, the per-seed values in brackets for the key columns
    (``per_seed``), and the warm start's row first."""
    header = "| divergence | placement | seeds | " + " | ".join(label for _, label in TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (3 + len(TABLE_COLUMNS))]
    warm = result.get("warm_start") or {}
    if warm:
        lines.append("| warm start | – | – | " + " | ".join(
            f"{warm[key]:.3g}" if warm.get(key) is not None else "" for key, _ in TABLE_COLUMNS) + " |")
    for row in result["summary"]:
        seeds = result["per_seed"].get(f"{row['divergence']} in {row['placement']}", {})
        cells = []
        for key, _ in TABLE_COLUMNS:
            if row.get(key) is None:
                cells.append("")
                continue
            text = f"{row[key]:.3g}" + (f" ± {row[key + '_sd']:.2g}" if row.get(key + "_sd") is not None else "")
            if key in seeds:
                text += " (" + ", ".join(f"{v:.3g}" for v in seeds[key]) + ")"
            cells.append(text)
        lines.append(f"| {row['divergence']} | {row['placement']} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=demo1.SMOLLM2, help="base of the policy and the reward model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cells", nargs="+", default=None, help="a subset, e.g. reverse_kl-loss forward_kl-reward")
    parser.add_argument("--steps", type=int, default=10, help="online steps per run")
    parser.add_argument("--batch-size", type=int, default=2, help="questions per step")
    parser.add_argument("--k", type=int, default=4, help="samples per question")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-top-layers", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.05)
    parser.add_argument("--eval-prompts", type=int, default=16, help="held-out questions (demonstration 1's first N)")
    parser.add_argument("--eval-samples", type=int, default=4, help="answers per held-out question")
    parser.add_argument("--no-chat", dest="chat", action="store_false")
    parser.add_argument("--sft-steps", type=int, default=16, help="warm start (demonstration 1's)")
    parser.add_argument("--sft-lr", type=float, default=1e-4)
    parser.add_argument("--rm-set", action="append", default=[], help="reward-model recipe override key=value")
    parser.add_argument("--jobs", type=int, default=2, help="cells in parallel processes (one thread each)")
    parser.add_argument("--pieces", default="outputs/online-sycophancy", help="demonstration 1's work folder")
    parser.add_argument("--work", default="outputs/online-divergence-smollm2")
    parser.add_argument("--finished-only", action="store_true", help="summarise the finished cells, run nothing")
    parser.add_argument("--reuse", default=None,
                        help="an earlier results JSON (same settings): its cells count as finished here")
    parser.add_argument("--spread-against", default=None,
                        help="a stored results JSON, same settings but β: the in-loss cells' spread per seed compared "
                             "(mmalign_experiments.online_divergence_spread)")
    parser.add_argument("--out", default="bench/results/online_divergence_smollm2_results.json")
    parser.add_argument("--plot", default="bench/results/online_divergence_smollm2_frontier.png", help="'' = none")
    args = parser.parse_args(argv)
    import torch

    from mmalign.io import read_jsonl

    torch.set_num_threads(1)
    start = time.time()
    if args.spread_against:  # refused before anything runs unless its settings are this run's but β
        from mmalign_experiments import online_divergence_spread as spread

        stored, stored_beta = spread.stored_runs(Path(args.spread_against), demo1.run_settings(args))
    work, pieces, model = Path(args.work), Path(args.pieces), os.path.expanduser(args.model)
    if args.reuse:
        print(f"--reuse: {restore_cells(Path(args.reuse), work, args)} cells taken from {args.reuse}", flush=True)
    if args.finished_only:
        runs = finished_cells(work, args)
        warm = next((r for r in runs if r["divergence"] is None), None)
    else:
        paths = demo1.write_data(pieces, DEMO1_PROMPTS, DEMO1_HELDOUT)
        demo1.train_reward_models(pieces, model, paths, args.rm_set, ["vanilla"])
        policy = demo1.warm_start(pieces, model, paths, args)
        heldout = list(read_jsonl(paths["heldout"]))[:args.eval_prompts]
        order = [c for c in CELL_ORDER if not args.cells or f"{c[0]}-{c[1]}" in args.cells]
        jobs = [(None, None, 0, work, pieces, policy, heldout, args)]
        jobs += [(d, p, seed, work, pieces, policy, heldout, args) for d, p in order for seed in args.seeds]
        if args.jobs > 1:  # separate processes, one thread each (spawned: no forked torch state)
            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                runs = list(pool.map(run_cell, jobs))
        else:
            runs = [run_cell(job) for job in jobs]
        warm = runs[0]
    result = summary(runs, warm, args)
    result["wall_seconds"] = round(time.time() - start, 1)
    if args.spread_against:
        result["spread_against"] = {"file": args.spread_against, "beta": stored_beta,
                                    "spread": spread.compare_spread(result["runs"], stored)}
        print(spread.markdown(result["spread_against"]["spread"], args.beta, stored_beta))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown_table(result))
    print(json.dumps(result["comparisons"], indent=1))
    if args.plot and result["summary"]:
        print("frontier plot:", tiny_demo.plot_frontier(result["summary"], Path(args.plot),
                                                       title="online RLOO, SmolLM2-135M vs the vanilla RM"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
