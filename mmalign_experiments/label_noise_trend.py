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

The curve at a noise rate against the noiseless one (docs/label-noise-k.md, session 14; the rule was fixed before the
k = 2 and k = 4 runs at p = 0), per seed, with e(p, k) the held-out entropy:

- the step k = 1→2 without noise, S0 = e(0, 2) − e(0, 1), and with it, Sp = e(p, 2) − e(p, 1); Δ = Sp − S0. Verdict
  on the step: ``group-size effect`` if S0 > 0 in every seed and not Δ > 0 in every seed; ``both`` if both hold;
  ``noise effect`` if only Δ > 0 holds in every seed; else ``not resolved``;
- the whole curve: D = slope(p) − slope(0) over the k both rates have; ``steeper with noise`` iff D > 0 in every seed,
  else ``not steeper``.
"""
from __future__ import annotations

import statistics
from math import comb
from pathlib import Path
from typing import Any, Optional


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


def _curves(rows: list[dict[str, Any]], rate: float, metric: str) -> dict[tuple[int, int], float]:
    return {(r["seed"], r["k"]): r[metric] for r in rows if r.get("rate") == rate and _on_curve(r)}


def _all_positive(values: list[float]) -> bool:
    return bool(values) and all(v > 0 for v in values)


def noise_contrast(rows: list[dict[str, Any]], rate: float, base_rate: float = 0.0,
                   metric: str = "entropy") -> tuple[str, dict[str, Any]]:
    """(markdown section, per-seed S0, Sp, Δ, slopes, D and the two verdicts of the module docstring) comparing the
    k-curve at ``rate`` with the one at ``base_rate``; ``("", {})`` unless both rates have k = 1, 2 and a third k."""
    noisy, clean = _curves(rows, rate, metric), _curves(rows, base_rate, metric)
    ks = sorted({k for _, k in noisy} & {k for _, k in clean})
    if len(ks) < 3 or ks[:2] != [1, 2]:
        return "", {}
    seeds = sorted({r["seed"] for r in rows if r.get("rate") in (rate, base_rate)})
    complete = [s for s in seeds if all((s, k) in noisy and (s, k) in clean for k in ks)]
    per_seed = {}
    for s in complete:
        s0, sp = clean[s, 2] - clean[s, 1], noisy[s, 2] - noisy[s, 1]
        slope0, slopep = ls_slope(ks, [clean[s, k] for k in ks]), ls_slope(ks, [noisy[s, k] for k in ks])
        per_seed[s] = {"S0": s0, "Sp": sp, "delta": sp - s0, "slope0": slope0, "slopep": slopep, "D": slopep - slope0,
                       "noise_effect": {k: noisy[s, k] - clean[s, k] for k in ks}}
    a = _all_positive([v["S0"] for v in per_seed.values()])
    b = _all_positive([v["delta"] for v in per_seed.values()])
    step = {(True, False): "group-size effect", (True, True): "both", (False, True): "noise effect",
            (False, False): "not resolved"}[a, b]
    curve = "steeper with noise" if _all_positive([v["D"] for v in per_seed.values()]) else "not steeper"
    missing = sorted(set(seeds) - set(complete))
    note = f" (complete seeds {complete} only; seeds {missing} missing)" if missing else ""
    mean = {key: statistics.mean(v[key] for v in per_seed.values()) if per_seed else float("nan")
            for key in ("S0", "Sp", "delta", "slope0", "slopep", "D")}
    out = {"rate": rate, "base_rate": base_rate, "ks": ks, "seeds": complete, "missing_seeds": missing,
           "per_seed": per_seed, "mean": mean, "step_verdict": step, "curve_verdict": curve,
           "share_of_step_without_noise": mean["S0"] / mean["Sp"] if per_seed and mean["Sp"] else None}
    p, q = f"{rate:g}", f"{base_rate:g}"
    lines = [f"\nHeld-out {metric}, p = {p} against p = {q} (the rule of docs/label-noise-k.md, session 14):", "",
             f"| seed | S0 = step 1→2 at p = {q} | Sp = step 1→2 at p = {p} | Δ = Sp − S0 | slope at p = {q} | "
             f"slope at p = {p} | D = difference |", "|---|---|---|---|---|---|---|"]
    cells = ("S0", "Sp", "delta", "slope0", "slopep", "D")
    lines += [f"| {s} | " + " | ".join(f"{v[c]:+.3f}" for c in cells) + " |" for s, v in per_seed.items()]
    if per_seed:
        lines.append("| mean | " + " | ".join(f"{mean[c]:+.3f}" for c in cells) + " |")
    lines += ["", f"Noise effect e(p = {p}, k) − e(p = {q}, k) per k:", "", "| k | per seed | mean |", "|---|---|---|"]
    for k in ks:
        effects = [v["noise_effect"][k] for v in per_seed.values()]
        lines.append(f"| {k} | " + ", ".join(f"{e:+.3f}" for e in effects) +
                     (f" | {statistics.mean(effects):+.3f} |" if effects else " | – |"))
    lines += ["", f"Verdict on the step k = 1→2: **{step}** (S0 > 0 in {sum(v['S0'] > 0 for v in per_seed.values())}"
              f", Δ > 0 in {sum(v['delta'] > 0 for v in per_seed.values())} of {len(per_seed)} seeds){note}. "
              f"The whole curve: **{curve}** (D > 0 in {sum(v['D'] > 0 for v in per_seed.values())} of "
              f"{len(per_seed)} seeds).", ""]
    return "\n".join(lines) + "\n", out


def plot_k_curves(path: str | Path, rows: list[dict[str, Any]], rates: list[float], metric: str = "entropy") -> Optional[Path]:
    """The held-out metric against k, one panel per rate with at least two k on the curve: a thin line per seed, the
    mean over seeds thick (the other rates' means dashed grey). Returns the file, or None when no rate has a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmalign_experiments.sweep import finish_figure

    curves = {p: _curves(rows, p, metric) for p in rates}
    curves = {p: c for p, c in curves.items() if len({k for _, k in c}) >= 2}
    if not curves:
        return None

    def mean_curve(c: dict[tuple[int, int], float]) -> tuple[list[int], list[float]]:
        ks = sorted({k for _, k in c})
        return ks, [statistics.mean(v for (_, k2), v in c.items() if k2 == k) for k in ks]

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), sharey=True, squeeze=False)
    for ax, (p, c) in zip(axes[0], curves.items()):
        others = [other for other in curves if other != p]
        for other in others:
            ax.plot(*mean_curve(curves[other]), color="0.6", linestyle="--")
        for i, s in enumerate(sorted({s for s, _ in c})):
            ks = sorted(k for s2, k in c if s2 == s)
            ax.plot(ks, [c[s, k] for k in ks], color=f"C{i}", marker="o", markersize=3, linewidth=0.9, alpha=0.7,
                    label=f"seed {s}")
        ax.plot(*mean_curve(c), color="k", marker="o", linewidth=2.2, label="mean")
        dashed = f" (dashed: mean at p = {', '.join(f'{o:g}' for o in others)})" if others else ""
        ax.set_title(f"p = {p:g}{dashed}", fontsize=9)
        ax.set_xlabel("group size k (k = 1: DPO)")
        ax.set_xticks(sorted({k for _, k in c}))
    axes[0][0].set_ylabel({"entropy": "held-out entropy (nats)"}.get(metric, metric))
    axes[0][-1].legend(fontsize=7)
    path = Path(path)
    finish_figure(fig, path, f"RNG task: held-out {metric} against k (lines: seeds; black: mean)")
    return path


def trend_report(rows: list[dict[str, Any]], rates: list[float], figure: Optional[str | Path] = None
                 ) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(markdown, k_trend per rate, noise_contrast per rate above 0) for the driver's results; writes the k-curve
    figure to ``figure`` when given and some rate has a curve."""
    md, trend = k_trend(rows, rates)
    contrast = {}
    if 0.0 in rates:
        for p in (p for p in rates if p > 0):
            section, out = noise_contrast(rows, p)
            md += section
            if out:
                contrast[str(p)] = out
    if figure is not None:
        plot_k_curves(figure, rows, rates)
    return md, trend, contrast
