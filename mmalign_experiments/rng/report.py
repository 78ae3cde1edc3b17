"""The RNG experiment's report: win rates, the results table and the answer histograms."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mmalign.engine.plots import save_figure
from mmalign.shared.metrics import win_rate

logger = logging.getLogger("mmalign_experiments.rng")


# ------------------------------------------------------------------------------------------------ metrics
def win_rates(results: dict[str, list[dict[str, Any]]], comparisons: list[tuple[str, str]]) -> dict[str, float]:
    """``"A vs B"`` -> fraction of held-out prompts where A's answer entropy is higher (ties count half)."""
    return {
        f"{a} vs {b}": win_rate([r["entropy"] for r in results[a]], [r["entropy"] for r in results[b]])
        for a, b in comparisons
    }


# ------------------------------------------------------------------------------------------------ reporting
def results_table(summaries: dict[str, dict[str, float]], wins: dict[str, float]) -> str:
    """A Markdown table of the per-model means and a table of win rates."""
    lines = [
        "| model | entropy (nats) | normalised entropy | KL to uniform | out-of-range rate |",
        "|---|---|---|---|---|",
    ]
    for label, s in summaries.items():
        lines.append(f"| {label} | {s['entropy']:.3f} | {s['normalized_entropy']:.3f} | {s['kl_to_uniform']:.3f} | "
                     f"{s['out_of_range_rate']:.3f} |")
    lines += ["", "| comparison (higher entropy wins) | win rate |", "|---|---|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in wins.items()]
    return "\n".join(lines) + "\n"


def plot_histograms(path: Path, results: dict[str, list[dict[str, Any]]], num_intervals: int) -> None:
    """Rows = models, columns = held-out intervals: counts per allowed integer, the out-of-range count in grey
    and the uniform expectation dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    columns = min(num_intervals, len(results[labels[0]]))
    fig, axes = plt.subplots(len(labels), columns, figsize=(3.2 * columns, 1.9 * len(labels)), squeeze=False)
    for row, label in enumerate(labels):
        for col in range(columns):
            res = results[label][col]
            ax = axes[row][col]
            counts = res["counts"]
            total = sum(counts) + round(res["out_of_range_rate"] * _num_samples(res))
            xs = list(range(res["low"], res["high"] + 1))
            ax.bar([str(x) for x in xs] + ["out"], counts + [total - sum(counts)],
                   color=["tab:blue"] * len(xs) + ["tab:gray"])
            ax.axhline(total / len(xs), color="k", linestyle="--", linewidth=0.8)
            ax.tick_params(axis="x", labelsize=6, rotation=90)
            ax.tick_params(axis="y", labelsize=6)
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
            if row == 0:
                ax.set_title(f"[{res['low']}, {res['high']}]", fontsize=8)
    fig.suptitle("Sampled answers on held-out intervals (dashed: uniform)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _num_samples(res: dict[str, Any]) -> int:
    # counts hold in-range answers only, so they cannot stand in for the number of samples drawn.
    if "num_samples" not in res:
        raise ValueError("uniformity result lacks 'num_samples' (the number of sampled answers)")
    return int(res["num_samples"])
