"""Demonstration 2b at another β (docs/online-demos.md §2b, "β = 0.2"): does a larger β let the divergences
separate? The spread between the divergences' in-loss cells, per seed, against the stored β = 0.05 run.

    python -m mmalign_experiments.online_divergence_smollm2 --seeds 0 1 2 --jobs 2 --steps 5 --beta 0.2 \\
        --cells reverse_kl-loss forward_kl-loss js-loss alpha=0.5-loss \\
        --work outputs/online-divergence-smollm2-beta0.2 \\
        --spread-against bench/results/online_divergence_smollm2_results.json \\
        --out bench/results/online_divergence_smollm2_beta0.2_results.json --plot ''

Design (fixed before any β = 0.2 run): §2b's setting unchanged (demonstration 1's pieces, RLOO, LoRA r = 16 on the
top 4 blocks, k = 4 samples of ≤ 16 tokens for 2 questions a step, lr 1e-3, 5 steps, the same held-out measurement
and seeds) but β = 0.2 instead of 0.05, and only the four in-loss cells (reverse KL, JS, forward KL, α = 0.5).

Analysis rule (fixed before running):
- rule (a) of §2b unchanged, on the β = 0.2 in-loss cells: thesis §2.5's diversity order, pair by pair, by entropy,
  distinct-2 (higher = more diverse) and self-BLEU (lower = more diverse); a direction only when it holds in every
  seed (paired), else not resolved (the driver's ``comparisons``);
- the spread: per seed s and metric m (reward, entropy, distinct-2, self-BLEU, reverse KL), spread_s = max − min of m
  over the four in-loss cells of seed s (a seed counts only when all four finished). "grew" iff the β = 0.2
  spread is larger than the stored β = 0.05 one in every seed, "shrank" iff smaller in every seed, else not
  resolved. Every number is reported whatever its direction.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from mmalign_experiments.sweep import same_sign_verdict

SPREAD_METRICS = ("reward", "entropy", "distinct_2", "self_bleu", "reverse_kl")
IN_LOSS = ("reverse_kl", "js", "forward_kl", "alpha=0.5")


def spread_per_seed(runs: Sequence[dict], metrics: Sequence[str] = SPREAD_METRICS) -> dict[str, dict[int, float]]:
    """Per metric and seed: max − min over the four in-loss cells of that seed (seeds missing a cell left out)."""
    cells: dict[int, dict[str, dict]] = {}
    for run in runs:
        if run.get("placement") == "loss" and run.get("divergence") in IN_LOSS:
            cells.setdefault(run["seed"], {})[run["divergence"]] = run
    out: dict[str, dict[int, float]] = {m: {} for m in metrics}
    for seed, by_divergence in sorted(cells.items()):
        if len(by_divergence) < len(IN_LOSS):
            continue
        for m in metrics:
            values = [by_divergence[d][m] for d in IN_LOSS if by_divergence[d].get(m) is not None]
            if len(values) == len(IN_LOSS):
                out[m][seed] = max(values) - min(values)
    return out


def compare_spread(runs: Sequence[dict], stored_runs: Sequence[dict]) -> dict[str, Any]:
    """The rule's spread comparison: this run's spread against the stored run's, paired per seed."""
    new, old = spread_per_seed(runs), spread_per_seed(stored_runs)
    out: dict[str, Any] = {}
    for m in SPREAD_METRICS:
        seeds = sorted(set(new[m]) & set(old[m]))
        entry: dict[str, Any] = {"seeds": seeds, "spread": [new[m][s] for s in seeds],
                                 "stored_spread": [old[m][s] for s in seeds]}
        diffs = [new[m][s] - old[m][s] for s in seeds]
        entry["verdict"] = same_sign_verdict(diffs, "grew", "shrank") if seeds else "no common seed"
        out[m] = entry
    return out


def stored_runs(path: Path, settings: dict[str, Any]) -> tuple[list[dict], float]:
    """The runs of a stored results file whose settings are ``settings`` but for β; returns them and its β."""
    stored = json.loads(Path(path).read_text())
    other = dict(stored.get("settings") or {})
    beta = other.pop("beta", None)
    if other != {k: v for k, v in settings.items() if k != "beta"}:
        raise SystemExit(f"--spread-against {path}: its settings {stored.get('settings')} differ from this run's "
                         f"{settings} in more than beta")
    return stored["runs"], beta


def markdown(comparison: dict[str, Any], beta: float, stored_beta: float) -> str:
    lines = [f"| metric | spread at β = {beta} (per seed) | at β = {stored_beta} | verdict |", "|---|---|---|---|"]
    for m, entry in comparison.items():
        fmt = lambda values: ", ".join(f"{v:.3g}" for v in values)  # noqa: E731
        lines.append(f"| {m} | {fmt(entry['spread'])} | {fmt(entry['stored_spread'])} | {entry['verdict']} |")
    return "\n".join(lines)
