"""The held-out metric against the group size k at a noise rate (docs/label-noise.md, "k = 1…5 at p = 0.3"; the
rule was fixed before the k = 2 and k = 4 runs).

Per seed, the curve is the held-out entropy of DPO k=1 (= mDPO with k = 1) and of every mDPO k at that rate:

- **slope**: the ordinary least-squares slope of entropy on k (nats per group member); Remark 1 predicts > 0;
- **shape** of the rise from the smallest to the largest k, from the increments between neighbouring k:
  ``no rise`` (last ≤ first), ``step at k = a→b`` (one increment is more than half the total rise), ``steady rise``
  (every increment positive, none more than half), else ``uneven rise``;
- **verdict**: ``supported`` iff the slope is positive in every seed and every seed has the whole curve; ``not
  supported`` if some complete seed's slope is ≤ 0; otherwise (all complete seeds positive, some seed incomplete) it
  is stated for the complete seeds only.

The expected label error of a group of k is the chance that the majority of its k votes is wrong, an even k's tie
broken by a fair coin (the driver's ``noisy_rows``): at p = 0.3, 0.300 for k = 1 and 2, 0.216 for 3 and 4, 0.163 for 5.
"""
from __future__ import annotations

import statistics
from math import comb
from typing import Any


def expected_label_error(k: int, p: float) -> float:
    """P(the majority of k independent votes, each wrong w.p. p, is wrong), a tie counting half."""
    def prob(j: int) -> float:
        return comb(k, j) * p**j * (1 - p) ** (k - j)

    return sum(prob(j) for j in range(k + 1) if 2 * j > k) + sum(0.5 * prob(j) for j in range(k + 1) if 2 * j == k)


def ls_slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def shape(ks: list[int], values: list[float]) -> str:
    """``no rise`` / ``step at k = a→b`` / ``steady rise`` / ``uneven rise`` (module docstring)."""
    steps = [b - a for a, b in zip(values, values[1:])]
    rise = values[-1] - values[0]
    if rise <= 0:
        return "no rise"
    j = max(range(len(steps)), key=steps.__getitem__)
    if steps[j] > rise / 2:
        return f"step at k = {ks[j]}→{ks[j + 1]}"
    return "steady rise" if all(s > 0 for s in steps) else "uneven rise"


def _on_curve(row: dict[str, Any]) -> bool:
    return row["method"] == "DPO k=1" or row["method"].startswith("mDPO k=")


def k_trend(rows: list[dict[str, Any]], rates: list[float], metric: str = "entropy") -> tuple[str, dict[str, Any]]:
    """(markdown section, {rate: per-seed slopes, shapes, mean curve, verdict}) for every rate with at least three
    group sizes on the curve; ``("", {})`` when there is none."""
    md, out = "", {}
    seeds = sorted({r["seed"] for r in rows})
    for rate in rates:
        curve = {(r["seed"], r["k"]): r for r in rows if r.get("rate") == rate and _on_curve(r)}
        ks = sorted({k for _, k in curve})
        if len(ks) < 3:
            continue
        complete = [s for s in seeds if all((s, k) in curve for k in ks)]
        per_seed = {s: [curve[s, k][metric] for k in ks] for s in complete}
        slopes = {s: ls_slope(ks, v) for s, v in per_seed.items()}
        shapes = {s: shape(ks, v) for s, v in per_seed.items()}
        mean_curve = [statistics.mean(per_seed[s][i] for s in complete) for i in range(len(ks))] if complete else []
        positive = sum(v > 0 for v in slopes.values())
        if complete and positive < len(complete):
            verdict = "not supported"
        elif complete and len(complete) == len(seeds):
            verdict = "supported"
        else:
            verdict = f"slope > 0 in {positive}/{len(complete)} complete seeds; seeds {sorted(set(seeds) - set(complete))} incomplete"
        out[str(rate)] = {"ks": ks, "seeds": complete, "slopes": slopes, "shapes": shapes, "mean_curve": mean_curve,
                          "mean_shape": shape(ks, mean_curve) if mean_curve else None, "verdict": verdict}
        head = "| seed | " + " | ".join(f"k = {k}" for k in ks) + " | LS slope (per member) | shape |"
        lines = [f"\nHeld-out {metric} against k at p = {rate:g} (k = 1: DPO k=1; the rule of docs/label-noise.md):", "",
                 head, "|---|" + "---|" * (len(ks) + 2)]
        lines += [f"| {s} | " + " | ".join(f"{v:.3f}" for v in per_seed[s]) + f" | {slopes[s]:+.4f} | {shapes[s]} |"
                  for s in complete]
        if mean_curve:
            lines.append("| mean | " + " | ".join(f"{v:.3f}" for v in mean_curve) +
                         f" | {ls_slope(ks, mean_curve):+.4f} | {shape(ks, mean_curve)} |")
        wrong = {k: [curve[s, k]["wrong_label_rate"] for s in complete] for k in ks}
        lines += ["", "| k | expected label error | realised, per seed |", "|---|---|---|"]
        lines += [f"| {k} | {expected_label_error(k, rate):.3f} | " + ", ".join(f"{w:.3f}" for w in wrong[k]) + " |"
                  for k in ks]
        lines += ["", f"Verdict by the rule at p = {rate:g}: **{verdict}** (slope > 0 in {positive} of "
                  f"{len(complete)} complete seeds).", ""]
        md += "\n".join(lines) + "\n"
    return md, out
