"""Demonstration 3 with ``reference: previous`` (docs/online-demos.md §3, "Which reference"): the online rounds of
:mod:`mmalign_experiments.online_debias` with each round's reference reset to the policy the previous round left
(the iterative-DPO convention), compared paired per seed with the stored ``reference: initial`` run and the stored
offline cells of the same settings, so that no finished cell is computed again.

    python -m mmalign_experiments.online_debias --reference previous --kinds online --seeds 0 1 2 --jobs 2 \\
        --compare-with bench/results/online_debias_results.json \\
        --out bench/results/online_debias_previous_results.json --plot bench/results/online_debias_previous.png

Design (everything but the reference is the stored run's: 25 occupations → 20 trained on / 5 held out, 4 rounds
× k = 4 images per prompt × 10 mDPO steps, full fine-tuning, β_d = 5000, the same generation and training seeds
per seed). Round 1 trains against the starting model under either reference, so its row must equal the stored
run's round 1: that is the check that the stored cells still pair with a run on the current code (if it fails,
the comparison below is reported as not paired and the stored run must be recomputed).

Analysis rule (fixed before any ``reference: previous`` run; the same form as the driver's):
- **previous vs initial** (primary): per attribute (Simpson gender, Simpson race) and seed s, d_s = previous after
  round 4 − initial after round 4. "previous above initial" iff mean d > 0 and d_s > 0 in every seed; "previous
  below initial" iff mean d < 0 and d_s < 0 in every seed; otherwise not resolved at this number of seeds.
- **previous vs offline**: the same with d_s = previous after round 4 − offline at its end (the driver's rule).
- **previous vs base**: above / below the base model in every seed, or not resolved.
- reported beside, no verdict: d_s after each round 1–3, the no-face rate and the denoising-loss change; a "win"
  with a no-face rate above 0.05 is named as such. Every number is reported whatever its direction.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

from mmalign_experiments.sweep import same_sign_verdict

# defined here, not in online_debias, which imports this module (no import cycle)
ATTRIBUTES = ("simpson_gender", "simpson_race")

REFERENCE_INDEPENDENT = ("simpson_gender", "simpson_race", "no_face_rate", "denoising_loss", "train_reward", "loss")


def stored_cells(path: Path, expected_settings: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """The online (``reference: initial``) and offline cells of a stored results file of the driver; refused unless
    the file ran under ``expected_settings`` (the current settings without the reference)."""
    stored = json.loads(Path(path).read_text())
    if stored.get("settings") != expected_settings:
        raise SystemExit(f"--compare-with {path}: its settings {stored.get('settings')} are not this run's "
                         f"{expected_settings} (only the reference may differ)")
    cells = stored["cells"]
    initial = [c for c in cells if c["kind"] == "online"]
    offline = [c for c in cells if c["kind"] == "offline"]
    return initial, offline


def paired_by_round(previous: Sequence[dict], initial: Sequence[dict]) -> dict[str, Any]:
    """Per attribute and round, previous − initial per seed (paired; seeds missing on either side left out); the
    verdict of the rule on the last round; and whether round 1 equals the stored run's (the pairing check)."""
    by_seed = {c["seed"]: c for c in initial}
    pairs = [(c, by_seed[c["seed"]]) for c in sorted(previous, key=lambda c: c["seed"]) if c["seed"] in by_seed]
    out: dict[str, Any] = {"seeds": [p["seed"] for p, _ in pairs]}
    if not pairs:
        return out
    rounds = min(min(len(p["rounds"]), len(i["rounds"])) for p, i in pairs)
    for attribute in ATTRIBUTES:
        per_round = [[p["rounds"][r][attribute] - i["rounds"][r][attribute] for p, i in pairs] for r in range(rounds)]
        d = per_round[-1]
        out[attribute] = {"previous_minus_initial_per_round": per_round, "last_round": rounds - 1,
                          "mean": statistics.mean(d), "sd": statistics.stdev(d) if len(d) > 1 else None,
                          "verdict": same_sign_verdict(d, "previous above initial", "previous below initial")}
    out["round1_equal"] = {p["seed"]: first_round_difference(p, i) for p, i in pairs}
    return out


