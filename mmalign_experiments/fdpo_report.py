"""The f-DPO frontier's summaries over seeds: per-seed tables, the paired analysis rule and the ECE-curve figure.

Rows are the driver's cells (``{"seed", "method", <metric>: value, "ece_curve": [(step, ece), ...]}``). Seeds are
the unit: every comparison pairs a divergence with reverse KL on the same seed (docs/fdpo-frontier.md's rule: a
divergence is *more diverse* if its predictive entropy is higher, and has *lower ECE* if its final ECE is lower,
in every seed where both finished).
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

BASE = "RKL (DPO)"


def _cells(rows: Sequence[dict[str, Any]], method: str, metric: str) -> dict[int, float]:
    return {r["seed"]: r[metric] for r in rows if r["method"] == method and r.get(metric) is not None}


def per_seed_table(rows: Sequence[dict[str, Any]], labels: Sequence[str], metric: str) -> str:
    """Markdown: one line per method, one column per seed, then the mean; '–' where a cell did not finish."""
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"| {metric} | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for lab in labels:
        cells = _cells(rows, lab, metric)
        mean = f"{statistics.mean(cells.values()):.3f}" if cells else "–"
        lines.append(f"| {lab} | " + " | ".join(f"{cells[s]:.3f}" if s in cells else "–" for s in seeds) + f" | {mean} |")
    return "\n".join(lines) + "\n"


def paired_rule(rows: Sequence[dict[str, Any]], labels: Sequence[str], *, base: str = BASE,
                reward: str = "reward") -> list[dict[str, Any]]:
    """Per divergence ≠ base: in how many shared seeds its entropy is higher / its ECE lower than base's, the
    verdict (both in every shared seed), and the mean paired differences (entropy, ECE, ``reward``)."""
    out = []
    base_cells = {m: _cells(rows, base, m) for m in ("predictive_entropy", "ece", reward)}
    for lab in labels:
        if lab in (base, "SFT"):
            continue
        cells = {m: _cells(rows, lab, m) for m in base_cells}
        seeds = sorted(set(cells["predictive_entropy"]) & set(cells["ece"])
                       & set(base_cells["predictive_entropy"]) & set(base_cells["ece"]))
        if not seeds:
            out.append({"method": lab, "seeds": 0})
            continue
        diff = {m: [cells[m][s] - base_cells[m][s] for s in seeds if s in cells[m] and s in base_cells[m]]
                for m in base_cells}
        more_diverse = sum(d > 0 for d in diff["predictive_entropy"])
        lower_ece = sum(d < 0 for d in diff["ece"])
        out.append({"method": lab, "seeds": len(seeds), "entropy_higher": more_diverse, "ece_lower": lower_ece,
                    "holds": more_diverse == lower_ece == len(seeds),
                    **{f"d_{m}": statistics.mean(d) if d else None for m, d in diff.items()}})
    return out


def rule_table(verdicts: Sequence[dict[str, Any]], *, reward: str = "reward") -> str:
    lines = [f"| divergence | seeds | entropy > RKL | ECE < RKL | claim holds | Δ entropy | Δ ECE | Δ {reward} |",
             "|---|---|---|---|---|---|---|---|"]
    for v in verdicts:
        if not v["seeds"]:
            lines.append(f"| {v['method']} | 0 | – | – | – | – | – | – |")
            continue
        fmt = lambda x: "–" if x is None else f"{x:+.3f}"  # noqa: E731
        lines.append(f"| {v['method']} | {v['seeds']} | {v['entropy_higher']}/{v['seeds']} | {v['ece_lower']}/{v['seeds']}"
                     f" | {'yes' if v['holds'] else 'no'} | {fmt(v['d_predictive_entropy'])} | {fmt(v['d_ece'])}"
                     f" | {fmt(v.get('d_' + reward))} |")
    return "\n".join(lines) + "\n"


def mean_ece_curves(rows: Sequence[dict[str, Any]], labels: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """Per trained method: (step, mean eval_ece over seeds), starting at step 0 with the SFT row's ECE of the same
    seeds (the untrained policy); a step is averaged only over the seeds that logged it."""
    sft = _cells(rows, "SFT", "ece")
    curves = {}
    for lab in labels:
        if lab == "SFT":
            continue
        by_step: dict[int, list[float]] = {}
        for r in rows:
            if r["method"] != lab or not r.get("ece_curve"):
                continue
            if r["seed"] in sft:
                by_step.setdefault(0, []).append(sft[r["seed"]])
            for step, ece in r["ece_curve"]:
                by_step.setdefault(int(step), []).append(float(ece))
        if by_step:
            curves[lab] = [(s, statistics.mean(v)) for s, v in sorted(by_step.items())]
    return curves


def plot_ece_curves(path: Path, rows: Sequence[dict[str, Any]], labels: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmalign_experiments.sweep import finish_figure

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, (lab, curve) in enumerate(mean_ece_curves(rows, labels).items()):
        ax.plot(*zip(*curve), color=f"C{i + 1}", marker="o", label=lab)
        for r in rows:  # thin lines: the single seeds
            if r["method"] == lab and r.get("ece_curve"):
                ax.plot(*zip(*r["ece_curve"]), color=f"C{i + 1}", alpha=0.25, linewidth=0.8)
    ax.set_xlabel("training step (0: the untrained SFT model)")
    ax.set_ylabel("eval ECE (held-out pairs)")
    ax.legend(fontsize=7)
    finish_figure(fig, path, "f-DPO: ECE during training (bold: mean over seeds; thin: single seeds)")