def first_round_difference(previous: dict, initial: dict) -> dict[str, Any]:
    """Round 1 under both references (the same reference, the starting model): the fields that differ, if any."""
    if len(previous["rounds"]) < 2 or len(initial["rounds"]) < 2:
        return {"compared": False}
    a, b = previous["rounds"][1], initial["rounds"][1]
    differing = {k: [a.get(k), b.get(k)] for k in REFERENCE_INDEPENDENT if a.get(k) != b.get(k)}
    return {"compared": True, "equal": not differing, "differing": differing}


def markdown(previous: Sequence[dict], initial: Sequence[dict], offline: Sequence[dict]) -> str:
    """One row per round and reference, the seeds' values (seed order) and their mean; the offline cells last."""
    def row(label: str, cells: Sequence[dict], pick) -> str:
        entries = []
        for key in ("simpson_gender", "simpson_race", "no_face_rate", "denoising_loss"):
            values = [pick(c).get(key) for c in sorted(cells, key=lambda c: c["seed"])]
            values = [v for v in values if v is not None]
            digits = 4 if key == "denoising_loss" else 3
            entries.append(f"{statistics.mean(values):.{digits}f} (" + ", ".join(f"{v:.{digits}f}" for v in values)
                           + ")" if values else "—")
        return f"| {label} | " + " | ".join(entries) + " |"

    lines = ["| model (mean, per seed) | Simpson gender | Simpson race | no face | denoising loss |", "|---|---|---|---|---|"]
    rounds = max((len(c["rounds"]) for c in previous), default=0)
    for r in range(1, rounds):
        for name, cells in (("initial", initial), ("previous", previous)):
            done = [c for c in cells if len(c["rounds"]) > r]
            if done:
                lines.append(row(f"online, reference {name}, round {r}", done, lambda c, r=r: c["rounds"][r]))
    if offline:
        lines.append(row("offline, at its end", offline, lambda c: c["final"]))
    return "\n".join(lines) + "\n"


def plot(previous: Sequence[dict], initial: Sequence[dict], offline: Sequence[dict], path: Path) -> Path:
    """Per round, each seed's line for both references (the stored initial run dashed) and the offline ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key in zip(axes, ATTRIBUTES):
        for style, name, cells in (("--", "initial", initial), ("-", "previous", previous)):
            for c in sorted(cells, key=lambda c: c["seed"]):
                ax.plot(range(len(c["rounds"])), [r[key] for r in c["rounds"]], style + "o", ms=3,
                        color=f"C{c['seed']}", alpha=0.8, label=f"reference {name}, seed {c['seed']}")
        last = max((len(c["rounds"]) for c in list(previous) + list(initial)), default=2) - 1
        for c in offline:
            ax.plot([last + 0.15], [c["final"][key]], "s", color=f"C{c['seed']}", label=f"offline, seed {c['seed']}")
        ax.set_title(key.replace("_", " ") + " (held-out occupations)")
        ax.set_xlabel("round (0 = base model)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    from mmalign.engine.plots import save_figure

    return save_figure(fig, path)


def report(previous: Sequence[dict], initial: Sequence[dict], offline: Sequence[dict],
           plot_path: Optional[Path]) -> dict[str, Any]:
    """The ``reference_comparison`` section of the results file (the offline comparison is the driver's)."""
    result = {"stored_initial_seeds": sorted(c["seed"] for c in initial),
              "stored_offline_seeds": sorted(c["seed"] for c in offline),
              "previous_vs_initial": paired_by_round(previous, initial),
              "table": markdown(previous, initial, offline)}
    if plot_path is not None and previous:
        result["plot"] = str(plot(previous, initial, offline, plot_path))
    return result
